"""Typed configuration: dataclasses filled from YAML and `a.b=value` overrides.

Every job has one dataclass (nested dataclasses for sections). Unknown keys are errors that name the key and
list the valid ones, so a typo in a YAML file never silently falls back to a default. A value a section
rejects (a `ValueError` raised in its `__post_init__`) becomes a `ConfigError` naming the dotted key, e.g.
`crawl.samples_per_shard must be >= 1`: `parse_args` prints it as one usage line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the dataclass."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) `value` to the annotated type `tp`."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys by name."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f" in section '{prefix}'" if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr(prefix + '.' + k if prefix else k) for k in unknown)}"
            f"{where}; valid keys: {', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, types_[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{cls.__name__}: {e}") from e
    except ConfigError:
        raise
    except ValueError as e:  # raised by the section's __post_init__
        raise ConfigError(_name_key(str(e), list(types_), prefix, cls)) from None


def _name_key(message: str, fields: Sequence[str], prefix: str, cls: type) -> str:
    """`message` about a field of section `prefix`, led by the field's dotted key.

    The field is the first one whose name the message mentions as a word ("samples_per_shard must be
    >= 1" -> "crawl.samples_per_shard must be >= 1"); without one, the section is named."""
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message)
    field_name = next((w for w in words if w in fields), None)
    if field_name is None:
        return f"{prefix or cls.__name__}: {message}"
    key = f"{prefix}.{field_name}" if prefix else field_name
    if message.startswith(field_name):
        return key + message[len(field_name) :]
    return f"{key}: {message}"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (for YAML/JSON dumps and checkpoints)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (value parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_path(data, key, yaml.safe_load(raw) if raw.strip() else "")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then the overrides."""
    base = config_to_dict(cls())
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        # Validate the file alone first so that errors name the file's own keys.
        from_dict(cls, _merge(base, loaded))
        base = _merge(base, loaded)
    return from_dict(cls, apply_overrides(base, overrides))


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_args(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """Command line: `--config file.yaml`, repeated `--set a.b=value`, or bare `a.b=value` arguments."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", help="YAML file with the configuration")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, [*args.set, *args.overrides])
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
