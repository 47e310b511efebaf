"""Run files checked as data: meta.json, train states, metrics rows and summary.json of the wrong
shape or with impossible counts are unreadable, a torn last metrics line is dropped with a warning."""

from __future__ import annotations

import json

import pytest
import torch

from cifar100.config import ModelConfig
from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import find_latest, save_checkpoint
from cifar100.runfolder.records import meta_problem, summary_problem, train_state_problem
from cifar100.runfolder.tracking import read_metrics
from cifar100.training.models import build_model

GOOD_META = {
    "epoch": 2,
    "step_in_epoch": 0,
    "global_step": 16,
    "config": {},
    "totals": {
        "epochs_done": 2,
        "train_images": 800,
        "train_seconds": 3.5,
        "wall_seconds": 9.0,
        "images_per_rank": [800],
        "wandb_id": None,
    },
}
GOOD_STATE = {"optimizer": {}, "schedule": {}, "ranks": [{"rng_cpu": torch.get_rng_state(), "progress": None}]}
ROW = {"lr": 0.1, "train_loss": 4.6, "train_top1": 0.01, "test_loss": 4.6, "test_top1": 0.01, "test_top5": 0.05}


def with_totals(**changes):
    return {**GOOD_META, "totals": {**GOOD_META["totals"], **changes}}


@pytest.mark.parametrize(
    "meta, problem",
    [
        ([], "expected an object, found list"),
        (None, "expected an object, found null"),
        (with_totals(epochs_done=-1), "totals.epochs_done is -1, not a count"),
        (with_totals(train_images=1.5), "totals.train_images is 1.5, not a count"),
        (with_totals(wall_seconds=float("inf")), "totals.wall_seconds is inf, not a duration"),
        (with_totals(images_per_rank=[400, -1]), "totals.images_per_rank is [400, -1], not a list of counts"),
        (with_totals(wandb_id=7), "totals.wandb_id is 7, not a text"),
        ({**GOOD_META, "global_step": True}, "global_step is True, not a count"),
        ({**GOOD_META, "epoch": 5}, "epoch 5 cannot follow 2 finished epochs"),
        ({**GOOD_META, "totals": []}, "totals is list, not an object"),
        ({**GOOD_META, "config": "x"}, "config is str, not an object"),
        ({k: v for k, v in GOOD_META.items() if k != "totals"}, "no totals"),
    ],
)
def test_impossible_meta_is_named(meta, problem):
    assert meta_problem(GOOD_META, resumable=True) is None
    assert meta_problem(meta, resumable=True) == problem


def test_mid_epoch_meta_names_the_epoch_after_the_finished_ones():
    assert meta_problem({**GOOD_META, "epoch": 3, "step_in_epoch": 4}, resumable=True) is None
    assert meta_problem({"config": {}}) is None  # best weights: no totals needed


@pytest.mark.parametrize(
    "state, problem",
    [
        ([], "expected a dict, found list"),
        ({**GOOD_STATE, "optimizer": None}, "optimizer is null, not a dict"),
        ({**GOOD_STATE, "ranks": []}, "no per-rank state"),
        ({**GOOD_STATE, "ranks": [{"progress": None}]}, "rank 0's state has no RNG state"),
        (
            {**GOOD_STATE, "ranks": GOOD_STATE["ranks"] * 2},
            "2 ranks saved their state, but the totals count images of 1",
        ),
    ],
)
def test_impossible_train_state_is_named(state, problem):
    assert train_state_problem(GOOD_STATE, GOOD_META) is None
    assert train_state_problem(state, GOOD_META) == problem


@pytest.mark.parametrize(
    "meta", ["[]", json.dumps(with_totals(epochs_done=-3)), json.dumps({**GOOD_META, "epoch": "2"})]
)
def test_find_latest_skips_a_checkpoint_whose_meta_is_impossible(tmp_path, meta):
    model = build_model(ModelConfig(name="cifarnet_tiny", act=None, cifar_stem=True), 100)
    for step in (1, 2):
        save_checkpoint(tmp_path, f"step-{step:08d}", model.state_dict(), GOOD_STATE, GOOD_META)
    (tmp_path / "step-00000002" / "meta.json").write_text(meta)
    with pytest.warns(UserWarning, match=r"skipping checkpoint step-00000002: .*meta.json: unreadable \("):
        assert find_latest(tmp_path)[0].name == "step-00000001"


