"""Reading a run configuration: defaults <- YAML file <- dotted ``section.field=value`` overrides, checked key
by key against the dataclasses of sections.py (an unknown key names the closest valid one), and written back
as YAML into every run directory."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from opdistill.config.sections import Config
from opdistill.errors import UserError


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``section.field=value`` overrides, validated into a frozen Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist.") from None
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(
                f"config file {path} must hold a mapping of sections, e.g. 'train: {{steps: 100}}'."
            )
        raw = loaded or {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"override {item!r} must look like section.field=value, e.g. train.steps=100.")
        *parents, leaf = key.split(".")
        node = raw
        for name in parents:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {name} is not a section.")
            node = child
        quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
        if _hint_at(parents, leaf) is str and not quoted:  # a string field takes the text as written
            node[leaf] = value  # (e.g. opsd.system={privileged}, not a YAML mapping)
            continue
        try:
            node[leaf] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: the value is not valid YAML (quote it).") from None
    return from_dict(Config, raw, "")


def _hint_at(parents: list[str], leaf: str) -> Any:
    """The annotation of config key ``parents.leaf``, or None where the path names no dataclass field."""
    cls: Any = Config
    for name in [*parents, leaf]:
        if not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(name)
        if hint is None:
            return None
        cls = hint
    return cls


def from_dict(cls: type, raw: dict[str, Any], where: str):
    """Build dataclass ``cls`` from a plain mapping, checking keys and value types."""
    if not isinstance(raw, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}{key}"
        if key not in fields:
            valid = [f"{where}{name}" for name in fields]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]}?" if close else f" Valid keys: {', '.join(valid)}."
            raise UserError(f"unknown config key {dotted!r}.{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``hint`` (with the int->float and list->tuple coercions YAML
    needs)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where + ".")  # type: ignore[arg-type]
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise UserError(f"{where} must be one of {choices}; got {value!r}.")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, where)
            except UserError:
                continue
        raise UserError(f"{where} has the wrong type: {value!r}.")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise UserError(f"{where} must be a list of {len(args)} values, e.g. [0.9, 0.98]; got {value!r}.")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, e.g. {{digits: 4}}; got {value!r}.")
        _, value_hint = typing.get_args(hint)
        if value_hint is Any:
            return dict(value)
        return {key: _coerce(value_hint, item, f"{where}.{key}") for key, item in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{where} must be a float; got {value!r}.") from None
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number; got {value!r}.")
    if hint is str and value is None:
        return ""
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise UserError(f"{where} must be a {hint.__name__}; got {value!r}.")
    return value


def config_keys() -> Iterator[tuple[str, str, str, str]]:
    """(section, dotted key, default, comment) of every config key in declaration order, the comment being the
    one beside its declaration: what ``--help`` and docs/configuration.md list."""
    defaults, hints = Config(), typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):  # teachers: tag -> teacher.* keys
            comment = re.search(
                rf"^\s+{section.name}:[^#\n]*#\s*(.+)$", inspect.getsource(Config), flags=re.M
            )
            yield section.name, section.name, "{}", comment.group(1) if comment else ""
            continue
        comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), flags=re.M))
        default = getattr(defaults, section.name)
        for f in dataclasses.fields(cls):
            yield (
                section.name,
                f"{section.name}.{f.name}",
                repr(getattr(default, f.name)),
                comments.get(f.name, ""),
            )


@functools.cache
def describe() -> str:
    """Every config key with its default and its comment, one per line (for ``--help``). Made once per
    process: reading the comments parses sections.py (a tenth of a second), and both training commands show
    it."""
    return "\n".join(f"  {key}={default}  {comment}".rstrip() for _, key, default, comment in config_keys())


def reference_markdown() -> str:
    """docs/configuration.md: every key by section, with its default and comment (scripts/write_docs.py)."""
    lines = [
        "# Configuration",
        "",
        "<!-- generated from src/opdistill/config/sections.py by scripts/write_docs.py: do not edit -->",
        "",
        "A run is configured by a YAML file of sections (`opd distill --config F`) and `section.field=value`",
        "overrides after it (`opd distill --config F train.steps=100 optim.lr=3e-4`). An unknown key is an",
        "error naming the closest valid one; the resolved config is written to `RUN_DIR/config.yaml`.",
        "`opd distill --help` prints the same list.",
    ]
    for section, rows in itertools.groupby(config_keys(), key=lambda row: row[0]):
        lines += ["", f"## `{section}`", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for _, key, default, comment in rows:
            cell = comment.replace("|", "\\|")
            lines.append(f"| `{key}` | `{default}` | {cell} |")
    return "\n".join(lines) + "\n"


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML output."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {name: plain(value) for name, value in dataclasses.asdict(config).items()}


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """Copy of ``config`` with fields of named sections changed: ``replace(c, train={"steps": 5})``."""
    changed = {
        name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()
    }
    return dataclasses.replace(config, **changed)
