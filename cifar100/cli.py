"""The command line: `cifar100 <command> [recipe=NAME] [key=value ...]`; `train.py` calls `main(["train", ...])`.

This is the only module that reads argv; every `UserError` below it becomes one line on
stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
import warnings

from cifar100.config import available_recipes, load_config, recipe_description, to_yaml
from cifar100.errors import UserError

USAGE = """usage: cifar100 <command> [recipe=NAME|PATH] [key=value ...]

commands:
  train     train a recipe (same as `python train.py ...`, or `accelerate launch train.py ...`)
  show      print the fully resolved config as YAML and exit
  recipes   list the recipes with a one-line description each
  data      data verify|stats|download [data.root=DIR]: check, describe or fetch CIFAR-100

examples:
  cifar100 show recipe=best optim.lr=0.1
  accelerate launch train.py recipe=best
"""


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """Separate `recipe=NAME` from the `key=value` overrides."""
    recipe, overrides = None, []
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.partition("=")[2]
        elif "=" not in arg:
            raise UserError(f"unexpected argument {arg!r}: arguments are recipe=NAME and key=value overrides")
        else:
            overrides.append(arg)
    return recipe, overrides


def cmd_train(args: list[str]) -> None:
    from cifar100.run import train  # heavy imports only when training

    recipe, overrides = split_args(args)
    train(load_config(recipe, overrides))


def cmd_show(args: list[str]) -> None:
    recipe, overrides = split_args(args)
    print(to_yaml(load_config(recipe, overrides)), end="")


def cmd_recipes(args: list[str]) -> None:
    if args:
        raise UserError("`cifar100 recipes` takes no arguments")
    recipes = available_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_description(path)}")


def cmd_data(args: list[str]) -> None:
    from cifar100 import data

    if not args or args[0] not in ("verify", "stats", "download"):
        raise UserError("usage: cifar100 data verify|stats|download [recipe=NAME] [data.root=DIR]")
    action, rest = args[0], args[1:]
    recipe, overrides = split_args(rest)
    cfg = load_config(recipe, overrides)
    if action == "verify":
        rows = data.verify(cfg.data.root)
        for row in rows:
            print(json.dumps(row))
        if not all(row["ok"] for row in rows):
            raise UserError(f"CIFAR-100 under {cfg.data.root} has problems (see above)")
        return
    dataset = data.load(cfg.data.root, download=cfg.data.download or action == "download")
    if action == "download":
        print(f"CIFAR-100 ready under {cfg.data.root}: {len(dataset.train.labels)} train, {len(dataset.test.labels)} test images")
        return
    mean, std = data.channel_stats(dataset.train.images)
    print(f"train images: {len(dataset.train.labels)}, test images: {len(dataset.test.labels)}")
    print(f"mean: [{', '.join(f'{m:.4f}' for m in mean)}]")
    print(f"std:  [{', '.join(f'{s:.4f}' for s in std)}]")


COMMANDS = {"train": cmd_train, "show": cmd_show, "recipes": cmd_recipes, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command = COMMANDS.get(argv[0])
    try:
        if command is None:
            raise UserError(f"unknown command {argv[0]!r}: choose one of {', '.join(COMMANDS)}")
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            command(argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