def test_find_latest_skips_a_checkpoint_whose_train_state_is_impossible(tmp_path):
    model = build_model(ModelConfig(name="cifarnet_tiny", act=None, cifar_stem=True), 100)
    save_checkpoint(tmp_path, "step-00000001", model.state_dict(), GOOD_STATE, GOOD_META)
    save_checkpoint(tmp_path, "step-00000002", model.state_dict(), {"optimizer": {}}, GOOD_META)
    with pytest.warns(UserWarning, match=r"step-00000002: .*train_state.pt: unreadable \(schedule is null"):
        assert find_latest(tmp_path)[0].name == "step-00000001"


def rows_text(*epochs) -> str:
    return "".join(json.dumps({"epoch": e, **ROW}) + "\n" for e in epochs)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows_text(1, 2) + rows_text(3)[:40])  # a crash while epoch 3 was appended
    with pytest.warns(UserWarning, match="dropped the last line, cut short or malformed"):
        assert [r["epoch"] for r in read_metrics(path)] == [1, 2]


@pytest.mark.parametrize(
    "text, problem",
    [
        (rows_text(1)[:30] + "\n" + rows_text(2), "line 1 unreadable (not JSON"),
        (rows_text(1, 1, 2), "line 2 unreadable (epoch 1 after epoch 1)"),
        ("[]\n" + rows_text(1), "line 1 unreadable (expected an object, found list)"),
        (rows_text(0, 1), "line 1 unreadable (epoch is 0, not an epoch number)"),
        (json.dumps({"epoch": 1, **ROW, "test_top1": "high"}) + "\n" + rows_text(2), "test_top1 is str, not a number"),
        (json.dumps({"epoch": 1, **ROW, "test_top1": 1e308}) + "\n" + rows_text(2), "not an accuracy from 0 to 1"),
        (json.dumps({"epoch": 1, **ROW, "test_loss": -1}) + "\n" + rows_text(2), "not a loss a run computes"),
        (json.dumps({"epoch": 1, **ROW, "test_loss": 1e308}) + "\n" + rows_text(2), "not a loss a run computes"),
        (json.dumps({"epoch": 1, **ROW, "lr": float("inf")}) + "\n" + rows_text(2), "lr is inf, not a finite number"),
        (json.dumps({"epoch": 1, **ROW, "epoch_seconds": [1]}) + "\n" + rows_text(2), "epoch_seconds is list"),
        (json.dumps({"epoch": 10**20, **ROW}) + "\n" + rows_text(2), "not an epoch number"),
        (json.dumps({"epoch": 1, **ROW, "test_top5": None}) + "\n" + rows_text(2), "test_top5 is null"),
        ('{"epoch": ' + "1" * 5000 + "}\n" + rows_text(2), "line 1 unreadable (not JSON"),
    ],
)
def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tmp_path, text, problem):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=f"{path}: .*") as err:
        read_metrics(path)
    assert problem in str(err.value)


def test_summary_of_the_wrong_shape_is_named():
    good = {
        "final_test_top1": 0.5,
        "final_test_top5": 0.8,
        "best_test_top1": 0.5,
        "best_epoch": 2,
        "epochs": 2,
        "wall_seconds": 10.0,
        "world_size": 1,
        "parameters": 1000,
        "precision": "no",
        "device": "cpu",
    }
    assert summary_problem(good) is None
    assert summary_problem({**good, "train_loss_nan": float("nan")}) is None  # what it does not read is not judged
    cases = {
        "[]": ([], "expected an object, found list"),
        "null": ({**good, "final_test_top1": None}, "final_test_top1 is null, not a number"),
        "val keys": (
            {**good, "best_selected_on": "val"},
            "best_val_top1, test_top1_at_best_val, best_val_epoch missing",
        ),
        "ema keys": ({**good, "best_weights": "ema"}, "best_ema_test_top1, best_ema_epoch missing"),
        "huge": ({**good, "final_test_top1": 1e308}, "final_test_top1 is 1e+308, not an accuracy from 0 to 1"),
        "NaN": ({**good, "best_test_top1": float("nan")}, "best_test_top1 is nan, not an accuracy from 0 to 1"),
        "years": ({**good, "wall_seconds": 1e308}, "wall_seconds is 1e+308, more than 1e+09"),
        "no time": ({**good, "wall_seconds": float("nan")}, "wall_seconds is nan, not a finite number >= 0"),
        "zero": ({**good, "world_size": 0}, "world_size is 0, not a count"),
        "float": ({**good, "epochs": 2.5}, "epochs is 2.5, not a count"),
        "split": ({**good, "best_selected_on": "train"}, "best_selected_on 'train' or best_weights 'model'"),
        "device": ({**good, "device": "x" * 1000}, "device is 'xxx"),
    }
    for name, (summary, problem) in cases.items():
        assert problem in (summary_problem(summary) or ""), name
