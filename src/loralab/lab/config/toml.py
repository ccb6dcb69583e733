"""Config files and ``--set`` overrides: TOML into plain dicts, then through the one type-checked path.

Every way in — a TOML file, a ``--set key=value`` override, a grid point — is first a plain dict and then goes
through ``typecheck.from_dict``, so all of them are checked, and fail, the same way, naming the key. Studies with
their own schema (the width study) read their files and overrides through :func:`read_toml` and
:func:`apply_overrides` too.

An override of a field that a grid axis also sets is an error: the axis would silently win in every run. A grid axis
or override may name one key inside a mapping field, e.g. ``lora.init_kwargs.std``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from .grid import expand
from .schema import RunConfig, SweepConfig
from .typecheck import ConfigError, convert, field_type, fields_of, from_dict, set_path, to_dict, type_name, unknown_key

__all__ = ["apply_overrides", "load_sweep", "parse_override", "parse_sweep", "read_toml"]

# Top-level keys of a sweep file besides the run's tables and [grid]: every SweepConfig field but base and grid.
_TOP = {k: v for k, v in fields_of(SweepConfig).items() if k not in ("base", "grid")}
_TOP_KEYS = {**_TOP, **fields_of(RunConfig)}  # what a non-grid override may name


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; a ``ConfigError`` naming ``path`` when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # "(at line 3, column 7)"
        raise ConfigError(f"{path}: cannot load the config: {e}") from e


def parse_override(item: str, example: str = "train.lr=1e-3") -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``: the value as TOML, else as a bare string (no quotes needed)."""
    key, eq, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not eq or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. {example})")
    try:
        parsed = tomllib.loads(f"v = {text}")
        value = parsed["v"] if parsed.keys() == {"v"} else text
    except tomllib.TOMLDecodeError:
        value = text  # `lora.init=reversed` needs no quotes
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], example: str) -> list[str]:
    """Set each ``key=value`` of ``overrides`` in ``data`` (in place); returns the keys set, in order."""
    keys = []
    for item in overrides:
        key, value = parse_override(item, example)
        set_path(data, key, value)
        keys.append(key)
    return keys


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep TOML file (see :func:`parse_sweep`); every error is a ``ConfigError`` naming ``path``."""
    data = read_toml(path)
    try:
        return parse_sweep(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def parse_sweep(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> SweepConfig:
    """Build and fully check a sweep from TOML's dict and ``key.sub=value`` overrides (applied first, to the dict).

    Every grid point is built, so a bad value in any point fails here (``--dry-run``), not hours into a sweep.

    Raises:
        ConfigError: naming the key (or override, or grid point) and how to fix it.
    """
    raw = copy.deepcopy(dict(data))
    grid = _flatten_grid(raw.pop("grid", {}))
    set_keys = []
    for item in overrides:
        key, value = _sweep_override(item)
        if key.startswith("grid."):
            grid[key[len("grid.") :]] = value  # replaces an axis in place, or adds one after the others
        else:
            set_path(raw, key, value)
            set_keys.append(key)
    top = {key: raw.pop(key) for key in _TOP if key in raw}
    for key in raw:
        if key not in _TOP_KEYS:
            raise unknown_key("", key, [*_TOP_KEYS, "grid"])
    checked = _check_grid(grid)
    for key, path in itertools.product(set_keys, grid_paths(checked)):
        if key == path or key.startswith(path + ".") or path.startswith(key + "."):
            axis = next(a for a in checked if path == a or path.startswith(a + "."))
            raise ConfigError(
                f"override {key!r} sets what grid axis {axis!r} varies, so it would be ignored; "
                f"override the axis instead: grid.{axis}=[...]"
            )
    base = from_dict(RunConfig, raw)  # TOML keeps the run's tables at the top, so errors say "lora.rank"
    sweep = from_dict(SweepConfig, {**top, "base": base, "grid": checked})
    configs = [json.dumps(to_dict(run), sort_keys=True) for _, run in expand(sweep)]
    if len(set(configs)) != len(configs):
        raise ConfigError("two grid points give the same run config; remove the repeated axis or value")
    return sweep


def _sweep_override(item: str) -> tuple[str, Any]:
    """:func:`parse_override` plus what a sweep's keys allow (valid keys listed; a whole table refused)."""
    valid = ", ".join(
        [
            *(f"{k}.<field>" if dataclasses.is_dataclass(t) else k for k, t in _TOP_KEYS.items()),
            "grid.<section>.<field>",
        ]
    )
    try:
        key, value = parse_override(item, "train.lr=1e-3, lora.init=reversed, grid.train.lr=[1e-4,1e-3]")
    except ConfigError as e:
        raise ConfigError(f"{e}; valid keys: {valid}") from e
    try:
        if not key.startswith("grid.") and dataclasses.is_dataclass(field_type(_TOP_KEYS, key)):
            raise ConfigError(f"{key!r} is a whole table; set one of its fields, e.g. {key}.<field>=...")
    except ConfigError as e:
        raise ConfigError(f"override {item!r}: {e}") from e
    return key, value


