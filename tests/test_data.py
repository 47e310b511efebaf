"""Tests for cifar100.data.cifar on tiny synthetic files in the official format and on the real data."""

import functools
import hashlib
import os
import pickle
import re
import shutil
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar100.data import cifar as data
from cifar100.errors import UserError

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _split_dict(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "batch_label": "synthetic batch",
        "filenames": [f"img_{i}.png" for i in range(n)],
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "fine_labels": [i % 100 for i in range(n)],
        "coarse_labels": [i % 20 for i in range(n)],
    }


def _meta_dict():
    return {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }


def _dump(path, obj, protocol=2):
    # Protocol 2 by default, like the official (Python 2) files.
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar(root, n_train=12, n_test=6, train=None, test=None, meta=None):
    """Write <root>/cifar-100-python/{train,test,meta}; return the folder."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    _dump(folder / "train", train if train is not None else _split_dict(n_train, seed=1))
    _dump(folder / "test", test if test is not None else _split_dict(n_test, seed=2))
    _dump(folder / "meta", meta if meta is not None else _meta_dict())
    return folder


def test_load_synthetic_shapes_and_pixels(tmp_path):
    train = _split_dict(12, seed=1)
    train["data"][0, 0] = 11  # R at (0, 0)
    train["data"][0, 1024] = 22  # G at (0, 0)
    train["data"][0, 2048 + 32 * 5 + 7] = 33  # B at row 5, column 7
    write_cifar(tmp_path, train=train)

    ds = data.load(tmp_path)

    assert ds.train.images.shape == (12, 3, 32, 32) and ds.test.images.shape == (6, 3, 32, 32)
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.is_contiguous()
    assert ds.train.labels.dtype == torch.int64 and ds.train.coarse.dtype == torch.int64
    images = ds.train.images
    assert (images[0, 0, 0, 0], images[0, 1, 0, 0], images[0, 2, 5, 7]) == (11, 22, 33)
    assert torch.equal(ds.train.images.reshape(12, -1), torch.from_numpy(train["data"]))
    assert ds.train.labels.tolist() == train["fine_labels"]
    assert ds.train.coarse.tolist() == train["coarse_labels"]
    assert ds.classes[:2] == ("fine_0", "fine_1") and len(ds.classes) == 100 and len(ds.superclasses) == 20


def test_load_is_cached_per_resolved_root(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "sub").mkdir()
    assert data.load(tmp_path) is data.load(f"{tmp_path}/sub/..")


class _Payload:
    """Unpickling this would call ``func(*args)``: what a malicious dataset file would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("kind", ["system", "open"])
def test_malicious_pickle_is_refused(tmp_path, kind):
    folder = write_cifar(tmp_path)
    pwned = tmp_path / "pwned"
    func, args = (os.system, (f"touch {pwned}",)) if kind == "system" else (open, (str(pwned), "w"))
    payload = _split_dict(4)
    payload["filenames"] = _Payload(func, *args)
    _dump(folder / "train", payload)

    with pytest.raises(UserError) as err:
        data.load(tmp_path)

    message = str(err.value)
    assert f"'{func.__module__}.{func.__name__}'" in message and "refused to unpickle" in message
    assert str(folder / "train") in message
    assert not pwned.exists()


def test_truncated_file(tmp_path):
    folder = write_cifar(tmp_path)
    blob = (folder / "train").read_bytes()
    (folder / "train").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="train: not a readable CIFAR-100 pickle, truncated or corrupt"):
        data.load(tmp_path)


def _missing_coarse():
    split = _split_dict(8)
    del split["coarse_labels"]
    return split


