"""One config loader: YAML file + dotted ``key=value`` overrides -> a typed dataclass tree.

Every value is checked against the dataclass field's type (int, float, bool,
str, Optional, Literal, tuple/list, dict, nested dataclasses). Unknown keys and
bad values fail at once with a message that names the dotted key, e.g.
``unknown config key 'sampling.top_kk' (did you mean 'sampling.top_k'?)``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error (the safe loader
    keeps the last value silently). Keys brought in by a ``<<`` merge may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> data (safe types only, duplicate keys refused); an error is one line
    ``SOURCE:LINE:COLUMN: problem``."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        context = f" ({err.context}, line {err.context_mark.line + 1})" if err.context and err.context_mark else ""
        raise ConfigError(f"{where}: {err.problem or err.context}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def load_config(cls: type[T], path: Optional[str | Path] = None, overrides: Iterable[str] = (),
                defaults: Optional[dict] = None) -> T:
    """Read ``path`` (YAML mapping, optional; ``defaults``, a saved config as plain data, stands in
    for it when there is no file), apply ``key=value`` overrides, build ``cls``."""
    data: dict[str, Any] = copy.deepcopy(defaults) if defaults is not None else {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
        loaded = parse_yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        apply_override(cls, data, item)
    return from_dict(cls, data)


def apply_override(cls: type, data: dict, item: str) -> None:
    """Set ``data[a][b] = value`` for ``'a.b=value'``, checking the key path against ``cls``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    target: type = cls
    node = data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        hints = _fields(target)
        if part not in hints:
            _unknown(dotted, [".".join(parts[:i] + [k]) for k in hints])
        if i == len(parts) - 1:
            try:
                node[part] = _parse_override_value(hints[part], raw)
            except yaml.YAMLError as err:
                raise ConfigError(f"config key {dotted!r}: cannot parse value {raw!r} ({err.problem})") from err
            return
        target = _dataclass_in(hints[part])
        if target is None:
            raise ConfigError(f"config key {dotted!r} is a {_type_name(hints[part])}, it has no sub-keys")
        existing = node.get(part)
        if existing is None:
            existing = node[part] = {}
        elif not isinstance(existing, dict):
            raise ConfigError(f"config key {dotted!r} must be a mapping")
        node = existing


def _parse_override_value(tp, raw: str):
    """YAML-parse an override value, except for string fields: there the text is kept as
    typed (YAML would turn '0123' into 83 and 'a # b' into 'a'); ``null`` still clears an
    optional string. A tuple of strings takes one bare string or a [bracketed, list]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    if tp is str or (optional and args == [str]):
        return None if optional and raw.strip() == "null" else raw
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[:1] == (str,):
        # BaseLoader keeps every scalar a string: '[0123, yes]' -> ['0123', 'yes']
        return yaml.load(raw, Loader=yaml.BaseLoader) if raw.lstrip().startswith("[") else [raw]
    return yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config key {prefix or '<root>'!r} must be a mapping, got {data!r}")
    hints = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            _unknown(dotted, [f"{prefix}.{k}" if prefix else k for k in hints])
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config {prefix or '<root>'}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _dataclass_in(tp) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _unknown(dotted: str, known: list[str]) -> None:
    close = difflib.get_close_matches(dotted, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
    raise ConfigError(f"unknown config key {dotted!r}{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key {key!r}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):  # null: the section's defaults (``peft=null`` = no PEFT)
        return from_dict(tp, {} if value is None else value, key)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            if isinstance(value, (int, float, str)) and origin is tuple:
                value = [value]  # a single value where a sequence is expected
            else:
                raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '1e-3' as a string
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    raise ConfigError(f"config key {key!r}: unsupported field type {_type_name(tp)}")
