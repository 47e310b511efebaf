"""The command line: `cifar100 <command> [recipe=NAME] [key=value ...]`; `train.py` calls `main(["train", ...])`.

This is the only module that reads argv; every `UserError` below it becomes one line on
stderr and exit status 2.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml

from cifar100.allocator import keep_freed_memory
from cifar100.config import (
    Config,
    available_recipes,
    from_dict,
    load_config,
    parse_duration,
    parse_yaml,
    recipe_description,
    rules,
    to_dict,
    to_yaml,
    whole_number,
)
from cifar100.errors import UserError, clip, shown
from cifar100.preemption import INTERRUPTED_EXIT, PREEMPTED_EXIT, Preempted
from cifar100.training.budget import process_started

USAGE = """usage: cifar100 <command> [recipe=NAME|PATH] [key=value ...]

commands:
  train     train a recipe (same as `python train.py ...`, or `accelerate launch train.py ...`)
  show      print the fully resolved config as YAML and exit
  recipes   list the recipes with a one-line description each
  data      data verify|stats|download [data.root=DIR]: check, describe or fetch CIFAR-100
  eval      eval run=FOLDER [checkpoint=best|last|PATH] [eval.tta=flip] [weights=ema] [key=value ...]: per-class
            and per-superclass accuracy, confused pairs, confusion matrix; writes eval-<checkpoint>.json/.md;
            weights=ema scores a checkpoint's averaged weights (train.ema)
  predict   predict run=FOLDER [checkpoint=best|last|PATH] [weights=ema] [eval.tta=flip] [topk=5]
            [out=FILE.csv|FILE.json] IMAGE_OR_FOLDER ...: top-k classes and the superclass of image
            files (PNG, JPEG, WebP, BMP, GIF); model=FILE.onnx|FILE.pt2 instead of run= takes an export
  export    export run=FOLDER [checkpoint=best|last|PATH] [weights=ema] [format=onnx|pt2|all] [out=DIR]:
            an ONNX file and a torch.export program (.pt2), each checked against PyTorch on test images,
            and a JSON of the normalisation and class names (default out: <run>/export)
  bench     bench step|data|recipe|checkpoint [recipe=NAME] [steps=N] [compile=MODE,...] [json=PATH]:
            measured images/s of the training step (precision, channels_last, compile modes; MFU,
            graph breaks; profile=PATH for its top kernels), the input pipelines, a projection, and
            the seconds a checkpoint holds training up
  report    report FOLDER|GLOB ... [out=FOLDER] [wandb=true]: compare runs (seeds as mean ± std) in
            FOLDER (default report/): report.md and a self-contained report.html; wandb=true also
            builds a W&B Report; of a search's folder (cifar100 tune): its report.md and halving.png
  sweep     sweep FILE [run|task=I] [key=value ...]: list a sweep's runs (every config checked), train
            them here one after another (finished ones skipped, unfinished continued), or print array
            task I's train.py arguments (launch/slurm/sweep.sbatch)
  tune      tune FILE budget=DURATION [trials=N] [parallel=N] [--plan] [key=value ...]: successive
            halving over a search file within a budget of process time, each rung scored after a
            cooldown branch on a validation split; --plan prints the plan only (docs/tuning.md)

train takes seeds=[0,1,2] to run the recipe once per seed, into <name>-s<seed> folders.

examples:
  cifar100 show recipe=best optim.lr=0.1
  accelerate launch train.py recipe=best
  python train.py recipe=smoke seeds=[0,1] && cifar100 report runs/smoke-s*
  cifar100 eval run=runs/smoke-s0 checkpoint=last eval.tta=flip
  cifar100 export run=runs/cpu && cifar100 predict model=runs/cpu/export/cpu-best.onnx photos/
"""


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """Separate `recipe=NAME` from the `key=value` overrides."""
    recipe, overrides = None, []
    for arg in args:
        if arg.startswith("recipe="):
            if recipe is not None:
                raise UserError(f"recipe= is given twice (recipe={shown(recipe)} and {shown(arg)}): give it once")
            recipe = arg.partition("=")[2]
        elif "=" not in arg:
            raise UserError(f"unexpected argument {shown(arg)}: arguments are recipe=NAME and key=value overrides")
        else:
            overrides.append(arg)
    return recipe, overrides


def take(args: list[str], key: str) -> tuple[str | None, list[str]]:
    """Pull the command's own `key=value` out of the arguments: (its value or None, the rest)."""
    value, rest = None, []
    for arg in args:
        if arg.startswith(key + "="):
            if value is not None:
                raise UserError(f"{key}= is given twice ({key}={shown(value)} and {shown(arg)}): give it once")
            value = arg.partition("=")[2]
        else:
            rest.append(arg)
    return value, rest


