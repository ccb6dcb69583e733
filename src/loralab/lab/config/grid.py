"""Grids: every point of a sweep as a :class:`RunSpec` (its id, its axes' values, its resolved config).

Run ids are a readable prefix from a run's grid axes and a hash of its whole resolved config (fields whose role is
:data:`~.schema.EXECUTION` left out, and fields added later left out while at their default), so the same config
gets the same id in any process and a store resumes.

The dtype a run computes in is part of what it is: ``model.dtype`` enters the hash as the dtype it resolves to on
this machine, written ``"auto"`` when that is what ``auto`` meant before CPUs could get bfloat16 (bfloat16 on CUDA,
float32 on a CPU). So every store made before keeps its ids where it computed as it would now; on a CPU with native
bfloat16, ``auto`` runs in bfloat16 under new ids, and ``model.dtype=float32`` reproduces (and resumes) the old ones.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loralab.config import clip

from ..runtime import auto_dtype, pick_device
from .schema import EXECUTION, RunConfig, SweepConfig, added_fields, fields_with_role
from .typecheck import ConfigError, field_type, from_dict, set_path, to_dict

__all__ = ["RunSpec", "expand", "plan_runs", "run_id"]


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep, from plan to result: its id, its grid values and its fully resolved config."""

    run_id: str
    axes: Mapping[str, Any]
    run: RunConfig


def run_id(run: RunConfig, axes: Mapping[str, Any]) -> str:
    """A stable, filesystem-safe id: a readable prefix from the axes + 8 hex chars of the config's sha256.

    ``standard_lr0.001_seed0-1a2b3c4d``. The hash covers the whole resolved config (canonical JSON), so any change of
    a field (but those whose role is :data:`EXECUTION`) gives another id.
    """
    d = to_dict(run)
    d["model"]["dtype"] = dtype_identity(run)
    for section, name in fields_with_role(EXECUTION):  # how fast a run trains is not what it is: same id
        d[section].pop(name)
    for section, name, default in added_fields():  # stores made before the field existed keep their ids
        if d[section][name] == to_dict(default):
            d[section].pop(name)
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    prefix = "_".join(_label(axis, value) for axis, value in axes.items())
    prefix = re.sub(r"[^A-Za-z0-9._+-]+", "-", prefix)[:60].strip("._-+")
    return f"{prefix or 'run'}-{digest}"


def dtype_identity(run: RunConfig) -> str:
    """``model.dtype`` as run ids hash it (see the module docstring)."""
    name = run.train.device
    kind = pick_device(name).type if name == "auto" else torch.device(name).type
    resolved = auto_dtype(kind) if run.model.dtype == "auto" else run.model.dtype
    legacy = "bfloat16" if kind == "cuda" else "float32"  # "auto" before CPUs could get bfloat16
    return "auto" if resolved == legacy else resolved


def _label(axis: str, value: Any) -> str:
    """``("lora.init", "standard")`` -> ``standard``; ``("train.lr", 0.001)`` -> ``lr0.001``."""
    name = axis.rsplit(".", 1)[-1]
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = name if value else f"no{name}"
    elif isinstance(value, float):
        text = f"{name}{value:g}"
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        text = "+".join(value)
    elif isinstance(value, Mapping) and dataclasses.is_dataclass(field_type(RunConfig, axis)):
        # a table axis's value: its fields' labels, joined (only table axes: mapping-valued fields keep their ids)
        leaves = {f"{axis}.{k}.{kk}": vv for k, v in value.items() if isinstance(v, Mapping) for kk, vv in v.items()}
        leaves |= {f"{axis}.{k}": v for k, v in value.items() if not isinstance(v, Mapping)}
        return "+".join(_label(path, v) for path, v in sorted(leaves.items()))[:60]
    else:
        text = f"{name}{json.dumps(to_dict(value), sort_keys=True, separators=(',', ':'))}"
    return text[:24]


def expand(sweep: SweepConfig) -> list[tuple[dict[str, Any], RunConfig]]:
    """All grid points, first axis outermost: ``[({"lora.init": "standard", "train.lr": 1e-4}, run), ...]``.

    Each point is ``sweep.base`` as a dict with the axes' values set, built by :func:`from_dict` like any file.

    Raises:
        ConfigError: a point is not a valid run (e.g. an orthogonal init with an odd rank), naming the point.
    """
    base = to_dict(sweep.base)
    points = []
    for values in itertools.product(*sweep.grid.values()):
        axes = dict(zip(sweep.grid, values))
        data = copy.deepcopy(base)
        for axis, value in axes.items():
            table = dataclasses.is_dataclass(field_type(RunConfig, axis))  # an axis over a table sets its fields
            for path, v in ({f"{axis}.{k}": v for k, v in value.items()} if table else {axis: value}).items():
                set_path(data, path, copy.deepcopy(v))
        try:
            points.append((axes, from_dict(RunConfig, data)))
        except ConfigError as e:
            raise ConfigError(f"grid point {clip(repr(axes))}: {e}") from e
    return points


def plan_runs(sweep: SweepConfig) -> list[RunSpec]:
    """Every run of ``sweep`` in grid order, with its id."""
    return [RunSpec(run_id(run, axes), axes, run) for axes, run in expand(sweep)]
