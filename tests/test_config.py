"""Recipes, inheritance, overrides and every config error message."""

from __future__ import annotations

import dataclasses
import re
import sys
import typing

import pytest
import yaml
from conftest import run_cmd

from cifar100.cli import main
from cifar100.config import Config, apply_overrides, available_recipes, load_config, rules, to_yaml
from cifar100.errors import UserError


def test_defaults_without_recipe():
    cfg = load_config(None, [])
    assert cfg == Config()


def test_overrides_parse_yaml_scalars_and_flow_lists():
    assert load_config("best", ["optim.lr=1e-3"]).optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    cfg = load_config(
        "best",
        [
            "optim.lr=0.05",
            "augment.mean=[0.5,0.5,0.5]",
            "augment.cutmix.prob=0.5",
            "train.clip_grad=1",
            "model.act=null",
            "name=2024",
        ],
    )
    assert cfg.optim.lr == 0.05
    assert cfg.augment.mean == (0.5, 0.5, 0.5)
    assert cfg.augment.cutmix.prob == 0.5 and cfg.augment.cutmix.alpha == 1.0  # sibling kept
    assert cfg.train.clip_grad == 1.0 and isinstance(cfg.train.clip_grad, float)
    assert cfg.model.act is None
    assert cfg.name == "2024"


def test_base_inheritance_chain():
    exp1, exp2, exp3 = (load_config(n, []) for n in ("exp1", "exp2", "exp3"))
    assert exp2.model.name == exp1.model.name == "resnet50"  # inherited from exp1
    assert exp2.augment.mean == (0.5, 0.5, 0.5)  # inherited, then changed by exp3
    assert exp3.augment.autoaugment == "cifar10"  # from exp2
    assert (exp1.name, exp2.name, exp3.name) == ("exp1", "exp2", "exp3")  # name is per recipe


def test_recipe_from_path_with_relative_base(tmp_path):
    (tmp_path / "parent.yaml").write_text("optim: {lr: 0.3}\ntrain: {epochs: 7}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain: {epochs: 9}\n")
    cfg = load_config(str(tmp_path / "child.yaml"), [])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.name) == (0.3, 9, "child")
    (tmp_path / "named.yaml").write_text("base: best\ntrain: {epochs: 3}\n")
    assert load_config(str(tmp_path / "named.yaml"), []).model.name == "seresnet50"


def test_resolved_yaml_round_trips():
    cfg = load_config("best", ["optim.lr=0.15"])
    again = load_config(None, [f"{k}={v}" for k, v in _flatten(yaml.safe_load(to_yaml(cfg))).items()])
    assert again == cfg


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
    return out


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean optim.lr"),
        ("lr=0.1", "did you mean optim.lr?"),
        ("augment.cutmx.prob=1", "did you mean augment.cutmix"),
        ("optim.lr=fast", "optim.lr='fast': expected float, got str"),
        ("train.epochs=2.5", "train.epochs=2.5: expected int, got float"),
        ("train.channels_last=maybe", "train.channels_last='maybe': expected bool, got str"),
        ("augment.mean=[0.5,x,0.5]", "augment.mean=[0.5, 'x', 0.5]: expected list of float"),
        ("optim.name=lamb", "optim.name='lamb': expected one of sgd, adam, nadam, adamw"),
        ("train.precision=fp8", "expected one of no, fp16, bf16"),
        ("augment.cutmix=1", "augment.cutmix must be a mapping"),
        ("novalue", "expected key=value, got 'novalue'"),
        ("optim.lr=[1", "cannot parse the value of optim.lr"),
        ("train.grad_accum=0", "train.grad_accum=0: must be at least 1"),
        ("data.eval_batch_size=0", "data.eval_batch_size=0: must be at least 1"),
        ("train.epochs=0", "train.epochs=0: must be at least 1"),
        ("seed=-1", "seed=-1: must be at least 0"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError) as err:
        load_config("best", [override])
    assert message in str(err.value)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(UserError) as err:
        load_config("bset", [])
    assert "unknown recipe 'bset'" in str(err.value)
    for name in ("best", "cpu", "exp1", "exp2", "exp3", "smoke"):
        assert name in str(err.value)


def test_base_loop_and_bad_yaml_are_caught(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="recipe inheritance loops: a -> b -> a"):
        load_config(str(tmp_path / "a.yaml"), [])
    (tmp_path / "bad.yaml").write_text("optim: {lr: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"), [])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="a recipe must be a mapping"):
        load_config(str(tmp_path / "list.yaml"), [])
    (tmp_path / "typo.yaml").write_text("optim: {moment: 0.9}\n")
    with pytest.raises(UserError, match=r"did you mean optim.momentum"):
        load_config(str(tmp_path / "typo.yaml"), [])