def parse_seeds(text: str) -> list[int]:
    """`[0,1,2]` -> [0, 1, 2]: a non-empty list of distinct integers."""
    try:
        seeds = parse_yaml(text)
    except yaml.YAMLError:
        seeds = None
    if (
        not isinstance(seeds, list)
        or not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise UserError(f"seeds={clip(text)}: expected a list of distinct integers, e.g. seeds=[0,1,2]")
    return seeds


def seed_configs(cfg: Config, seeds: list[int], text: str) -> list[Config]:
    """One config per seed, named `<name>-s<seed>`, each checked by the config's own rules before any run starts."""
    try:
        return [from_dict({**to_dict(cfg), "seed": s, "name": f"{cfg.name}-s{s}"}) for s in seeds]
    except UserError as err:
        raise UserError(f"seeds={clip(text)}: {err}") from None


def cmd_train(args: list[str], started: float) -> None:
    seeds_text, args = take(args, "seeds")
    recipe, overrides = split_args(args)
    cfg = load_config(recipe, wandb_environment(overrides) + overrides)
    seeds = None if seeds_text is None else parse_seeds(seeds_text)
    from cifar100.training.trainer import train  # heavy imports only when the arguments are good

    if seeds is None:
        train(cfg, counted_from=started)
        return
    if any(o.startswith("seed=") for o in overrides):
        raise UserError("give seed=N for one run or seeds=[...] for several, not both")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each run ends its process group, so a second run cannot follow in the same launch.
        raise UserError(
            f"seeds= runs one seed after another in one process; under a distributed launch start one "
            f"launch per seed: for s in {' '.join(map(str, seeds))}; do accelerate launch ... train.py "
            f"<the same arguments> seed=$s name={cfg.name}-s$s; done"
        )
    # Each seed's budget counts from its own start: the first's with the command, the others' when called.
    configs = seed_configs(cfg, seeds, seeds_text or "")
    run_dirs = [train(config, counted_from=started if i == 0 else None) for i, config in enumerate(configs)]
    print(f"{len(seeds)} seeds done; compare them: cifar100 report {' '.join(shlex.quote(str(d)) for d in run_dirs)}")


def checkpoint_args(command: str, args: list[str], *extra: str) -> tuple[dict[str, str | None], list[str]]:
    """What eval, predict and export take alike: run=, checkpoint=, weights= and the command's `extra`
    names, then key=value overrides; recipe= is refused, as the checkpoint's own config is used."""
    named: dict[str, str | None] = {}
    for key in ("run", "checkpoint", "weights", *extra):
        named[key], args = take(args, key)
    recipe, overrides = split_args(args)
    if recipe is not None:
        raise UserError(
            f"{command} takes the config the checkpoint was trained with: drop recipe= (key=value still overrides)"
        )
    return named, overrides


def cmd_eval(args: list[str]) -> None:
    from cifar100.commands.evaluation import run_eval  # heavy imports only when evaluating
    from cifar100.training.runtime import fresh_process_state

    named, overrides = checkpoint_args("eval", args)
    run, checkpoint, which = named["run"], named["checkpoint"], named["weights"]
    if run is None and checkpoint is None:
        raise UserError(
            "usage: cifar100 eval run=FOLDER [checkpoint=best|last|PATH] [eval.tta=flip] [weights=ema] [key=value ...]"
        )
    with fresh_process_state():
        run_eval(run, checkpoint or "best", overrides, which or "model")


def cmd_predict(args: list[str]) -> None:
    from cifar100.commands.predict import run_predict  # heavy imports only when predicting
    from cifar100.training.runtime import fresh_process_state

    # An argument is an image or folder when it has no `=`, or when it names one that exists.
    inputs = [a for a in args if "=" not in a or os.path.exists(a)]
    rest = [a for a in args if a not in inputs]
    named, overrides = checkpoint_args("predict", rest, "model", "topk", "out", "timeout")
    if not inputs:
        raise UserError(
            "usage: cifar100 predict run=FOLDER|model=FILE.onnx|FILE.pt2 [checkpoint=best|last|PATH] [weights=ema] "
            "[eval.tta=flip] [topk=5] [out=FILE.csv|FILE.json] [timeout=SECONDS] IMAGE_OR_FOLDER ..."
        )
    which, topk, timeout = named.pop("weights"), named.pop("topk"), named.pop("timeout")
    with fresh_process_state():
        run_predict(overrides=overrides, inputs=inputs, which=which, topk_text=topk, timeout_text=timeout, **named)


def cmd_export(args: list[str]) -> None:
    from cifar100.commands.export import run_export  # heavy imports only when exporting

    named, overrides = checkpoint_args("export", args, "format", "out")
    run, checkpoint, which, fmt, out = (named[k] for k in ("run", "checkpoint", "weights", "format", "out"))
    if run is None and checkpoint is None:
        raise UserError(
            "usage: cifar100 export run=FOLDER [checkpoint=best|last|PATH] [weights=ema] [format=onnx|pt2|all] "
            "[out=DIR]"
        )
    run_export(run, checkpoint or "best", which or "model", fmt or "all", out, overrides)


def cmd_report(args: list[str]) -> None:
    from cifar100.commands.report import make_report
    from cifar100.commands.report_page import markdown_table, table

    paths, own = [], []
    for arg in args:
        # A folder's name may hold '=' (a sweep's runs are named after their overrides): a path that
        # exists, or a glob that matches, is a folder; otherwise out= and wandb= are the report's own.
        if Path(arg).exists() or (glob.has_magic(arg) and glob.glob(arg)):
            paths.append(arg)
        elif arg.partition("=")[0] in ("out", "wandb"):
            own.append(arg)
        elif "=" in arg:
            raise UserError(
                f"unexpected argument {shown(arg)}: no such run folder, and report takes run folders or "
                "globs, out=FOLDER and wandb=true"
            )
        else:
            paths.append(arg)  # named as missing, with the other skipped paths
    out, own = take(own, "out")
    publish, own = take(own, "wandb")
    if len(paths) == 1 and not own and out is None and publish is None:
        from cifar100.commands.tune.report import is_search, write_report

        if is_search(Path(paths[0])):
            print(f"search report: {write_report(Path(paths[0]))} and {Path(paths[0]) / 'halving.png'}")
            return
    if not paths:
        raise UserError("usage: cifar100 report FOLDER|GLOB ... [out=FOLDER] [wandb=true]")
    if publish not in (None, "true", "false"):
        raise UserError(f"wandb={clip(publish)}: expected true or false")
    md, columns, skipped = make_report(paths, Path(out or "report"))
    for note in skipped:
        print(f"skipped {note}")
    runs = sum(len(c.runs) for c in columns)
    print(f"{runs} run(s) in {len(columns)} column(s): {md} and {md.with_suffix('.html')}")
    if publish == "true":
        from cifar100.commands.wandb_report import publish as publish_report

        print(
            publish_report(
                columns,
                markdown_table(table(columns), columns),
                "cifar100 report " + " ".join(shlex.quote(a) for a in args),
            )
        )


def cmd_sweep(args: list[str], started: float) -> None:
    from cifar100.commands import sweep

    if not args or ("=" in args[0] and not Path(args[0]).is_file()):
        raise UserError("usage: cifar100 sweep FILE [run|task=I] [key=value ...]")
    run = args[1:2] == ["run"]
    task, overrides = take(args[1 + run :], "task")
    if run and task is not None:
        raise UserError("give run (train every run here) or task=I (one array task's arguments), not both")
    if run and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "sweep FILE run trains one run after another in one process; under a distributed launch "
            "start one launch per run with the arguments `cifar100 sweep FILE task=I` prints"
        )
    # The runs trained here take W&B's environment; a task's printed arguments leave it to the node's.
    plan = sweep.load_sweep(args[0], (wandb_environment(overrides) if run else []) + overrides)
    if task is not None:
        print("\n".join(sweep.task_args(plan, task)))
    elif run:
        folders = sweep.run_all(plan, started)
        print(
            f"sweep {plan.name}: {len(folders)} runs done; compare them: cifar100 report "
            + " ".join(shlex.quote(str(f)) for f in folders)
        )
    else:
        print(sweep.listing(plan))


