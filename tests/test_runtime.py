"""runtime.require_one_job: a launch whose processes did not form one job is refused, rank 0 first.
The end-to-end case (accelerate launch --multi_gpu on this CPU machine) is in test_signals.py."""

from __future__ import annotations

import time

import pytest

from cifar100.errors import UserError
from cifar100.training.runtime import require_one_job


@pytest.mark.parametrize(("launched", "joined"), [(None, 1), ("1", 1), ("2", 2), ("8", 8), ("", 1), ("two", 1)])
def test_one_job_or_no_launcher_passes(launched, joined):
    require_one_job(launched, "0", joined)


def test_processes_that_did_not_join_are_refused_with_the_fix():
    began = time.monotonic()
    with pytest.raises(
        UserError,
        match=r"started 2 processes \(WORLD_SIZE=2\) but they did not join one job.*"
        r"ACCELERATE_USE_CPU=1",
    ):
        require_one_job("2", "0", 1, grace=5.0)
    assert time.monotonic() - began < 1.0  # rank 0 says it at once


@pytest.mark.parametrize("rank", ["1", "7"])
def test_other_ranks_wait_before_they_are_refused(rank):
    began = time.monotonic()
    with pytest.raises(UserError, match="did not join one job"):
        require_one_job("8", rank, 1, grace=0.5)
    assert time.monotonic() - began >= 0.5
