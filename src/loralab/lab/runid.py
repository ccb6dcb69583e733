"""Run ids: a readable prefix from a run's grid axes and a hash of its whole resolved config."""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any, Mapping

from .typecheck import to_dict

if TYPE_CHECKING:
    from .config import RunConfig

__all__ = ["EXECUTION_ONLY", "run_id"]

EXECUTION_ONLY = (("train", "compile"),)   # fields that change speed, not results: left out of run ids


def run_id(run: RunConfig, axes: Mapping[str, Any]) -> str:
    """A stable, filesystem-safe id: a readable prefix from the axes + 8 hex chars of the config's sha256.

    ``standard_lr0.001_seed0-1a2b3c4d``. The hash covers the whole resolved config (canonical JSON), so the same
    config gets the same id in any process, and any change of a field (but :data:`EXECUTION_ONLY`) gives another.
    """
    d = to_dict(run)
    for section, field_ in EXECUTION_ONLY:   # how fast a run trains is not what it is: same id, same store
        d[section].pop(field_)
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    prefix = "_".join(_label(axis, value) for axis, value in axes.items())
    prefix = re.sub(r"[^A-Za-z0-9._+-]+", "-", prefix)[:60].strip("._-+")
    return f"{prefix or 'run'}-{digest}"


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
    else:
        text = f"{name}{json.dumps(to_dict(value), sort_keys=True, separators=(',', ':'))}"
    return text[:24]
