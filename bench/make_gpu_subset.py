"""Write a CIFAR-100 subset in the official format small enough to travel to a lent GPU machine.

Usage: python bench/make_gpu_subset.py SRC_ROOT DST_ROOT [TRAIN_N] [TEST_N]  (stratified, seeded)
"""

import pickle
import sys
from pathlib import Path

from cifar100.data.cifar import load, validation_split


def main(src: str, dst: str, train_n: int = 15000, test_n: int = 2000) -> None:
    data = load(src)
    out = Path(dst) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    for name, split, n in (("train", data.train, train_n), ("test", data.test, test_n)):
        idx = validation_split(split.labels, n, 0)[1]
        rows = {
            "data": split.images[idx].reshape(len(idx), -1).numpy(),
            "fine_labels": split.labels[idx].tolist(),
            "coarse_labels": split.coarse[idx].tolist(),
            "filenames": [f"{i}.png" for i in idx.tolist()],
            "batch_label": f"subset of {name}",
        }
        (out / name).write_bytes(pickle.dumps(rows, protocol=4))
    meta = {"fine_label_names": list(data.classes), "coarse_label_names": list(data.superclasses)}
    (out / "meta").write_bytes(pickle.dumps(meta, protocol=4))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
