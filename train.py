"""`python train.py recipe=NAME [key=value ...]`, or the same under `accelerate launch`."""

import sys

from cifar100.cli import main
from cifar100.training.budget import process_started

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], started=process_started()))
