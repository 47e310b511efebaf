"""YAML in and out: recipes (with `base:` inheritance) and command-line values read as YAML 1.2 core
within size limits, and the resolved config written so that it reads back the same."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from cifar100.config.schema import Config, to_dict
from cifar100.errors import UserError, clip, shown

RECIPES_DIR = Path(__file__).resolve().parent.parent.parent / "recipes"
# What YAML (a recipe, a sweep file, a command-line value) may hold: a recipe is tens of keys a few
# levels deep, so these refuse only what would exhaust the stack or memory ("billion laughs" aliases).
MAX_DEPTH = 50  # nested collections
MAX_NODES = 100_000  # values once every alias is expanded
MAX_BASES = 32  # recipes in one `base:` chain


def available_recipes() -> dict[str, Path]:
    """Recipe name -> file, for every YAML file in `recipes/`."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    """The recipe's one-line `description:` (empty when it has none)."""
    return str(read_yaml(path).get("description", ""))


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in schema order, that reads back the same under YAML 1.1 and 1.2."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=120)


def find_recipe(recipe: str) -> Path:
    """A recipe's file: a name in recipes/, or a path to a .yaml file."""
    recipes = available_recipes()
    if recipe in recipes:
        return recipes[recipe]
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    names = ", ".join(recipes) or "(none)"
    raise UserError(f"unknown recipe {shown(recipe)}: available recipes are {names}, or give a path to a .yaml file")


class YamlLimit(yaml.YAMLError):
    """YAML beyond MAX_DEPTH or MAX_NODES: its message is one short line, never the value."""


class _Loader(yaml.SafeLoader):
    """YAML as people now read it (the 1.2 core schema): only true/false are booleans, numbers are
    decimal, 0o octal or 0x hex (no `1:30` sexagesimals, no `1_000`) and nothing is a date, so
    `precision: no` is the text "no"; a key given twice in one mapping is an error. Nesting deeper
    than MAX_DEPTH, or more than MAX_NODES values once aliases are expanded, is refused."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlLimit(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        try:
            return int(text[2:], 8 if text[1] == "o" else 16) if text[:2] in ("0o", "0x") else int(text, 10)
        except (ValueError, IndexError):
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(text)} is not an integer", node.start_mark
            ) from None

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values a document holds with every alias expanded (a node counted once per place it
    appears) without expanding anything, so an alias bomb is refused at once; refuse a cycle too."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # collections whose children are still being counted
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        children = _children(node)
        if counted:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_NODES:
                raise YamlLimit(f"more than {MAX_NODES} values once its aliases are expanded")
        elif id(node) in open_:
            raise YamlLimit("an alias refers to a collection that holds it")
        elif id(node) not in size:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


_STR, _INT, _FLOAT = "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp", _INT, _FLOAT)
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# The YAML 1.2 core schema's numbers (the int resolver first: "12" also matches the float one).
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)
_Loader.add_constructor(_INT, _Loader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    """Quotes a text that YAML 1.1 (PyYAML's safe_load) or 1.2 (our loader) would read as anything
    else: `1e5`, `0o17`, `no` and `1:30` stay texts for both."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == _STR:
            for candidate, regexp in _Loader.yaml_implicit_resolvers.get(value[:1] or None, []):
                if regexp.match(value):
                    return candidate
        return tag


def load_yaml(text: str) -> Any:
    """`text` read by the loader above; a bad explicit tag is a YAMLError too."""
    try:
        return yaml.load(text, Loader=_Loader)
    except (ValueError, TypeError, OverflowError) as err:  # an explicit tag on a bad value: `!!float abc`
        raise yaml.YAMLError(clip(str(err))) from None


def parse_yaml(text: str) -> Any:
    """A command-line value (`seeds=[0,1]`) read as the recipes are: YAML 1.2 core, within the limits above."""
    return load_yaml(text)


def read_yaml(path: Path, what: str = "recipe") -> dict[str, Any]:
    """A YAML file that holds a mapping (a recipe, a sweep file), or a UserError naming `what` it should be."""
    try:
        data = load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the {what} as UTF-8") from None
    except YamlLimit as err:
        raise UserError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({clip(' '.join(str(err).split()), 400)})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} must be a mapping of keys, got {type(data).__name__}")
    return data


def resolve_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """The recipe merged over its `base:` chain (a base may be a recipe name or a path)."""
    if path.resolve() in seen:
        chain = " -> ".join(p.stem for p in (*seen, path.resolve()))
        raise UserError(clip(f"recipe inheritance loops: {chain}", 400))
    if len(seen) >= MAX_BASES:
        raise UserError(f"{path}: more than {MAX_BASES} recipes in one base: chain (from {seen[0]})")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    beside = path.parent / str(base)  # a relative base path is relative to the recipe that names it
    base_path = beside if beside.suffix in (".yaml", ".yml") and beside.is_file() else find_recipe(str(base))
    merged = resolve_bases(base_path, (*seen, path.resolve()))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
