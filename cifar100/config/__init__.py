"""Typed run configuration: recipes (YAML with `base:` inheritance) plus `key=value` overrides.

The schema (`schema`) is a tree of frozen dataclasses; its defaults are the values a recipe leaves
out, and each field carries its rules (`rules` checks them, with did-you-mean for unknown keys).
Loading (`parsing`) goes recipe file -> merged dict (bases first, `yaml_io`) -> overrides ->
validated dataclasses, and every mistake on the way is a `UserError` with one line that says how
to fix it.
"""

from cifar100.config.parsing import apply_overrides, from_dict, load_config, parse_override, whole_number
from cifar100.config.rules import all_keys, is_launch_key, parse_duration, rules
from cifar100.config.schema import (
    OPTIMIZER_NAMES,
    SCHEDULE_NAMES,
    AugmentConfig,
    Config,
    DataConfig,
    EmaConfig,
    EvalConfig,
    LogConfig,
    LookaheadConfig,
    MixConfig,
    ModelConfig,
    MuonConfig,
    OptimConfig,
    SchedConfig,
    SweepConfig,
    TrainConfig,
    WandbConfig,
    flatten,
    to_dict,
)
from cifar100.config.yaml_io import available_recipes, parse_yaml, read_yaml, recipe_description, to_yaml

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "EmaConfig",
    "EvalConfig",
    "LogConfig",
    "LookaheadConfig",
    "MixConfig",
    "ModelConfig",
    "MuonConfig",
    "OptimConfig",
    "SchedConfig",
    "SweepConfig",
    "TrainConfig",
    "WandbConfig",
    "all_keys",
    "apply_overrides",
    "available_recipes",
    "flatten",
    "from_dict",
    "is_launch_key",
    "load_config",
    "parse_duration",
    "parse_override",
    "parse_yaml",
    "read_yaml",
    "recipe_description",
    "rules",
    "to_dict",
    "to_yaml",
    "whole_number",
]