def cmd_tune(args: list[str]) -> None:
    from cifar100.commands.tune import controller
    from cifar100.commands.tune.searchfile import load_search

    plan_only = "--plan" in args
    args = [a for a in args if a != "--plan"]
    if not args or ("=" in args[0] and not Path(args[0]).is_file()):
        raise UserError("usage: cifar100 tune FILE budget=DURATION [trials=N] [parallel=N] [--plan] [key=value ...]")
    budget, rest = take(args[1:], "budget")
    trials, rest = take(rest, "trials")
    parallel, rest = take(rest, "parallel")
    on_slurm, rest = take(rest, "slurm")  # launch/slurm/tune.sbatch: this is the controller's job
    options, rest = take(rest, "sbatch")  # for the jobs the controller submits
    rung, rest = take(rest, "rung")  # launch/slurm/tune-trial.sbatch: an array task of this rung ...
    trial, rest = take(rest, "trial")  # ... for this trial
    rest = [a for a in rest if a != "resume=auto"]  # a search always continues its folder
    if budget is None:
        raise UserError("tune needs budget=DURATION (e.g. budget=8h): the process time the whole search may spend")
    seconds = parse_duration("budget", budget)
    search = load_search(args[0])
    if on_slurm not in (None, "true", "false"):
        raise UserError(f"slurm={clip(on_slurm)}: expected true or false")
    task = (rung is not None) + (trial is not None)
    if task == 1 or (task and on_slurm):
        raise UserError("rung= and trial= go together, from launch/slurm/tune-trial.sbatch only")
    found = controller.open_search(
        search,
        budget,
        seconds,
        None if trials is None else whole_number("trials", trials, 1),
        wandb_environment(rest) + rest,
        1 if parallel is None else whole_number("parallel", parallel, 1),
        plan_only,
        existing=bool(task),
    )
    if found is None:
        return
    if task:
        from cifar100.commands.tune import slurm

        slurm.run_task(found, whole_number("rung", rung or ""), whole_number("trial", trial or ""))
    elif on_slurm == "true":
        from cifar100.commands.tune import slurm

        command = [args[0], f"budget={budget}", *([f"trials={trials}"] if trials else [])]
        command += [*([f"sbatch={options}"] if options else []), *rest]
        slurm.run_controller(found, command, options or "")
    else:
        controller.run(found)