def test_every_recipe_loads_and_has_a_description():
    recipes = available_recipes()
    assert {"exp1", "exp2", "exp3", "best", "smoke", "cpu"} <= set(recipes)
    for name in recipes:
        assert load_config(name, []).description


# The report's table (../shared/seed-report.md), column by column.
REPORT = {
    "exp1": dict(
        batch=128,
        hflip=0.5,
        aa="none",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        cutmix=0.0,
        model="resnet50",
        act=None,
        optim="sgd",
        sched="cosine",
        warmup=0,
    ),
    "exp2": dict(
        batch=512,
        hflip=0.5,
        aa="cifar10",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        cutmix=0.0,
        model="resnet50",
        act=None,
        optim="adam",
        sched="cosine",
        warmup=0,
    ),
    "exp3": dict(
        batch=512,
        hflip=0.8,
        aa="cifar10",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        cutmix=1.0,
        model="resnet50",
        act=None,
        optim="nadam",
        sched="cosine",
        warmup=0,
    ),
    "best": dict(
        batch=512,
        hflip=0.5,
        aa="cifar10",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        cutmix=1.0,
        model="seresnet50",
        act="mish",
        optim="sgd",
        sched="cosine",
        warmup=5,
    ),
}


@pytest.mark.parametrize("name", list(REPORT))
def test_seed_recipes_match_the_report(name):
    want, cfg = REPORT[name], load_config(name, [])
    assert cfg.data.batch_size == want["batch"]
    assert cfg.augment.crop_padding == 4
    assert cfg.augment.hflip == want["hflip"]
    assert cfg.augment.autoaugment == want["aa"]
    assert cfg.augment.mean == want["mean"] and cfg.augment.std == want["std"]
    assert cfg.augment.cutmix.prob == want["cutmix"] and cfg.augment.mixup.prob == 0.0
    if want["cutmix"]:
        assert cfg.augment.cutmix.alpha == 1.0  # note 2: Beta(1, 1)
    assert (cfg.model.name, cfg.model.act) == (want["model"], want["act"])
    assert cfg.optim.name == want["optim"]
    assert cfg.sched.name == want["sched"] and cfg.sched.warmup_epochs == want["warmup"]


def test_best_recipe_details_from_the_report_notes():
    cfg = load_config("best", [])
    assert cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.9  # note 3: warmup ends at 0.2
    assert cfg.sched.warmup_lr == 1e-4
    assert cfg.train.epochs == 200


def test_show_prints_yaml_and_errors_exit_2_with_one_line(cli):
    shown = cli("show", "recipe=best", "optim.lr=0.1")
    assert shown.returncode == 0, shown.stderr
    data = yaml.safe_load(shown.stdout)
    assert data["model"] == {
        "name": "seresnet50",
        "act": "mish",
        "cifar_stem": True,
        "drop_rate": 0.0,
        "whiten": False,
        "init": "default",
    }
    assert data["optim"]["lr"] == 0.1
    for args, text in [
        (("show", "recipe=nope"), "unknown recipe 'nope'"),
        (("show", "recipe=best", "optim.lrr=1"), "did you mean optim.lr?"),
        (("show", "recipe=best", "optim.lr=x"), "expected float"),
        (("frobnicate",), "unknown command 'frobnicate'"),
    ]:
        bad = cli(*args)
        assert bad.returncode == 2
        assert bad.stderr.count("\n") == 1 and text in bad.stderr and "Traceback" not in bad.stderr


def test_recipes_command_lists_descriptions(cli):
    out = cli("recipes")
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if not line.startswith(" ")}
    assert "81.45" in lines["best"] and "68" in lines["exp1"]
    text = out.stdout
    best = text[text.index("best ") : text.index("cpu ")]
    assert "reached: 81.45 % in the report" in best
    assert "cost: 2.6 GFLOP per 32-px image forward; 200 epochs ≈ 78 PFLOP" in best
    fast = text[text.index("fast ") : text.index("smoke ")]
    assert "cost: 0.437 GFLOP per 32-px image forward; 10 epochs ≈ 0.432 PFLOP" in fast  # its sizes counted


