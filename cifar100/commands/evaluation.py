"""`cifar100 eval`: score a checkpoint per class and per superclass, and leave every prediction on disk.

The checkpoint's own `meta.json` says which config trained it; `key=value` overrides apply on
top (say `data.root=`). Test and, when the run held one out, validation images are chosen with
the data module's `select_splits`, so the numbers are those of training. Under `accelerate launch`
each process scores a shard and the logits are gathered in dataset order; the main process
writes `eval-<checkpoint>.json`, `.md`, a confusion-matrix PNG and the logits (`.npz`), from
which every number in the JSON can be recomputed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, cast

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from cifar100.commands.trained import load_trained
from cifar100.config import Config
from cifar100.data import cifar as cifar_data
from cifar100.errors import shown_path
from cifar100.runfolder.safe_files import write_atomic
from cifar100.training.evaluation import EvalSettings, evaluate
from cifar100.training.runtime import device_type, resolve_precision

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt

TOP_PAIRS = 10


def split_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    coarse_of: np.ndarray,
    classes: tuple[str, ...],
    superclasses: tuple[str, ...],
) -> dict[str, Any]:
    """Loss, top-1/top-5, per class, per superclass and the most confused pairs of one split."""
    n, num_classes = logits.shape
    scores = torch.from_numpy(logits).double()
    loss = float(F.cross_entropy(scores, torch.from_numpy(labels)))
    top5 = scores.topk(min(5, num_classes), dim=1).indices.numpy()
    predicted = top5[:, 0]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for c, name in enumerate(classes):
        seen = int(confusion[c].sum())
        per_class[name] = {
            "index": c,
            "superclass": superclasses[coarse_of[c]],
            "images": seen,
            "top1": int(confusion[c, c]) / seen if seen else None,
        }
    return {
        "images": n,
        "loss": loss,
        "top1": float((predicted == labels).mean()),
        "top5": float((top5 == labels[:, None]).any(1).mean()),
        "per_class": per_class,
        "per_superclass": _per_superclass(labels, predicted, coarse_of, superclasses),
        "confused_pairs": _confused_pairs(confusion, classes),
    }


def _per_superclass(
    labels: np.ndarray, predicted: np.ndarray, coarse_of: np.ndarray, superclasses: tuple[str, ...]
) -> dict[str, Any]:
    """Per superclass: the exact class right (top1) and a class of the right superclass (superclass_top1)."""
    correct = predicted == labels
    true_coarse, predicted_coarse = coarse_of[labels], coarse_of[predicted]
    per_superclass = {}
    for s, name in enumerate(superclasses):
        mine = true_coarse == s
        seen = int(mine.sum())
        per_superclass[name] = {
            "index": s,
            "images": seen,
            "top1": float(correct[mine].mean()) if seen else None,
            "superclass_top1": float((predicted_coarse[mine] == s).mean()) if seen else None,
        }
    return per_superclass


def _confused_pairs(confusion: np.ndarray, classes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The `TOP_PAIRS` most frequent (true, predicted) mistakes."""
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    # Most frequent first; ties in (true, predicted) index order, so the list is reproducible.
    order = np.lexsort((np.arange(off_diagonal.size), -off_diagonal.ravel()))
    pairs = []
    for flat in order[:TOP_PAIRS]:
        true, pred = divmod(int(flat), len(classes))
        if off_diagonal[true, pred] == 0:
            break
        pairs.append(
            {
                "true": classes[true],
                "predicted": classes[pred],
                "count": int(off_diagonal[true, pred]),
                "share_of_true": int(off_diagonal[true, pred]) / int(confusion[true].sum()),
            }
        )
    return pairs