def _flatten_grid(table: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": [..]}, "lora.init": [..]}`` -> ``{"train.lr": [..], "lora.init": [..]}``, in order."""
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"grid{'.' + prefix if prefix else ''} must be a table of axes, e.g. "
            f'[grid] "train.lr" = [1e-4, 1e-3]; got {table!r}'
        )
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        for axis, values in (_flatten_grid(value, dotted) if isinstance(value, dict) else {dotted: value}).items():
            if axis in flat:
                raise ConfigError(f"grid axis {axis!r} is given twice; keep one")
            flat[axis] = values
    return flat


def _table_values(axis: str, cls: type, values: Any) -> tuple[dict[str, Any], ...]:
    """The values of an axis that names a whole table: each a table of some of its fields, set together.

    Such an axis varies fields jointly where a product of axes would make points that are not runs, e.g. an init
    with its own options next to one without them: ``lora = [{init = "standard"}, {init = "random-both",
    init_kwargs = {dist = "xavier"}}]``. The fields a value leaves out keep the base config's values.
    """
    example = next(iter(fields_of(cls)))
    if not isinstance(values, list) or not values or not all(isinstance(v, dict) and v for v in values):
        raise ConfigError(
            f"grid axis {axis!r} names a whole table: list tables of its fields set together, e.g. "
            f'"{axis}" = [{{{example} = ...}}, ...], or name one field, e.g. "{axis}.{example}"; got {values!r}'
        )
    try:
        return tuple(
            {
                k: to_dict(convert(field_type(RunConfig, f"{axis}.{k}"), v, f"grid.{axis}[{i}].{k}"))
                for k, v in d.items()
            }
            for i, d in enumerate(values)
        )
    except ConfigError as e:
        raise ConfigError(f"grid axis {axis!r}: {e}") from e


def grid_paths(grid: Mapping[str, Sequence]) -> list[str]:
    """The dotted fields the axes set: an axis itself, or for a table axis each field its values set."""
    out: list[str] = []
    for axis, values in grid.items():
        keys = [f"{axis}.{k}" for v in values if isinstance(v, Mapping) for k in v] if _is_table(axis) else [axis]
        out += [k for k in keys if k not in out]
    return out


def _is_table(axis: str) -> bool:
    return dataclasses.is_dataclass(field_type(RunConfig, axis))


def _check_grid(grid: Mapping[str, Any]) -> dict[str, tuple]:
    """Each axis names a run field and lists values of its type; returns the values checked, in JSON form."""
    checked = {}
    for axis, values in grid.items():
        try:
            tp = field_type(RunConfig, axis)
        except ConfigError as e:
            raise ConfigError(f"grid axis {axis!r}: {e}") from e
        if dataclasses.is_dataclass(tp):
            checked[axis] = _table_values(axis, typing.cast(type, tp), values)
        else:
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"grid axis {axis!r} must be a non-empty list of {type_name(tp)} values, e.g. "
                    f'"{axis}" = [a, b]; got {values!r}'
                )
            checked[axis] = tuple(to_dict(convert(tp, v, f"grid.{axis}[{i}]")) for i, v in enumerate(values))
        seen = [json.dumps(v, sort_keys=True) for v in checked[axis]]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"grid axis {axis!r} lists a value twice: {list(checked[axis])}")
    return checked
