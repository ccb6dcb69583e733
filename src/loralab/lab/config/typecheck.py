"""One type-checked path from plain dicts (TOML, JSON, ``--set`` overrides, grid points) to frozen dataclasses and back.

Driven by the dataclasses' own annotations (``typing.get_type_hints``), so a new field is parsed, checked and named in
errors without touching this file. Supported annotations: ``int`` (a bool is refused: TOML ``true`` is not a rank),
``float`` (an int is accepted and converted), ``str``, ``bool``, ``tuple[X, ...]`` / ``list[X]`` (from a list),
``X | Y`` (first arm that fits), ``Mapping[K, V]`` / ``dict``, ``Any``, ``None`` and nested dataclasses.
Anything else is a programming error (``TypeError``), not a user error.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from loralab.config import clip  # user input quoted in errors is clipped: a 1 MB value must not make a 1 MB message


class ConfigError(ValueError):
    """A config file, grid or override is wrong; the message names the key and says how to fix it."""


@functools.cache
def fields_of(cls: type) -> dict[str, Any]:
    """``{field name: resolved type}`` of dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def join(where: str, key: object) -> str:
    """Dotted path of ``key`` inside the table at ``where`` (``""`` = the top level)."""
    return f"{where}.{key}" if where else str(key)


def unknown_key(where: str, key: str, valid: Sequence[str]) -> ConfigError:
    """The error for ``key`` not being one of ``valid`` in the table at ``where``, with a did-you-mean."""
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    table = f"[{where}]" if where else "the top level"
    return ConfigError(f"unknown key {clip(repr(join(where, key)))}{hint}; valid keys of {table}: {', '.join(valid)}")


def type_name(tp: Any) -> str:
    """Readable name of an annotation for error messages: ``int``, ``tuple[str, ...] | str``, ``Mapping[str, int]``."""
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return f"a table of {getattr(tp, '__name__', tp)} fields"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("collections.abc.", "")


def from_dict(cls: type, data: Any, *, where: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict, checking every key and value against the annotations.

    Args:
        cls: a dataclass whose fields are of the supported types (see the module docstring).
        data: a mapping of field names to plain values (as TOML or JSON gives them).
        where: dotted path of ``data`` in the whole config, used in error messages (e.g. ``"lora"``).

    Raises:
        ConfigError: an unknown or missing key, a value of the wrong type, or a ``ValueError`` from
            ``cls.__post_init__`` (re-raised with ``where`` as prefix, e.g. ``"lora: LoraConfig.rank must ..."``).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected {type_name(cls)}, got {clip(repr(data))}")
    hints = fields_of(cls)
    for key in data:
        if key not in hints:
            raise unknown_key(where, str(key), list(hints))
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"missing key {join(where, missing[0])!r}: {cls.__name__} has no default for it")
    kwargs = {key: convert(hints[key], value, join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from e


def convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (and converted: list -> tuple, int -> float, dict -> dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        # an already built instance is accepted as is: it was checked when it was built
        cls = typing.cast(type, tp)
        return value if isinstance(value, cls) else from_dict(cls, value, where=key)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return convert(arm, value, key)
            except ConfigError:
                continue
        raise _wrong_type(tp, value, key)
    if tp in (int, float, str, bool, type(None)):
        return _scalar(tp, value, key)
    if tp in (tuple, list) or origin in (tuple, list, collections.abc.Sequence):
        return _sequence(tp, value, key)
    if tp in (dict, Mapping) or origin in (dict, collections.abc.Mapping):
        return _mapping(tp, value, key)
    raise TypeError(f"{key}: loralab.lab.typecheck cannot check fields of type {type_name(tp)}")


def _scalar(tp: type, value: Any, key: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None):
        ok = value is None
    else:  # bool is a subclass of int: check the exact kind so `rank = true` is refused
        ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
    if not ok:
        raise _wrong_type(tp, value, key)
    return value


def _sequence(tp: Any, value: Any, key: str) -> tuple | list:
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(tp, value, key)
    args = typing.get_args(tp)
    if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:
        item = args[0]
    elif not args:
        item = Any
    else:
        raise TypeError(f"{key}: fixed-length tuple annotations ({type_name(tp)}) are not supported")
    items = [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return list(items) if (typing.get_origin(tp) or tp) is list else tuple(items)


def _mapping(tp: Any, value: Any, key: str) -> dict:
    if not isinstance(value, Mapping):
        raise _wrong_type(tp, value, key)
    k_tp, v_tp = typing.get_args(tp) or (Any, Any)
    return {convert(k_tp, k, f"{key} key {k!r}"): convert(v_tp, v, f"{key}[{k!r}]") for k, v in value.items()}


def _wrong_type(tp: Any, value: Any, key: str) -> ConfigError:
    hint = ""
    if tp in (int, float) and isinstance(value, bool):
        hint = "; write a number, not true/false"
    elif tp in (int, float) and isinstance(value, str):
        hint = "; write the number without quotes"
    elif tp is int and isinstance(value, float) and math.isfinite(value) and value == int(value):
        hint = f"; write {int(value)} (no decimal point)"
    elif tp is str:
        hint = '; write it as a quoted TOML string, e.g. "..."'
    return ConfigError(f"{key}: expected {type_name(tp)}, got {clip(repr(value))} ({type(value).__name__}){hint}")


def to_dict(obj: Any) -> Any:
    """JSON-able form of a config: dataclasses and mappings -> dicts, tuples -> lists. ``from_dict`` inverts it."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def field_type(root: Any, dotted: str) -> Any:
    """Annotation of the field that ``dotted`` names below ``root`` (a dataclass, or a ``{name: type}`` dict).

    A path may go one key into a ``Mapping`` field (``lora.rank_pattern.q_proj``) and anywhere below ``Any``.

    Raises:
        ConfigError: a part is not a field (listing the valid ones), or the path goes below a plain value.
    """
    parts = dotted.split(".")
    if "" in parts:
        raise ConfigError(f"key {dotted!r} has an empty part; write dotted keys such as 'train.lr'")
    tp, where = root, ""
    for part in parts:
        if isinstance(tp, dict) or dataclasses.is_dataclass(tp):
            hints = tp if isinstance(tp, dict) else fields_of(typing.cast(type, tp))
            if part not in hints:
                raise unknown_key(where, part, list(hints))
            tp = hints[part]
        elif typing.get_origin(tp) in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
            tp = (typing.get_args(tp) or (Any, Any))[1]
        elif tp is not Any:
            raise ConfigError(f"{where!r} is a {type_name(tp)}, not a table, so {dotted!r} cannot name a key in it")
        where = join(where, part)
    return tp


def set_path(data: dict, dotted: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating missing tables on the way."""
    *tables, last = dotted.split(".")
    node, where = data, ""
    for part in tables:
        where = join(where, part)
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {where!r} is {node!r}, not a table")
    node[last] = value
