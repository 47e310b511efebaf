"""`python -m cifar100 ...` is the `cifar100` command."""

from cifar100.cli import entry

entry()