def _broken(**changes):
    split = _split_dict(8)
    split.update(changes)
    return split


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        (
            _broken(data=np.zeros((8, 3071), np.uint8)),
            r"'data' must be a uint8 array of shape \(N, 3072\), found uint8 array of shape \(8, 3071\)",
        ),
        (_broken(data=np.zeros((8, 3072), np.float32)), r"'data' must be a uint8 array .* found float32"),
        (_broken(fine_labels=[0] * 7 + [100]), r"'fine_labels' must lie in 0\.\.99, found 100"),
        (_broken(coarse_labels=[-1] + [0] * 7), r"'coarse_labels' must lie in 0\.\.19, found -1"),
        (_broken(fine_labels=[0] * 7), "'fine_labels' must be a list of 8 integers"),
        (_broken(fine_labels=["cat"] * 8), "'fine_labels' must be a list of 8 integers"),
        (_missing_coarse(), r"missing key\(s\) \['coarse_labels'\]"),
        ([1, 2, 3], "expected a pickled dict, found list"),
    ],
)
def test_malformed_split(tmp_path, split, expected):
    folder = write_cifar(tmp_path, test=split)
    with pytest.raises(UserError, match=expected) as err:
        data.load(tmp_path)
    assert str(folder / "test") in str(err.value)


def test_empty_split(tmp_path):
    folder = write_cifar(tmp_path)
    # Protocol 4: at protocol 2 Python 3 pickles empty bytes as a call to bytes(), which is refused.
    empty = _broken(data=np.zeros((0, 3072), np.uint8), fine_labels=[], coarse_labels=[])
    _dump(folder / "train", empty, protocol=4)
    with pytest.raises(UserError, match="train: 'data' holds no images"):
        data.load(tmp_path)


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({**_meta_dict(), "fine_label_names": ["x"] * 99}, "'fine_label_names' must list 100 names"),
        ({**_meta_dict(), "coarse_label_names": ["y"] * 21}, "'coarse_label_names' must list 20 names"),
        ({**_meta_dict(), "coarse_label_names": [b"y"] * 20}, "'coarse_label_names' must list 20 names"),
        ({"fine_label_names": ["x"] * 100}, r"missing key\(s\) \['coarse_label_names'\]"),
    ],
)
def test_malformed_meta(tmp_path, meta, expected):
    write_cifar(tmp_path, meta=meta)
    with pytest.raises(UserError, match=expected):
        data.load(tmp_path)