def cmd_show(args: list[str]) -> None:
    recipe, overrides = split_args(args)
    print(to_yaml(load_config(recipe, wandb_environment(overrides) + overrides)), end="")


def cmd_recipes(args: list[str]) -> None:
    if args:
        raise UserError("`cifar100 recipes` takes no arguments")
    from cifar100.training.models import recipe_flops

    recipes = available_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        cfg = load_config(name, [])
        per_image, total = recipe_flops(cfg)
        print(f"{name:<{width}}  {recipe_description(path)}")
        print(f"{'':<{width}}  reached: {cfg.reached or 'not recorded'}")
        print(
            f"{'':<{width}}  cost: {per_image / 1e9:.3g} GFLOP per 32-px image forward; {cfg.train.epochs} "
            f"epochs{' (the cap: a budget plans fewer)' if cfg.train.budget != 'none' else ''} "
            f"≈ {total / 1e15:.3g} PFLOP of training (forward and backward, 3x forward)"
        )


def cmd_data(args: list[str]) -> None:
    from cifar100.data import cifar as data

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
        print(
            f"CIFAR-100 ready under {cfg.data.root}: {len(dataset.train.labels)} train, "
            f"{len(dataset.test.labels)} test images"
        )
        return
    mean, std = data.channel_stats(dataset.train.images)
    print(f"train images: {len(dataset.train.labels)}, test images: {len(dataset.test.labels)}")
    print(f"mean: [{', '.join(f'{m:.4f}' for m in mean)}]")
    print(f"std:  [{', '.join(f'{s:.4f}' for s in std)}]")