def plot_confusion(
    logits: np.ndarray, labels: np.ndarray, coarse_of: np.ndarray, superclasses: tuple[str, ...], path: Path, title: str
) -> None:
    """Row-normalised confusion matrix, classes grouped by superclass so its blocks show."""
    num_classes = logits.shape[1]
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels, logits.argmax(1)), 1)
    confusion /= np.maximum(confusion.sum(1, keepdims=True), 1)
    order = np.argsort(coarse_of, kind="stable")
    fig, ax = plt.subplots(figsize=(10, 10), dpi=100)
    image = ax.imshow(confusion[np.ix_(order, order)], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    sizes = np.bincount(coarse_of, minlength=len(superclasses))
    edges = np.cumsum(sizes)
    for edge in edges[:-1]:
        ax.axhline(edge - 0.5, color="white", lw=0.4)
        ax.axvline(edge - 0.5, color="white", lw=0.4)
    centers = edges - sizes / 2 - 0.5
    ax.set_yticks(centers, superclasses, fontsize=7)
    ax.set_xticks(centers, superclasses, fontsize=7, rotation=90)
    ax.set(xlabel="predicted class (grouped by superclass)", ylabel="true class (grouped by superclass)", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true class")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(path, png.getvalue())


def to_markdown(result: dict[str, Any]) -> str:
    """eval-<tag>.md: the JSON's numbers as tables a person reads."""
    tta = ", flip test-time augmentation" if result["tta"] == "flip" else ""
    tta = (", averaged (EMA) weights" if result.get("weights") == "ema" else "") + tta
    lines = [
        f"# Evaluation: {result['run']}, checkpoint `{result['checkpoint_tag']}` (epoch {result['epoch']}){tta}",
        "",
        f"Checkpoint `{result['checkpoint']}`; predictions in `{result['predictions']}`.",
        "",
        "| split | images | top-1 | top-5 | loss |",
        "|---|---|---|---|---|",
    ]
    for split, m in result["splits"].items():
        lines.append(f"| {split} | {m['images']} | {m['top1']:.2%} | {m['top5']:.2%} | {m['loss']:.4f} |")
    for split, m in result["splits"].items():
        lines += [
            "",
            f"## {split}: per superclass",
            "",
            "| superclass | images | top-1 (exact class) | a class of the right superclass |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {s['images']} | {_pct(s['top1'])} | {_pct(s['superclass_top1'])} |"
            for name, s in m["per_superclass"].items()
        ]
        lines += [
            "",
            f"## {split}: most confused pairs",
            "",
            "| true class | predicted as | images | share of the true class |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {p['true']} | {p['predicted']} | {p['count']} | {p['share_of_true']:.1%} |" for p in m["confused_pairs"]
        ]
        ranked = sorted(m["per_class"].items(), key=lambda kv: (kv[1]["top1"] is None, kv[1]["top1"] or 0, kv[0]))
        lines += [
            "",
            f"## {split}: per class, worst first",
            "",
            "| class | superclass | images | top-1 |",
            "|---|---|---|---|",
        ]
        lines += [f"| {name} | {c['superclass']} | {c['images']} | {_pct(c['top1'])} |" for name, c in ranked]
    lines += ["", f"![confusion matrix]({result['confusion_matrix']})", ""]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def run_eval(run: str | None, checkpoint: str, overrides: list[str], which: str = "model") -> Path | None:
    """Evaluate one checkpoint's weights (`which`: the model's, or the averaged ones of `train.ema`)
    with the test-time augmentation of its config's `eval.tta` (an override may change it);
    returns the eval JSON's path (None on processes other than the main one)."""
    trained = load_trained(run, checkpoint, overrides, which)
    cfg = trained.cfg
    tag = trained.tag + ("-flip" if cfg.eval.tta == "flip" else "")

    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.train.precision, device_type()))
    with accelerator.main_process_first():
        dataset = cifar_data.load(cfg.data.root, cfg.data.download)
    model = trained.placed(accelerator.device)
    arrays, metrics = _score_splits(model, dataset, cfg, accelerator)
    if not accelerator.is_main_process:
        return None
    facts = {
        "run": trained.out_dir.name,
        "checkpoint": str(trained.checkpoint.resolve()),
        "checkpoint_tag": tag,
        "epoch": trained.meta.get("epoch"),
        "weights": "ema" if which == "ema" else trained.meta.get("weights", "model"),
        "tta": cfg.eval.tta,
        "world_size": accelerator.num_processes,
    }
    return _write_outputs(trained.out_dir, facts, arrays, metrics, dataset.superclasses)


def _score_splits(
    model: torch.nn.Module, dataset: cifar_data.Cifar100, cfg: Config, accelerator: Accelerator
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every logit of the held-out splits training scored (val when the run held images out, test),
    in dataset order, and each split's metrics."""
    splits = cifar_data.select_splits(dataset, cfg.data, cfg.seed)
    settings = EvalSettings.from_config(cfg)
    coarse_of = cifar_data.fine_to_coarse(dataset)
    chosen = {"val": (dataset.train, splits.val), "test": (dataset.test, splits.test)}
    arrays: dict[str, np.ndarray] = {
        "classes": np.array(dataset.classes),
        "superclasses": np.array(dataset.superclasses),
        "fine_to_coarse": coarse_of,
    }
    metrics = {}
    for name, (split, index) in chosen.items():
        if not len(index):
            continue
        scored = evaluate(model, split.images[index], split.labels[index], accelerator, settings, keep_logits=True)
        labels = split.labels[index].numpy()
        arrays.update(
            {
                f"{name}_logits": cast(torch.Tensor, scored.logits).numpy().astype(np.float32),  # keep_logits=True
                f"{name}_labels": labels,
                f"{name}_coarse": split.coarse[index].numpy(),
                f"{name}_index": index.numpy(),
            }
        )
        metrics[name] = split_metrics(
            arrays[f"{name}_logits"], labels, coarse_of, dataset.classes, dataset.superclasses
        )
    return arrays, metrics


def _write_outputs(
    out_dir: Path,
    facts: dict[str, Any],
    arrays: dict[str, np.ndarray],
    metrics: dict[str, Any],
    superclasses: tuple[str, ...],
) -> Path:
    """eval-<tag>.json and .md, the logits (.npz) and the confusion matrix (.png) in `out_dir`."""
    tag = facts["checkpoint_tag"]
    files = {"predictions": f"eval-{tag}-predictions.npz", "confusion_matrix": f"eval-{tag}-confusion.png"}
    packed = io.BytesIO()
    # mypy matches **arrays against savez's allow_pickle: bool too; no array here has that name.
    np.savez(packed, **arrays)  # type: ignore[arg-type]
    write_atomic(out_dir / files["predictions"], packed.getvalue())
    plot_confusion(
        arrays["test_logits"],
        arrays["test_labels"],
        arrays["fine_to_coarse"],
        superclasses,
        out_dir / files["confusion_matrix"],
        f"{out_dir.name}, {tag}: test confusion matrix",
    )
    result = {**facts, **files, "splits": metrics}
    json_path = out_dir / f"eval-{tag}.json"
    write_atomic(json_path, (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(out_dir / f"eval-{tag}.md", to_markdown(result).encode())
    scores = " | ".join(
        f"{name} top-1 {m['top1']:.2%}, top-5 {m['top5']:.2%} ({m['images']} images)" for name, m in metrics.items()
    )
    print(
        f"{shown_path(out_dir.name)} {shown_path(tag)} (epoch {facts['epoch']}): {scores} | "
        f"wrote {shown_path(json_path)} and {shown_path(json_path.with_suffix('.md'))}",
        flush=True,
    )
    return json_path
