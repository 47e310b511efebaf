"""`cifar100 eval` on a real smoke run: every number of eval.json recomputed from the saved predictions."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import run_cmd

from cifar100.cli import main
from cifar100.commands.evaluation import split_metrics
from cifar100.config import apply_overrides, load_config
from cifar100.data.cifar import load, select_splits
from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import apply_weights, load_weights
from cifar100.training.models import build_model

VAL_SIZE = 200


@pytest.fixture(scope="module")
def val_run(tmp_path_factory, real_data):
    """A 2-epoch smoke run that holds out a validation split (so its best epoch is chosen on val)."""
    log_dir = tmp_path_factory.mktemp("eval")
    out = run_cmd(
        [
            sys.executable,
            "train.py",
            "recipe=smoke",
            "name=val",
            f"data.val_size={VAL_SIZE}",
            f"data.root={real_data}",
            f"log.dir={log_dir}",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return log_dir / "val"


@pytest.fixture(scope="module")
def best_eval(val_run, real_data):
    """`cifar100 eval run=<val run>` (checkpoint best), run once: its JSON and its predictions."""
    out = run_cmd([sys.executable, "-m", "cifar100", "eval", f"run={val_run}", f"data.root={real_data}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wrote" in out.stdout and "test top-1" in out.stdout and "val top-1" in out.stdout
    result = json.loads((val_run / "eval-best.json").read_text())
    with np.load(val_run / result["predictions"]) as npz:
        return result, dict(npz)


def recompute(arrays: dict, split: str) -> dict:
    """The split's numbers from logits and labels alone, in numpy."""
    logits, labels = arrays[f"{split}_logits"].astype(np.float64), arrays[f"{split}_labels"]
    classes, superclasses, coarse_of = arrays["classes"], arrays["superclasses"], arrays["fine_to_coarse"]
    n = len(labels)
    shifted = logits - logits.max(1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(n), labels]))
    predicted = logits.argmax(1)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    per_class = {}
    for c, name in enumerate(classes):
        mine = labels == c
        per_class[str(name)] = (int(mine.sum()), float((predicted[mine] == c).mean()) if mine.any() else None)
    per_superclass = {}
    for s, name in enumerate(superclasses):
        mine = coarse_of[labels] == s
        per_superclass[str(name)] = (
            int(mine.sum()),
            float((predicted[mine] == labels[mine]).mean()),
            float((coarse_of[predicted[mine]] == s).mean()),
        )
    wrong = Counter((int(t), int(p)) for t, p in zip(labels, predicted) if t != p)
    pairs = sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    return {
        "loss": loss,
        "top1": float((predicted == labels).mean()),
        "top5": float((top5 == labels[:, None]).any(1).mean()),
        "per_class": per_class,
        "per_superclass": per_superclass,
        "pairs": [(str(classes[t]), str(classes[p]), count) for (t, p), count in pairs],
    }