def cmd_bench(args: list[str]) -> None:
    from cifar100.commands import bench
    from cifar100.training.runtime import fresh_process_state

    if not args or args[0] not in ("step", "data", "recipe", "checkpoint"):
        raise UserError(
            "usage: cifar100 bench step|data|recipe|checkpoint [recipe=NAME] [key=value ...] "
            "[steps=N] [warmup=N] [batches=N] [compile=false|true|MODE,...] [eager=false] "
            "[profile=TRACE.json.gz] [json=PATH]"
        )
    numbers = {}
    rest = args[1:]
    for key, default in (("steps", 20), ("warmup", 5), ("batches", 30)):
        text, rest = take(rest, key)
        numbers[key] = default if text is None else whole_number(key, text, low=0 if key == "warmup" else 1)
    json_path, rest = take(rest, "json")
    profile_path, rest = take(rest, "profile")
    modes, rest = take(rest, "compile")
    eager, rest = take(rest, "eager")
    if eager not in (None, "true", "false"):
        raise UserError(f"eager={clip(eager)}: expected true or false")
    recipe, overrides = split_args(rest)
    with fresh_process_state():
        bench.main(
            args[0],
            load_config(recipe, overrides),
            json_path=json_path,
            compile_modes=bench.compile_modes(modes),
            eager_grid=eager != "false",
            profile_path=profile_path,
            **numbers,
        )


# W&B's documented variables, and the keys they set when the command line does not: over a recipe's
# values and the defaults, under a `log.wandb.*` the user typed (as W&B's own settings rank them).
WANDB_ENVIRONMENT = {
    "WANDB_MODE": "log.wandb.mode",
    "WANDB_PROJECT": "log.wandb.project",
    "WANDB_ENTITY": "log.wandb.entity",
    "WANDB_DIR": "log.wandb.dir",
}
WANDB_MODES = {"dryrun": "offline", "run": "online"}  # W&B's older names, which it still takes


def wandb_environment(overrides: list[str]) -> list[str]:
    """The `log.wandb.*=value` overrides W&B's environment variables make, for keys `overrides` leave unset."""
    given = {o.partition("=")[0] for o in overrides}
    out = []
    for variable, key in WANDB_ENVIRONMENT.items():
        value = os.environ.get(variable, "")
        if not value or given & {key, "log.wandb", "log"}:
            continue
        if variable == "WANDB_MODE":
            value = WANDB_MODES.get(value, value)
            choices = rules(key)["choices"]
            if value not in choices:
                raise UserError(f"{variable}={shown(value)} (in the environment): expected {', '.join(choices)}")
        out.append(f"{key}={value}")
    return out


COMMANDS: dict[str, Callable[..., None]] = {
    "train": cmd_train,
    "show": cmd_show,
    "recipes": cmd_recipes,
    "data": cmd_data,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "export": cmd_export,
    "report": cmd_report,
    "bench": cmd_bench,
    "sweep": cmd_sweep,
    "tune": cmd_tune,
}


TRAINING = (cmd_train, cmd_sweep)  # the commands that train, and whose budgets count from `started`


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input). A training's `train.budget`
    counts from `started` (a `time.perf_counter` value; the entry points pass the process's start),
    else from this call."""
    started = time.perf_counter() if started is None else started
    keep_freed_memory()  # before any tensor: every way a run starts (train.py, accelerate, Slurm, the image) comes here
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help") or any(a in ("-h", "--help") for a in argv[1:]):
        print(USAGE, end="")
        return 0
    command = COMMANDS.get(argv[0])
    try:
        if command is None:
            raise UserError(f"unknown command {shown(argv[0])}: choose one of {', '.join(COMMANDS)}")
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _one_line_warning
            command(argv[1:], started) if command in TRAINING else command(argv[1:])
    except UserError as err:
        _report(f"error: {clip(str(err), MAX_MESSAGE)}")
        return 2
    except Preempted as err:
        what = "preempted" if err.status == PREEMPTED_EXIT else "interrupted"
        _report(f"{what}: {err}; continue with the same command plus resume=auto")
        return err.status
    except KeyboardInterrupt:
        # Ctrl-C before training installed its handler (or after it ended): nothing to save.
        _report("interrupted")
        return INTERRUPTED_EXIT
    except OSError as err:
        if not err.filename:
            raise  # not about a path the user gave: a traceback helps more
        # A path that cannot be made, read or written: often on one rank only, so every rank says it.
        where = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
        text = str(err) if err.filename2 or not err.strerror else f"{err.filename}: {err.strerror}"
        print(f"error: {where}{clip(text, MAX_MESSAGE)}", file=sys.stderr, flush=True)
        return 2
    return 0


MAX_MESSAGE = 1000  # the longest error line: every value in it is cut to a few hundred characters already


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {clip(str(message), MAX_MESSAGE)}", file=sys.stderr, flush=True)


def _report(line: str) -> None:
    # Under DDP every rank raises the same error; one copy is enough.
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main(started=process_started()))
