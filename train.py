"""`python train.py recipe=NAME [key=value ...]`, or the same under `accelerate launch`."""

import sys

from cifar100.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
