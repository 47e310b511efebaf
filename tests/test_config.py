"""Recipes, inheritance, overrides and every config error message."""

from __future__ import annotations

import pytest
import yaml

from cifar100.config import Config, available_recipes, load_config, to_yaml
from cifar100.errors import UserError


def test_defaults_without_recipe():
    cfg = load_config(None, [])
    assert cfg == Config()


def test_overrides_parse_yaml_scalars_and_flow_lists():
    assert load_config("best", ["optim.lr=1e-3"]).optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    cfg = load_config("best", ["optim.lr=0.05", "augment.mean=[0.5,0.5,0.5]", "augment.cutmix.prob=0.5",
                               "train.clip_grad=1", "model.act=null", "name=2024"])
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


@pytest.mark.parametrize("override, message", [
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
])
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
    with pytest.raises(UserError, match="did you mean optim.momentum"):
        load_config(str(tmp_path / "typo.yaml"), [])


def test_every_recipe_loads_and_has_a_description():
    recipes = available_recipes()
    assert {"exp1", "exp2", "exp3", "best", "smoke", "cpu"} <= set(recipes)
    for name in recipes:
        assert load_config(name, []).description


# The report's table (../shared/seed-report.md), column by column.
REPORT = {
    "exp1": dict(batch=128, hflip=0.5, aa="none", mean=(0.5,) * 3, std=(0.5,) * 3, cutmix=0.0,
                 model="resnet50", act=None, optim="sgd", sched="cosine", warmup=0),
    "exp2": dict(batch=512, hflip=0.5, aa="cifar10", mean=(0.5,) * 3, std=(0.5,) * 3, cutmix=0.0,
                 model="resnet50", act=None, optim="adam", sched="cosine", warmup=0),
    "exp3": dict(batch=512, hflip=0.8, aa="cifar10", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                 cutmix=1.0, model="resnet50", act=None, optim="nadam", sched="cosine", warmup=0),
    "best": dict(batch=512, hflip=0.5, aa="cifar10", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                 cutmix=1.0, model="seresnet50", act="mish", optim="sgd", sched="cosine", warmup=5),
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
    assert data["model"] == {"name": "seresnet50", "act": "mish", "cifar_stem": True, "drop_rate": 0.0}
    assert data["optim"]["lr"] == 0.1
    for args, text in [(("show", "recipe=nope"), "unknown recipe 'nope'"),
                       (("show", "recipe=best", "optim.lrr=1"), "did you mean optim.lr?"),
                       (("show", "recipe=best", "optim.lr=x"), "expected float"),
                       (("frobnicate",), "unknown command 'frobnicate'")]:
        bad = cli(*args)
        assert bad.returncode == 2
        assert bad.stderr.count("\n") == 1 and text in bad.stderr and "Traceback" not in bad.stderr


def test_recipes_command_lists_descriptions(cli):
    out = cli("recipes")
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "81.45" in lines["best"] and "68" in lines["exp1"]