def test_missing_files_name_where_and_how(tmp_path):
    with pytest.raises(UserError) as err:
        data.load(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python") in message and "missing: train, test, meta" in message
    assert "data.download=true" in message and "data.root=" in message

    folder = write_cifar(tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(UserError, match="missing: meta"):
        data.load(tmp_path)


def test_download_without_network(tmp_path):
    url = "http://127.0.0.1:9/cifar-100-python.tar.gz"
    with pytest.raises(UserError) as err:
        data.load(tmp_path, download=True, url=url)
    message = str(err.value)
    assert url in message and str(tmp_path / "cifar-100-python.tar.gz") in message


@pytest.fixture
def archive(tmp_path):
    """A real tar.gz of a synthetic cifar-100-python/ folder served over HTTP on 127.0.0.1.

    Returns (url, md5). (torchvision's downloader cannot read file:// URLs.)
    """
    folder = write_cifar(tmp_path / "src")
    served = tmp_path / "served"
    served.mkdir()
    path = served / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    handler = functools.partial(QuietHandler, directory=str(served))
    with QuietServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_port}/{path.name}", hashlib.md5(path.read_bytes()).hexdigest()
        server.shutdown()
        thread.join()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that stops reading (a failed download) is what these tests make happen: no traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def test_download_and_extract(tmp_path, archive):
    url, md5 = archive
    ds = data.load(tmp_path / "dst", download=True, url=url, md5=md5)
    assert ds.train.images.shape == (12, 3, 32, 32)
    assert (tmp_path / "dst" / "cifar-100-python.tar.gz").is_file()


def test_download_with_wrong_md5(tmp_path, archive):
    url, md5 = archive
    with pytest.raises(UserError, match=f"{re.escape(url)} failed .*md5 .* is {md5}, expected 0{{32}}") as err:
        data.load(tmp_path / "dst", download=True, url=url, md5="0" * 32)
    assert f"put the official archive at {tmp_path / 'dst' / 'cifar-100-python.tar.gz'}" in str(err.value)


def test_archive_put_by_hand_needs_no_network(tmp_path, archive):
    _url, md5 = archive
    (tmp_path / "dst").mkdir()
    shutil.copy(tmp_path / "served" / "cifar-100-python.tar.gz", tmp_path / "dst")
    ds = data.load(tmp_path / "dst", download=True, url="http://127.0.0.1:9/cifar-100-python.tar.gz", md5=md5)
    assert ds.test.images.shape == (6, 3, 32, 32)


def test_verify_reports_broken_files_without_raising(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "test").write_bytes(b"not a pickle")
    (folder / "meta").unlink()

    train, test, meta = data.verify(tmp_path)

    assert train["ok"] and train["problem"] is None
    assert train["count"] == 12 and train["per_class_ok"] is False  # tiny, so not 500 per class
    assert train["md5"] == hashlib.md5((folder / "train").read_bytes()).hexdigest()
    assert not train["official_md5"]
    assert not test["ok"] and "not a readable CIFAR-100 pickle" in test["problem"] and test["count"] is None
    assert not meta["ok"] and meta["problem"] == "missing" and meta["file"] == str(folder / "meta")
    with pytest.raises(UserError, match=r"data.download=true"):
        data.verify(tmp_path / "nowhere")


def _expected_quota(counts, val_size):
    n = sum(counts)
    return [val_size * c / n for c in counts]


def test_validation_split_stratified():
    # Uneven classes: class c has 20 + c samples, shuffled.
    labels = torch.cat([torch.full((20 + c,), c) for c in range(10)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    counts = torch.bincount(labels).tolist()

    train, val = data.validation_split(labels, 37, seed=1)

    assert train.dtype == val.dtype == torch.int64 and len(val) == 37
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(labels)))
    for got, exact in zip(torch.bincount(labels[val], minlength=10).tolist(), _expected_quota(counts, 37)):
        assert abs(got - exact) < 1
    same_train, same_val = data.validation_split(labels, 37, seed=1)
    assert torch.equal(same_val, val) and torch.equal(same_train, train)
    assert not torch.equal(data.validation_split(labels, 37, seed=2)[1], val)


def test_validation_split_balanced_and_edges():
    labels = torch.arange(100).repeat(50)
    _, val = data.validation_split(labels, 1000, seed=0)
    assert torch.bincount(labels[val]).tolist() == [10] * 100

    train, val = data.validation_split(labels, 0, seed=0)
    assert torch.equal(train, torch.arange(5000)) and len(val) == 0
    with pytest.raises(UserError, match="smaller than the 5000"):
        data.validation_split(labels, 5000, seed=0)
    with pytest.raises(UserError, match="no training samples"):
        data.validation_split(torch.tensor([0, 0, 0, 0, 1]), 3, seed=0)


def test_channel_stats_exact_on_small_input():
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(3).reshape(2, 3, 1, 1)
    mean, std = data.channel_stats(images.expand(2, 3, 4, 4).contiguous())
    assert mean == pytest.approx([0.5] * 3) and std == pytest.approx([0.5] * 3)


real = pytest.mark.skipif(
    not (REAL_ROOT / "cifar-100-python").is_dir(),
    reason=f"real CIFAR-100 not found at {REAL_ROOT}/cifar-100-python",
)


@real
def test_real_data():
    ds = data.load(REAL_ROOT)
    assert ds.train.images.shape == (50000, 3, 32, 32) and ds.test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train.labels).tolist() == [500] * 100
    assert torch.bincount(ds.test.labels).tolist() == [100] * 100
    assert torch.bincount(ds.train.coarse).tolist() == [2500] * 20
    assert ds.classes[0] == "apple" and ds.superclasses[0] == "aquatic_mammals"

    mean, std = data.channel_stats(ds.train.images)
    assert mean == pytest.approx([0.5071, 0.4865, 0.4409], abs=5e-5)
    assert std == pytest.approx([0.2673, 0.2564, 0.2762], abs=5e-5)


@real
def test_real_verify():
    train, test, meta = data.verify(REAL_ROOT)
    assert meta["ok"] and meta["official_md5"] and meta["md5"] == data.OFFICIAL_MD5["meta"]
    for entry, count in ((train, 50000), (test, 10000)):
        assert entry["ok"] and entry["problem"] is None and not entry["official_md5"]
        assert entry["count"] == count and entry["per_class_ok"]
