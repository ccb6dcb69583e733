"""Strict JSON files for the store: atomic writes, reads that name a damaged file and the fix, moving files aside.

JSON is strict: NaN and ±inf become ``null``, so any JSON reader can load the files. Writes are atomic (temp file in
the same directory, fsync, ``os.replace``): a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping


def to_strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (tuples become lists), ready for ``allow_nan=False``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return to_strict_json(obj.item())
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON to ``path`` so that readers see the old file or the new one, never a part.

    The text is serialized before any file is touched (a non-serializable object leaves nothing behind), written to
    a temp file in the same directory (same file system, so the rename is atomic), fsynced, then ``os.replace``-d.
    """
    path = Path(path)
    text = json.dumps(to_strict_json(obj), allow_nan=False, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CorruptFileError(ValueError):
    """A store file exists but cannot be read as what it should hold; the message names the file and the fix."""


def read_json(path: str | os.PathLike, fix: str = "restore it from a copy, or move it aside") -> Any:
    """Parse the JSON file at ``path`` (``FileNotFoundError`` if it is missing).

    Raises:
        CorruptFileError: the file is not valid JSON (truncated, overwritten, not UTF-8), naming it and ``fix``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); {fix}") from None


def read_object(path: Path, fix: str = "restore it from a copy, or move it aside") -> Any:
    """The parsed file, ``None`` when it is missing; a file that is there must hold a JSON object."""
    if not path.exists():
        return None
    obj = read_json(path, fix)
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} holds {type(obj).__name__} {str(obj)[:40]}, not a JSON object; {fix}")
    return obj


def move_aside(path: Path, suffix: str) -> Path:
    """Rename ``path`` to the first free ``<path><suffix>[-k]`` and return the new path (nothing is deleted)."""
    k, target = 1, path.with_name(path.name + suffix)
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}{suffix}-{k}")
    os.replace(path, target)
    return target


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``, values in JSON form (tuples as lists)."""
    if isinstance(obj, Mapping) and obj:
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.loads(json.dumps(to_strict_json(obj)))}
