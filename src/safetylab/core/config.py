"""Typed configs: dataclasses in, plain dicts out, unknown keys rejected by name, values checked when
a config is built (each config's ``__post_init__`` calls :func:`require`)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from safetylab.core.errors import ConfigError, SafetylabError

C = TypeVar("C")


def require(holds: bool, field: str, expected: str, value: object) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``holds``. Write ``holds`` as what must be true
    (``lr > 0``, not ``not lr <= 0``), so that NaN fails every check."""
    if not holds:
        raise ConfigError(field, expected, value)


def require_choice(value: object, field: str, choices: typing.Iterable[object]) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    require(value in choices, field, f"one of {', '.join(map(str, choices))}", value)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain, JSON-ready dict (nested configs become nested dicts)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build ``cls`` from ``data``, rejecting unknown keys and values of the wrong type.

    ``where`` prefixes every error (a file name, or a dotted path for nested configs).
    """
    if not isinstance(data, dict):
        raise SafetylabError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SafetylabError(
            f"{where}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise e.renamed(f"{where}.{e.field}") from None


def load_config(cls: type[C], path: str | os.PathLike | None = None, **overrides: Any) -> C:
    """Defaults of ``cls``, then a YAML/JSON file's values, then ``overrides`` (``None`` skipped)."""
    data = read_config_file(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(cls, data, where=str(path) if path else "config")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) file holding one mapping of config fields."""
    path = Path(path)
    if not path.is_file():
        raise SafetylabError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SafetylabError(f"{path}: not valid YAML or JSON ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SafetylabError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except SafetylabError:
                continue
        raise SafetylabError(f"{where}: expected {_name(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(a) for a in typing.get_args(hint))
            raise SafetylabError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SafetylabError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise SafetylabError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise SafetylabError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
