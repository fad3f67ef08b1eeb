"""Reading a :class:`~chatft.config.Config`: defaults <- a YAML file <- ``--key value``
overrides, parsed to each field's type and validated once; and the ``--help`` text, read from
the docstring under each field."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from chatft.config import SECTIONS, Config
from chatft.errors import ConfigError



def _leaf_index() -> dict[str, tuple[str, str]]:
    """Bare field name -> (section, field); asserts names are unique across sections."""
    index: dict[str, tuple[str, str]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"field name {f.name} is not unique"
            index[f.name] = (section, f.name)
    return index


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Parse ``value`` (from YAML or a command-line string) as type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(value, args[0], where, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(a, str) for a in allowed):
            value = "on" if value else "off"  # YAML reads a bare `on` as True
        if value not in allowed:
            problems.append(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        problems.append(f"{where}: {value!r} is not a boolean (true/false)")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            problems.append(f"{where}: {value!r} is not a number")
            return value
        try:
            if tp is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)  # base 10 for strings: "010" is 10, as a user means it
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: {value!r} is not {'an integer' if tp is int else 'a number'}")
            return value
    if tp is str:
        if isinstance(value, (dict, list)):
            problems.append(f"{where}: expected a string, got {type(value).__name__}")
            return value
        return str(value)
    raise TypeError(f"unsupported config type {tp}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_config(values: dict[str, dict[str, Any]], problems: list[str]) -> Config:
    """A Config from parsed values; a value that does not parse is a problem and its field
    keeps the default, so the range checks of :meth:`Config.problems` can still run on a
    well-typed config and every problem is reported at once."""
    cfg = Config()
    for section, fields in values.items():
        cls = SECTIONS[section]
        obj = getattr(cfg, section)
        for name, raw in fields.items():
            before = len(problems)
            value = _coerce(raw, _hints(cls)[name], f"{section}.{name}", problems)
            if len(problems) == before:
                setattr(obj, name, value)
    return cfg


#: Short names for the options every command takes.
ALIASES = {"model": "model.name_or_path", "data": "data.path", "deepspeed": "deepspeed.config",
           "nnodes": "launch.num_nodes"}


def _is_bool_key(key: str, index: dict[str, tuple[str, str]]) -> bool:
    if "." in key:
        section, _, name = key.partition(".")
    else:
        section, name = index.get(key, ("", ""))
    return section in SECTIONS and _hints(SECTIONS[section]).get(name) is bool


def parse_overrides(args: list[str], problems: list[str]) -> dict[str, dict[str, Any]]:
    """``['--lr', '1', '--train.seed=3']`` -> ``{'train': {...}}``; unknown keys are problems."""
    index = _leaf_index()
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r} (options look like --key value)")
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if not eq:
            if _is_bool_key(key, index) and (i + 1 >= len(args) or args[i + 1].startswith("--")):
                value = "true"  # a bare boolean flag: --skip-bad
            elif i + 1 >= len(args):
                problems.append(f"option --{key} needs a value")
                break
            else:
                value = args[i + 1]
                i += 1
        i += 1
        if "." in key:
            section, _, name = key.partition(".")
            if section not in SECTIONS or name not in _hints(SECTIONS[section]):
                problems.append(f"unknown option --{key}")
                continue
        elif key in index:
            section, name = index[key]
        else:
            problems.append(f"unknown option --{key}")
            continue
        out.setdefault(section, {})[name] = value
    return out


def _yaml_values(path: Path, problems: list[str]) -> dict[str, dict[str, Any]]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)})")
    out: dict[str, dict[str, Any]] = {}
    for section, fields in raw.items():
        if section not in SECTIONS:
            problems.append(f"{path}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
            continue
        if not isinstance(fields, dict):
            problems.append(f"{path}: section {section!r} must be a mapping")
            continue
        for name, value in fields.items():
            alias = ALIASES.get(name, "").partition(".")
            if alias[0] == section:  # e.g. launch.nnodes, torchrun's name of num_nodes
                name = alias[2]
            if name not in _hints(SECTIONS[section]):
                problems.append(f"{path}: unknown key {section}.{name}")
                continue
            out.setdefault(section, {})[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- command-line overrides, then validated once."""
    problems: list[str] = []
    values = _yaml_values(Path(path), problems) if path else {}
    for section, fields in parse_overrides(overrides or [], problems).items():
        values.setdefault(section, {}).update(fields)
    cfg = build_config(values, problems)
    problems += cfg.problems()
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def mentions(overrides: list[str], *fields: str) -> bool:
    """Whether command-line ``overrides`` set any of ``fields`` (dotted names)."""
    problems: list[str] = []
    given = parse_overrides(overrides, problems)
    return any(f.partition(".")[2] in given.get(f.partition(".")[0], {}) for f in fields)


def config_from_dict(values: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. inside a checkpoint)."""
    problems: list[str] = []
    known = {s: {k: v for k, v in f.items() if k in _hints(SECTIONS[s])}
             for s, f in values.items() if s in SECTIONS}
    cfg = build_config(known, problems)
    if problems:
        raise ConfigError("invalid saved configuration:\n  - " + "\n  - ".join(problems))
    return cfg


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def options_help() -> str:
    """All options, grouped by section, with defaults and docs (for --help)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  --{f.name} (default {default!r})")
            lines.append(textwrap.indent(textwrap.fill(docs.get(f.name, ""), 76), "      "))
    return "\n".join(lines)