@pytest.mark.slow
@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_json_matches_an_independent_computation(best_eval, split):
    result, arrays = best_eval
    got, want = result["splits"][split], recompute(arrays, split)
    assert got["images"] == len(arrays[f"{split}_labels"]) == (VAL_SIZE if split == "val" else 200)
    assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] == pytest.approx(want["top5"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert list(got["per_class"]) == list(want["per_class"])  # every class, in label order
    for name, (images, top1) in want["per_class"].items():
        assert got["per_class"][name]["images"] == images and got["per_class"][name]["top1"] == pytest.approx(top1)
    assert list(got["per_superclass"]) == list(want["per_superclass"])
    for name, (images, top1, superclass_top1) in want["per_superclass"].items():
        mine = got["per_superclass"][name]
        assert mine["images"] == images
        assert (mine["top1"], mine["superclass_top1"]) == (pytest.approx(top1), pytest.approx(superclass_top1))
    assert [(p["true"], p["predicted"], p["count"]) for p in got["confused_pairs"]] == want["pairs"]
    assert len(got["per_class"]) == 100 and len(got["per_superclass"]) == 20
    # The superclass map comes from the data files: every image's coarse label agrees with it.
    assert (arrays["fine_to_coarse"][arrays[f"{split}_labels"]] == arrays[f"{split}_coarse"]).all()


@pytest.mark.slow
def test_eval_reproduces_training_numbers_on_the_training_splits(best_eval, val_run, real_data):
    result, arrays = best_eval
    summary = json.loads((val_run / "summary.json").read_text())
    rows = [json.loads(line) for line in (val_run / "metrics.jsonl").read_text().splitlines()]
    at_best = rows[summary["best_val_epoch"] - 1]
    assert result["epoch"] == summary["best_val_epoch"]  # best was chosen on val, not on test
    assert result["splits"]["val"]["top1"] == summary["best_val_top1"]
    assert result["splits"]["test"]["top1"] == summary["test_top1_at_best_val"]
    assert result["splits"]["test"]["loss"] == pytest.approx(at_best["test_loss"], rel=1e-5)
    splits = select_splits(load(real_data), load_config("smoke", [f"data.val_size={VAL_SIZE}"]).data, 0)
    assert (arrays["val_index"] == splits.val.numpy()).all() and (arrays["test_index"] == splits.test.numpy()).all()
    md = (val_run / "eval-best.md").read_text()
    assert f"| test | 200 | {result['splits']['test']['top1']:.2%} |" in md
    assert (val_run / result["confusion_matrix"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_flip_tta_on_the_last_checkpoint_averages_both_views(val_run, real_data):
    out = run_cmd(
        [
            sys.executable,
            "-m",
            "cifar100",
            "eval",
            f"run={val_run}",
            "checkpoint=last",
            "eval.tta=flip",
            f"data.root={real_data}",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((val_run / "eval-last-flip.json").read_text())
    assert (result["checkpoint_tag"], result["tta"], result["epoch"]) == ("last-flip", "flip", 2)
    with np.load(val_run / result["predictions"]) as npz:
        logits, index = npz["test_logits"], npz["test_index"]
    # Rebuild the model from the checkpoint and score both views here, by hand.
    cfg = load_config("smoke", [])
    model = build_model(cfg.model, 100).eval()
    apply_weights(model, load_weights(val_run / "checkpoints" / "last"), val_run)
    test = load(real_data).test
    x = (
        test.images[torch.from_numpy(index)].float() / 255 - torch.tensor(cfg.augment.mean)[:, None, None]
    ) / torch.tensor(cfg.augment.std)[:, None, None]
    with torch.no_grad():
        plain, flipped = model(x), model(x.flip(3))
    np.testing.assert_allclose(logits, ((plain + flipped) / 2).numpy(), rtol=1e-4, atol=1e-4)
    rows = [json.loads(line) for line in (val_run / "metrics.jsonl").read_text().splitlines()]
    labels = test.labels[torch.from_numpy(index)]
    assert (plain.argmax(1) == labels).float().mean().item() == pytest.approx(rows[-1]["test_top1"])  # the last epoch's
    assert result["splits"]["test"]["top1"] == pytest.approx((logits.argmax(1) == labels.numpy()).mean())


@pytest.mark.slow
def test_two_process_eval_gives_the_single_process_numbers(best_eval, val_run, real_data, tmp_path):
    result, arrays = best_eval
    copy = tmp_path / "val"
    shutil.copytree(val_run, copy, symlinks=True)
    out = run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "cifar100",
            "eval",
            f"run={copy}",
            f"data.root={real_data}",
        ],
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("wrote") == 1  # only the main process writes
    ddp = json.loads((copy / "eval-best.json").read_text())
    assert ddp["world_size"] == 2
    for split in ("val", "test"):
        assert ddp["splits"][split]["per_class"] == result["splits"][split]["per_class"]
        assert ddp["splits"][split]["confused_pairs"] == result["splits"][split]["confused_pairs"]
        assert ddp["splits"][split]["top1"] == result["splits"][split]["top1"]
    with np.load(copy / ddp["predictions"]) as npz:
        np.testing.assert_allclose(npz["test_logits"], arrays["test_logits"], rtol=1e-5, atol=1e-5)
        assert (npz["test_labels"] == arrays["test_labels"]).all()  # gathered back in dataset order


@pytest.mark.slow
def test_eval_mistakes_are_one_line(val_run, tmp_path, capsys):
    broken = tmp_path / "half"
    shutil.copytree(val_run / "checkpoints" / "best", broken)
    (broken / "COMPLETE").unlink()
    cases = {
        (f"run={tmp_path}",): "not a run folder",
        (f"run={val_run}", "checkpoint=nowhere"): "expected best, last or a checkpoint folder",
        (f"run={val_run}", "eval.tta=vflip"): "expected one of none, flip",
        ("checkpoint=best",): "needs run=",
        (f"run={val_run}", "recipe=smoke"): "drop recipe=",
        (f"checkpoint={broken}",): "not a complete checkpoint",
        (f"run={val_run}", "optim.lrr=1"): "did you mean optim.lr",
    }
    for args, message in cases.items():
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)


def test_split_metrics_by_hand():
    # 4 classes in 2 superclasses: {a, b} and {c, d}. Five images; predictions by the largest logit.
    classes, superclasses, coarse_of = ("a", "b", "c", "d"), ("ab", "cd"), np.array([0, 0, 1, 1])
    labels = np.array([0, 0, 1, 2, 3])
    predicted = np.array([0, 1, 0, 3, 1])  # right, a->b, b->a, c->d, d->b
    logits = np.full((5, 4), -1.0, dtype=np.float32)
    logits[np.arange(5), predicted] = 2.0
    logits[np.arange(5), labels] = np.maximum(logits[np.arange(5), labels], 1.0)  # the truth always second or first
    m = split_metrics(logits, labels, coarse_of, classes, superclasses)
    assert m["top1"] == pytest.approx(1 / 5) and m["top5"] == 1.0  # top-5 of 4 classes holds everything
    assert {k: (v["images"], v["top1"]) for k, v in m["per_class"].items()} == {
        "a": (2, 0.5),
        "b": (1, 0.0),
        "c": (1, 0.0),
        "d": (1, 0.0),
    }
    assert m["per_superclass"]["ab"] == {"index": 0, "images": 3, "top1": pytest.approx(1 / 3), "superclass_top1": 1.0}
    assert m["per_superclass"]["cd"] == {"index": 1, "images": 2, "top1": 0.0, "superclass_top1": 0.5}
    assert [(p["true"], p["predicted"], p["count"], p["share_of_true"]) for p in m["confused_pairs"]] == [
        ("a", "b", 1, 0.5),
        ("b", "a", 1, 1.0),
        ("c", "d", 1, 1.0),
        ("d", "b", 1, 1.0),
    ]
    expected_loss = np.mean([np.log(np.exp(row).sum()) - row[t] for row, t in zip(logits.astype(np.float64), labels)])
    assert m["loss"] == pytest.approx(expected_loss)


def test_overrides_apply_on_top_of_the_checkpoint_config():
    raw = {"name": "x", "data": {"root": "data", "batch_size": 64}, "optim": {"lr": 0.3}}
    cfg = apply_overrides(raw, ["data.root=/elsewhere", "data.eval_batch_size=10"])
    assert (cfg.data.root, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.optim.lr) == ("/elsewhere", 64, 10, 0.3)
    assert raw["data"]["root"] == "data"  # the checkpoint's own config is left as it was
    with pytest.raises(UserError, match=r"did you mean data.root"):
        apply_overrides(raw, ["data.rot=1"])


@pytest.mark.slow
def test_a_run_trained_with_flip_tta_scores_every_epoch_with_it_and_eval_follows_its_config(tmp_path, real_data):
    out = run_cmd(
        [
            sys.executable,
            "train.py",
            "recipe=smoke",
            "name=tta",
            "train.epochs=1",
            "eval.tta=flip",
            f"data.root={real_data}",
            f"log.dir={tmp_path}",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "tta"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    out = run_cmd([sys.executable, "-m", "cifar100", "eval", f"run={run}", "checkpoint=last", f"data.root={real_data}"])
    assert out.returncode == 0, out.stderr[-3000:]
    flipped = json.loads((run / "eval-last-flip.json").read_text())  # the config's eval.tta, with no override
    assert flipped["tta"] == "flip"
    assert flipped["splits"]["test"]["top1"] == pytest.approx(row["test_top1"])
    assert flipped["splits"]["test"]["loss"] == pytest.approx(row["test_loss"], rel=1e-5)
    out = run_cmd(
        [
            sys.executable,
            "-m",
            "cifar100",
            "eval",
            f"run={run}",
            "checkpoint=last",
            "eval.tta=none",
            f"data.root={real_data}",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plain = json.loads((run / "eval-last.json").read_text())
    assert plain["tta"] == "none" and plain["splits"]["test"]["loss"] != pytest.approx(row["test_loss"], rel=1e-5)
