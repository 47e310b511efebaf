"""The trials of a search: every grid combination (or a seeded sample of them), or seeded random
draws from the ranges. The same file and seed give the same trials, in the same order."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from cifar100.commands.tune.searchfile import Range, SearchFile
from cifar100.errors import UserError

DEFAULT_RANDOM_TRIALS = 9  # three rungs at a reduction of 3: 9, 3, 1


def settings(search: SearchFile, trials: int | None) -> list[dict[str, Any]]:
    """The trials' own values, key by key, in the file's key order; `trials` (the command line's)
    wins over the file's."""
    count = trials or search.trials
    rng = np.random.default_rng(search.seed)
    if search.sampler == "grid":
        keys = list(search.space)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(search.space[k].choices for k in keys))]
        if count is None:
            return combos
        if count > len(combos):
            raise UserError(f"trials={count}: the grid of {search.path} holds {len(combos)} settings only")
        picked = sorted(rng.choice(len(combos), size=count, replace=False).tolist())
        return [combos[i] for i in picked]
    return [{key: draw(r, rng) for key, r in search.space.items()} for _ in range(count or DEFAULT_RANDOM_TRIALS)]


def draw(r: Range, rng: np.random.Generator) -> Any:
    """One value of a range: log-uniform, uniform (3 significant digits, as a command line shows
    them), a whole number in [low, high], or one of the choices."""
    if r.kind == "choice":
        return r.choices[int(rng.integers(len(r.choices)))]
    if r.kind == "int":
        return int(rng.integers(int(r.low), int(r.high) + 1))
    if r.kind == "log":
        value = math.exp(rng.uniform(math.log(r.low), math.log(r.high)))
    else:
        value = rng.uniform(r.low, r.high)
    return float(f"{value:.3g}")
