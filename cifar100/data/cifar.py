"""CIFAR-100 on disk: safe loading, structural checks, download, validation split and statistics.

The data lives in the layout the official archive extracts to: ``<root>/cifar-100-python/`` with
the pickled dicts ``train``, ``test`` and ``meta``. Files are checked by structure, not by md5,
so re-ordered or tiny copies in the same format load too; ``verify`` reports md5 and counts.
"""

from __future__ import annotations

import _codecs
import functools
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.utils import download_and_extract_archive

from cifar100.config import DataConfig
from cifar100.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # numpy 1.x, still allowed by pyproject
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]  # the same function, 1.x path

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
OFFICIAL_MD5 = {
    "archive": "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
_OFFICIAL_PER_CLASS = {"train": 500, "test": 100}
NUM_CLASSES, _NUM_COARSE = 100, 20

# The only globals CIFAR's pickles reference: numpy array reconstruction (the official files name
# the pre-2.0 module path) and _codecs.encode, which Python 3 writes for bytes at protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}


@dataclass(frozen=True)
class Split:
    """One split as tensors; row i of each field describes image i."""

    images: torch.Tensor  # uint8 (N, 3, 32, 32), R, G, B planes as stored
    labels: torch.Tensor  # int64 (N,), fine labels 0..99
    coarse: torch.Tensor  # int64 (N,), coarse labels 0..19


@dataclass(frozen=True)
class Cifar100:
    """Both splits plus the label names from ``meta`` (index = label)."""

    train: Split
    test: Split
    classes: tuple[str, ...]
    superclasses: tuple[str, ...]


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that can only build builtin containers and numpy arrays, never call anything else."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # the official files are Python 2 pickles
        self._path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(
                f"{self._path}: refused to unpickle '{module}.{name}' "
                "(only builtin containers and numpy arrays are allowed)"
            ) from None


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, path).load()
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
    except MemoryError:  # a sound file that this process has no room for (`ulimit -v`, a small machine)
        raise UserError(
            f"{path}: out of memory while loading the data set, before any training: this process's memory "
            "(or its ulimit -v) is too small for the libraries and CIFAR-100 together; raise it"
        ) from None
    except Exception as e:  # any failure while decoding untrusted bytes means a bad file
        reason = f"{type(e).__name__}: {e}"
        raise UserError(f"{path}: not a readable CIFAR-100 pickle, truncated or corrupt ({reason})") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _require_keys(path: Path, d: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise UserError(f"{path}: missing key(s) {missing} (found {sorted(map(str, d))})")


def _labels(path: Path, d: dict, key: str, n: int, num_classes: int) -> torch.Tensor:
    try:
        arr = np.asarray(d[key])
    except (ValueError, TypeError):  # ragged or otherwise not array-like
        arr = None
    if arr is None or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or len(arr) != n:
        raise UserError(f"{path}: '{key}' must be a list of {n} integers (one per image)")
    if arr.min() < 0 or arr.max() >= num_classes:
        bad = arr[(arr < 0) | (arr >= num_classes)][0]
        raise UserError(f"{path}: '{key}' must lie in 0..{num_classes - 1}, found {bad}")
    return torch.from_numpy(arr.astype(np.int64))


def _read_split(path: Path) -> Split:
    d = _read_pickle(path)
    _require_keys(path, d, ("data", "fine_labels", "coarse_labels"))
    data = d["data"]
    is_array = isinstance(data, np.ndarray)
    if not (is_array and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        found = f"{data.dtype} array of shape {data.shape}" if is_array else type(data).__name__
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {found}")
    n = len(data)
    if n == 0:
        raise UserError(f"{path}: 'data' holds no images")
    # Each 3072-byte row is the R, G then B plane of a 32x32 image, row-major: a plain reshape.
    images = torch.from_numpy(np.require(data, requirements=["C", "W"])).reshape(n, 3, 32, 32)
    return Split(
        images=images,
        labels=_labels(path, d, "fine_labels", n, NUM_CLASSES),
        coarse=_labels(path, d, "coarse_labels", n, _NUM_COARSE),
    )


def _read_meta(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    d = _read_pickle(path)
    _require_keys(path, d, ("fine_label_names", "coarse_label_names"))
    names = []
    for key, count in (("fine_label_names", NUM_CLASSES), ("coarse_label_names", _NUM_COARSE)):
        value = d[key]
        if not (isinstance(value, (list, tuple)) and len(value) == count and all(isinstance(v, str) for v in value)):
            raise UserError(f"{path}: '{key}' must list {count} names")
        names.append(tuple(value))
    return names[0], names[1]


def _missing_message(folder: Path, missing: list[str]) -> str:
    return (
        f"CIFAR-100 not found: looked for {folder}/{{train,test,meta}} (missing: {', '.join(missing)}); "
        f"set data.download=true, or put the official archive's {FOLDER}/ folder under {folder.parent}, "
        f"or point data.root= at the folder that contains {FOLDER}/"
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(root: Path, url: str, md5: str | None) -> None:
    archive = root / ARCHIVE
    try:
        download_and_extract_archive(url, download_root=root, filename=ARCHIVE, md5=md5)
    except Exception as e:  # whatever the URL or archive did wrong, the user can fix it by hand
        reason = " ".join(str(e).split()) or type(e).__name__
        # torchvision reports a checksum mismatch only as "File not found or corrupted."
        if isinstance(e, RuntimeError) and md5 is not None and archive.is_file():
            reason = f"md5 of {archive} is {_md5(archive)}, expected {md5}"
        raise UserError(
            f"downloading CIFAR-100 from {url} failed ({reason}); put the official archive at {archive} "
            f"(data.download=true then checks and extracts it) or its extracted {FOLDER}/ folder under {root}"
        ) from e


@functools.cache
def _load_folder(folder: str) -> Cifar100:
    path = Path(folder)
    classes, superclasses = _read_meta(path / "meta")
    return Cifar100(_read_split(path / "train"), _read_split(path / "test"), classes, superclasses)


def load(root, download: bool = False, url: str = OFFICIAL_URL, md5: str | None = OFFICIAL_MD5["archive"]) -> Cifar100:
    """Load ``<root>/cifar-100-python/{train,test,meta}``, downloading the archive first if asked.

    The result is cached per resolved root for the life of the process, so callers share the
    same tensors and must not modify them in place. Raises ``UserError`` for missing, unsafe or
    malformed files and for a failed download.
    """
    root = Path(root).expanduser().resolve()
    folder = root / FOLDER
    missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if missing and download:
        _download(root, url, md5)
        missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if missing:
        raise UserError(_missing_message(folder, missing))
    return _load_folder(str(folder))


def validation_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into sorted (train, val) int64 tensors, stratified by label.

    Each class gives about ``val_size * class_count / N`` samples (largest remainder, so the
    total is exactly ``val_size``), chosen at random with ``seed``. ``val_size <= 0`` gives
    (all indices, empty).
    """
    labels = torch.as_tensor(labels)
    n = len(labels)
    everything = torch.arange(n, dtype=torch.int64)
    if val_size <= 0:
        return everything, torch.empty(0, dtype=torch.int64)
    if val_size >= n:
        raise UserError(f"validation size {val_size} must be smaller than the {n} training samples")
    _, class_of, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    share = val_size * counts
    quota = share // n
    # Hand the samples lost to flooring to the classes with the largest remainders.
    extra = val_size - int(quota.sum())
    quota[torch.argsort(share % n, descending=True, stable=True)[:extra]] += 1
    if bool((quota >= counts).any()):
        raise UserError(
            f"validation size {val_size} would leave a class with no training samples "
            f"(smallest class has {int(counts.min())})"
        )
    # Shuffle, then group by class (stable sort keeps the shuffle within each class).
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    order = order[torch.argsort(class_of[order], stable=True)]
    grouped = class_of[order]
    rank = everything - (torch.cumsum(counts, 0) - counts)[grouped]
    is_val = rank < quota[grouped]
    return order[~is_val].sort().values, order[is_val].sort().values


@dataclass(frozen=True)
class Splits:
    """Index tensors into the train set (train / val) and the test set."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def select_splits(dataset: Cifar100, cfg: DataConfig, seed: int) -> Splits:
    """Apply `data.val_size`, `data.train_limit` and `data.test_limit`: each a stratified, seeded
    choice of that many images (a limit at or above the split's size keeps it whole)."""
    train_idx, val_idx = validation_split(dataset.train.labels, cfg.val_size, seed)
    if 0 < cfg.train_limit < len(train_idx):
        _, keep = validation_split(dataset.train.labels[train_idx], cfg.train_limit, seed)
        train_idx = train_idx[keep]
    test_idx = torch.arange(dataset.test.labels.numel())
    if 0 < cfg.test_limit < len(test_idx):
        _, test_idx = validation_split(dataset.test.labels, cfg.test_limit, seed)
    return Splits(train_idx, val_idx, test_idx)


def held_out(dataset: Cifar100, splits: Splits, where: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The held-out splits a run scores, by name (val first, where one is held out): images and labels
    indexed once and moved to `where`."""
    test = {"test": (dataset.test.images[splits.test].to(where), dataset.test.labels[splits.test].to(where))}
    if not len(splits.val):
        return test
    return {"val": (dataset.train.images[splits.val].to(where), dataset.train.labels[splits.val].to(where)), **test}


def fine_to_coarse(dataset: Cifar100) -> np.ndarray:
    """Superclass of each of the 100 classes, read off the labelled images."""
    mapping = np.full(len(dataset.classes), -1, dtype=np.int64)
    for split in (dataset.train, dataset.test):
        mapping[split.labels.numpy()] = split.coarse.numpy()
    return mapping


def per_process_batch(global_batch: int, world: int, accum: int) -> int:
    """`data.batch_size` is the global batch per optimizer step; this is one process's micro-batch."""
    if global_batch % (world * accum):
        raise UserError(
            f"data.batch_size={global_batch} must be divisible by processes x train.grad_accum = {world} x {accum}"
        )
    return global_batch // (world * accum)


def verify(root) -> list[dict]:
    """Check train, test and meta under ``<root>/cifar-100-python`` and report one dict per file.

    Keys: file, ok (structure valid), problem, md5, official_md5, count (images, or None),
    per_class_ok (official 500/100 images per class, or None). Broken files are reported, not
    raised; only a missing data folder raises ``UserError``.
    """
    folder = Path(root).expanduser().resolve() / FOLDER
    if not folder.is_dir():
        raise UserError(_missing_message(folder, ["train", "test", "meta"]))
    report = []
    for name in ("train", "test", "meta"):
        path = folder / name
        entry = {
            "file": str(path),
            "ok": False,
            "problem": None,
            "md5": None,
            "official_md5": False,
            "count": None,
            "per_class_ok": None,
        }
        report.append(entry)
        if not path.is_file():
            entry["problem"] = "missing"
            continue
        entry["md5"] = _md5(path)
        entry["official_md5"] = entry["md5"] == OFFICIAL_MD5[name]
        try:
            if name == "meta":
                _read_meta(path)
            else:
                split = _read_split(path)
                entry["count"] = len(split.labels)
                per_class = torch.bincount(split.labels, minlength=NUM_CLASSES)
                entry["per_class_ok"] = bool((per_class == _OFFICIAL_PER_CLASS[name]).all())
        except UserError as e:
            entry["problem"] = str(e)
        entry["ok"] = entry["problem"] is None
    return report


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel/255 over uint8 (N, 3, H, W) images, in float64 chunks."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"expected non-empty uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(1024):  # bounds the float64 copy to ~25 MB for 32x32 images
        x = chunk.to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() / 3
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()