def test_text_keys_take_the_value_as_typed_on_a_shell(cli):
    cfg = load_config("smoke", ["train.precision=no", "name=007", "data.root=010", "log.dir=2024-05-01"])
    assert (cfg.train.precision, cfg.name, cfg.data.root, cfg.log.dir) == ("no", "007", "010", "2024-05-01")
    assert load_config("smoke", ["name=no", "model.act=null"]).name == "no"
    assert load_config("smoke", ["name='quoted'"]).name == "quoted"
    assert load_config("smoke", ["model.act=null"]).model.act is None
    # a switch takes what people type for one
    assert load_config("smoke", ["data.download=no"]).data.download is False
    assert load_config("smoke", ["log.progress=on"]).log.progress is True
    shown = cli("show", "recipe=best", "train.precision=no")
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["train"]["precision"] == "no"


def test_recipes_read_no_as_text_and_refuse_duplicate_keys_and_non_utf8(tmp_path):
    (tmp_path / "plain.yaml").write_text("base: smoke\ntrain: {precision: no}\nname: 2024-05-01\n")
    cfg = load_config(str(tmp_path / "plain.yaml"), [])
    assert (cfg.train.precision, cfg.name) == ("no", "2024-05-01")
    (tmp_path / "twice.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(UserError, match="key 'lr' is given twice"):
        load_config(str(tmp_path / "twice.yaml"), [])
    (tmp_path / "latin1.yaml").write_bytes("description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(str(tmp_path / "latin1.yaml"), [])


@pytest.mark.parametrize("name", ["../x", "/abs/path", "", ".", "..", "a/b"])
def test_a_run_name_is_one_folder_inside_log_dir(name):
    with pytest.raises(UserError, match=r"must name one folder inside log.dir"):
        load_config("smoke", [f"name={name}"])


def _leaves(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint


def _bad_values(key, hint):
    """A wrong type, a non-finite value, an out-of-range value and an absurd one, as a user types them."""
    rule = rules(key)
    if hint is bool:
        return ["maybe", "[1]"]
    if "str" in str(hint):  # text is taken as typed: only a closed vocabulary or a folder name can be wrong
        return ["not-a-choice"] if rule["choices"] else ["../up"] if rule["component"] else []
    bad = ["[1,2]", "{a: 1}"]
    numeric = [".nan", ".inf", "-.inf"]
    if rule["low"] is not None:
        bad.append(str(rule["low"] - 1))
    if rule["above"] is not None:
        bad.append(str(rule["above"]))
    if rule["high"] is not None:
        bad.append(str(int(rule["high"]) * 10 + 10))
    if rule["length"]:
        bad += ["[]", "[" + ",".join(["0.5"] * (rule["length"] + 1)) + "]"]
        numeric = [f"[{v}" + ",0.5" * (rule["length"] - 1) + "]" for v in (".nan", ".inf")]
    elif "float" not in str(hint):
        numeric = ["1.5", "1e3x"]  # not a whole number
    return bad + numeric


LEAVES = [(key, hint) for key, hint in _leaves() if key not in ("recipe", "description", "resume")]


@pytest.mark.parametrize("key, hint", LEAVES, ids=[k for k, _ in LEAVES])
def test_every_key_refuses_wrong_types_non_finite_out_of_range_and_absurd_values(key, hint):
    for value in _bad_values(key, hint):
        with pytest.raises(UserError) as err:
            load_config("smoke", [f"{key}={value}"])
        assert key in str(err.value) and "\n" not in str(err.value), (key, value)


@pytest.mark.parametrize("key, hint", LEAVES, ids=[k for k, _ in LEAVES])
def test_every_key_refuses_a_value_of_the_wrong_type_in_a_recipe(key, hint):
    raw: dict = {}
    node = raw
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = "x" if key == "data.sizes" else [[1, 2]]  # data.sizes holds lists of lists
    with pytest.raises(UserError, match=f"^{re.escape(key)}=.*: expected "):
        apply_overrides(raw, [])


def test_every_numeric_key_has_bounds():
    for key, hint in LEAVES:
        if key == "data.sizes":  # pairs of numbers, held to their bounds by config.check_sizes (tested below)
            continue
        if "int" in str(hint) or "float" in str(hint):
            rule = rules(key)
            assert rule["high"] is not None and (rule["low"] is not None or rule["above"] is not None), key


def test_bad_values_on_the_command_line_make_no_folder(tmp_path, cli, capsys):
    runs = tmp_path / "runs"
    # Every value through the train command's own entry point here; two of them as real command lines too.
    for value in (
        "optim.momentum=-5",
        "augment.std=[0,0,0]",
        "augment.mean=[]",
        "sched.warmup_epochs=nan",
        "sched.gamma=-1",
        "augment.hflip=1.5",
        "name=../../x",
    ):
        assert main(["train", "recipe=smoke", f"log.dir={runs}", value]) == 2, value
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    for value in ("augment.std=[0,0,0]", "name=../../x"):
        out = cli("train", "recipe=smoke", f"log.dir={runs}", value)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert not runs.exists()


def test_choices_of_optimizer_and_schedule_are_their_registries():
    from cifar100.config import OPTIMIZER_NAMES, SCHEDULE_NAMES
    from cifar100.training.optim import OPTIMIZERS, SCHEDULES

    # One name each way: the config accepts only what the registries build, and every entry is reachable.
    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES and tuple(SCHEDULES) == SCHEDULE_NAMES
    for name in OPTIMIZERS:
        assert load_config("smoke", [f"optim.name={name}"]).optim.name == name
    for name in SCHEDULES:
        assert load_config("smoke", [f"sched.name={name}"]).sched.name == name


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_train_py_help_prints_the_usage(flag):
    out = run_cmd([sys.executable, "train.py", flag])
    assert out.returncode == 0 and out.stdout.startswith("usage: cifar100 <command>") and not out.stderr
    assert run_cmd([sys.executable, "train.py", "recipe=smoke", flag]).stdout == out.stdout


@pytest.mark.parametrize(
    "override, text",
    [
        (
            "augment.hflip=sometimes",
            "augment.hflip='sometimes': expected one of alternating or a number from 0.0 to 1.0",
        ),
        ("augment.hflip=1.5", "augment.hflip=1.5: must be at most 1.0"),
        ("data.sizes=[20,32]", "data.sizes=[20, 32]: expected list of list of float, got list"),
        ("data.sizes=[[20,0.5],[32]]", "expected [size, fraction] pairs"),
        ("data.sizes=[[12,0.5],[32,0.5]]", "each size must be a whole number of pixels from 16 to 32"),
        ("data.sizes=[[20.5,0.5],[32,0.5]]", "each size must be a whole number of pixels from 16 to 32"),
        ("data.sizes=[[32,0.5],[24,0.5]]", "sizes must rise from one phase to the next"),
        ("data.sizes=[[20,0.3],[32,0.3]]", "the fractions must add up to 1 (they add up to 0.6)"),
        ("data.sizes=[[20,0],[32,1]]", "each fraction of the run must be greater than 0"),
        ("data.sizes=[[20,.nan],[32,1]]", "must hold finite numbers"),
        ("model.init=zeros", "model.init='zeros': expected one of default, dirac"),
        ("optim.name=lion", "expected one of sgd, adam, nadam, adamw, muon"),
        ("optim.muon.lr=-1", "optim.muon.lr=-1: must be at least 0.0"),
        ("optim.muon.ns_steps=0", "optim.muon.ns_steps=0: must be at least 1"),
        ("optim.lookahead.steps=-1", "optim.lookahead.steps=-1: must be at least 0"),
        ("optim.lookahead.alpha=0", "optim.lookahead.alpha=0: must be greater than 0.0"),
        ("optim.lookahead.alpha=1.5", "optim.lookahead.alpha=1.5: must be at most 1.0"),
    ],
)
def test_speedrun_keys_refuse_bad_values_in_one_line(override, text):
    with pytest.raises(UserError) as err:
        load_config("smoke", [override])
    assert text in str(err.value) and "\n" not in str(err.value)


def test_speedrun_keys_take_good_values():
    cfg = load_config(
        "smoke",
        ["augment.hflip=alternating", "data.sizes=[[20,0.3],[24,0.3],[32,0.4]]", "model.init=dirac", "optim.name=muon"],
    )
    assert cfg.augment.hflip == "alternating" and cfg.data.sizes == ((20, 0.3), (24, 0.3), (32, 0.4))
    assert load_config("smoke", ["augment.hflip=0.25"]).augment.hflip == 0.25


@pytest.mark.parametrize(
    "command",
    [["train", "recipe=FILE"], ["sweep", "FILE"], ["tune", "FILE", "budget=1h", "--plan"]],
)
@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch MARK']",
        "!!python/name:os.system",
        "!!python/object/new:subprocess.Popen [['touch', 'MARK']]",
    ],
)
def test_a_yaml_file_that_would_run_code_is_refused_in_one_line_and_runs_nothing(tmp_path, command, payload):
    """Recipes, sweep files and search files are read by a SafeLoader: Python tags have no constructor."""
    mark = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"description: {payload.replace('MARK', str(mark))}\n")
    out = run_cmd([sys.executable, "-m", "cifar100", *(a.replace("FILE", str(path)) for a in command)], cwd=tmp_path)
    assert out.returncode == 2 and not mark.exists(), out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "not valid YAML (could not determine a constructor" in out.stderr
