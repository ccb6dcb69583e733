"""The run store: one directory per run, the only code that writes or reads run files.

Layout (the lab spec's "Store format"): ``<out_dir>/sweep.json`` (manifest), and per run ``<out_dir>/runs/<run_id>/``
with ``config.json``, ``metrics.jsonl``, ``diagnostics.json``, ``eval_chunks.npz`` (per-chunk eval losses, see
:class:`EvalChunks`), ``adapter/`` (the trained adapter, see :meth:`RunStore.write_adapter`) and ``result.json``. A
run is finished iff its ``result.json`` reads back with status ``ok`` or ``diverged`` (those are results); a
``failed`` or unreadable one is redone by the next sweep, after :meth:`RunStore.reset` moved the old file aside
(never deleted: results are data).

The adapter is written (atomically, as a directory) *before* ``result.json``, so a run the sweep finished has both,
and a crash between the two leaves an unfinished run that the next sweep redoes (:meth:`RunStore.reset` removes the
orphaned adapter). ``result.json`` alone still decides whether a run is finished: an adapter removed later (committed
example stores leave them out, see ``.gitignore``) does not make a result unfinished, and ``RunResult.adapter`` says
whether one was saved, so whoever looks for it can tell "not kept" from "never saved". ``eval_chunks.npz`` is written
before the result too.

Every JSON file except metrics.jsonl is written atomically (the library's :func:`loralab.io.atomic_write`), as
strict JSON: NaN and ±inf become ``null`` (a diverged loss is recorded as ``null``), so any JSON reader can load the
files. metrics.jsonl is appended line by line, so a crash can truncate its last line; readers skip it. Results are
read back as :class:`RunResult` through the config's type-checked path, so a damaged field is named, not propagated.

``eval_chunks.npz`` is numpy's (compressed, no pickles): float32 losses of a few hundred chunks take a few KB, where
JSON would take several times that and lose NaN; any numpy reads it. Stores written before it existed have none.
It also holds the periodic evals' per-chunk losses (``curve.*``: the curve with intervals), which files written
before them lack (:attr:`EvalChunks.curve` is then ``None``).

Deviation from the spec, additive: ``sweep.json`` may hold ``"run_axes"`` (the axes of each run, parallel to
``run_ids``) so that runs never started still have axes in :meth:`SweepStore.records`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from loralab.config import clip
from loralab.io import atomic_write

from .config.schema import EXECUTION, fields_with_role
from .config.typecheck import ConfigError, from_dict

__all__ = [
    "CorruptFileError",
    "CurveLosses",
    "EvalChunks",
    "ManifestMismatchError",
    "RunRecord",
    "RunResult",
    "RunStore",
    "SplitLosses",
    "SweepStore",
    "atomic_write_json",
    "config_diff",
    "read_json",
    "sweep_of",
    "to_strict_json",
]


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

    The text is serialized before any file is touched (a non-serializable object leaves nothing behind).
    """
    text = json.dumps(to_strict_json(obj), allow_nan=False, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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


def free_name(path: Path, suffix: str, into: Path | None = None) -> Path:
    """The first ``<name><suffix>[-k]`` that does not exist in ``path``'s directory (or in ``into``)."""
    where = path.parent if into is None else into
    k, target = 1, where / (path.name + suffix)
    while target.exists():
        k += 1
        target = where / f"{path.name}{suffix}-{k}"
    return target


def move_aside(path: Path, suffix: str, into: Path | None = None) -> Path:
    """Rename ``path`` to :func:`free_name` (in its directory, or in ``into`` on the same file system) and return the
    new path (nothing is deleted)."""
    target = free_name(path, suffix, into)
    os.replace(path, target)
    return target


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``, values in JSON form (tuples as lists)."""
    if isinstance(obj, Mapping) and obj:
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.loads(json.dumps(to_strict_json(obj)))}


STATUSES = ("ok", "diverged", "failed")
FINISHED = ("ok", "diverged")  # results; a failed run is recorded, but a resumed sweep tries it again
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # truncated, foreign, misshapen
CONFIG, METRICS, DIAGNOSTICS, RESULT = "config.json", "metrics.jsonl", "diagnostics.json", "result.json"
EVAL_CHUNKS = "eval_chunks.npz"
CURVE = "curve"  # eval_chunks.npz's prefix of the periodic evals' per-chunk losses (not a split)
STAGES = ("pretrained", "step0", "final")
ADAPTER = "adapter"  # the run's trained adapter: a directory in PEFT's format
MANIFEST = "sweep.json"


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run, as stored in ``result.json``.

    Attributes:
        run_id: the run's id (its directory name).
        status: ``"ok"``, ``"diverged"`` (loss blew up: recorded as infeasible, never dropped) or ``"failed"``
            (an exception; see ``error`` and ``traceback``).
        axes: the grid values of this run, ``{dotted path: value}``.
        final_eval_loss, best_eval_loss, initial_eval_loss: eval losses; ``None`` when unknown or not finite.
        steps, tokens: optimizer steps done and training tokens seen.
        wall_time_s, tokens_per_s: wall-clock time of the run and training throughput.
        error: first line of the exception for a failed run; traceback: its full traceback.
        versions: ``{"loralab", "torch", "transformers", "python"}``; device: where it ran.
        pack_size: how many runs trained together on one base (``tokens_per_s`` is this run's share).
        adapter: whether the trained adapter was saved in the run's ``adapter/`` directory (written before this
            result); false when ``train.save_adapter`` was off, for failed runs and for runs older than the field.
        dtype: the frozen base's dtype, which the run computed in ("" in results written before it was recorded).
        diverged_at_step: the optimizer step at which the run was found diverged (``None``: it did not); with
            ``train.on_divergence = "continue"`` it trained on to ``steps`` all the same.

    With a val/test split (``data.val_chunks``), ``initial_eval_loss`` and ``final_eval_loss`` are means over the test
    chunks (the reported ones), ``best_eval_loss`` the lowest periodic eval (on the curve chunks); without one, all
    three are over the one eval set. The per-chunk losses are in ``eval_chunks.npz``.
    """

    run_id: str
    status: str
    axes: Mapping[str, Any] = field(default_factory=dict)
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    initial_eval_loss: float | None = None
    steps: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    error: str | None = None
    traceback: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    device: str = ""
    pack_size: int = 1
    adapter: bool = False
    dtype: str = ""
    diverged_at_step: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> dict[str, Any]:
        """The ``result.json`` object (a plain dict, non-finite floats as ``None``)."""
        d = asdict(self)
        d["axes"], d["versions"] = dict(self.axes), dict(self.versions)
        return to_strict_json(d)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunResult:
        """Build from a ``result.json`` object through the type-checked path: an unknown key, a missing status or a
        value of the wrong type (``"final_eval_loss": "abc"``) is a ``ConfigError`` naming the field."""
        result = from_dict(cls, dict(d))
        for name in ("final_eval_loss", "best_eval_loss", "initial_eval_loss"):
            value = getattr(result, name)
            if value is not None and not math.isfinite(value):  # NaN written by hand or by another writer
                object.__setattr__(result, name, None)
        return result


@dataclass(frozen=True, eq=False)
class SplitLosses:
    """Per-chunk losses (mean over each chunk's predicted tokens, float32) of one eval split of one run.

    Attributes:
        ids: ``(n,)`` the chunks' ids in the held-out pool (every run of a sweep has the same ids: paired).
        pretrained: ``(n,)`` the pretrained model's losses.
        step0: ``(n,)`` the run's model at init (equal to ``pretrained`` for an init that preserves the output).
        final: ``(n,)`` at the run's last step; NaN or inf where it blew up.
    """

    ids: np.ndarray
    pretrained: np.ndarray
    step0: np.ndarray
    final: np.ndarray

    def __eq__(self, other: object) -> bool:  # arrays compare element-wise: equal means same values (NaN = NaN)
        if not isinstance(other, SplitLosses):
            return NotImplemented
        return np.array_equal(self.ids, other.ids) and all(
            np.array_equal(getattr(self, k), getattr(other, k), equal_nan=True) for k in STAGES
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class CurveLosses:
    """Per-chunk losses of a run's periodic evals (the curve), step 0 included, on the curve chunks.

    Attributes:
        ids: ``(c,)`` the curve chunks' ids in the held-out pool (the first ``data.curve_chunks`` validation chunks).
        steps: ``(k,)`` the optimizer steps evaluated, increasing, starting at 0.
        losses: ``(k, c)`` float32; row ``i`` at ``steps[i]`` (NaN or inf where the run blew up).
    """

    ids: np.ndarray
    steps: np.ndarray
    losses: np.ndarray

    def __post_init__(self) -> None:
        if np.shape(self.losses) != (len(self.steps), len(self.ids)):
            raise ValueError(
                f"curve losses must be (steps, chunks) = ({len(self.steps)}, {len(self.ids)}); "
                f"got {np.shape(self.losses)}"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CurveLosses):
            return NotImplemented
        return (
            np.array_equal(self.ids, other.ids)
            and np.array_equal(self.steps, other.steps)
            and np.array_equal(self.losses, other.losses, equal_nan=True)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class EvalChunks:
    """The per-chunk eval losses of one run (``eval_chunks.npz``): splits ``val``/``test``, or ``eval``; and the
    periodic evals' per-chunk losses (``curve``; ``None`` in files written before loralab stored them)."""

    pool_digest: str  # which held-out pool the ids index
    splits: Mapping[str, SplitLosses]
    curve: CurveLosses | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"pool_digest": np.array(self.pool_digest)}
        for name, split in self.splits.items():
            out[f"{name}.ids"] = np.asarray(split.ids, dtype=np.int64)
            out |= {f"{name}.{stage}": np.asarray(getattr(split, stage), dtype=np.float32) for stage in STAGES}
        if self.curve is not None:  # "curve.*" has no "curve.ids"-style split: it has no stages
            out[f"{CURVE}.chunk_ids"] = np.asarray(self.curve.ids, dtype=np.int64)
            out[f"{CURVE}.steps"] = np.asarray(self.curve.steps, dtype=np.int64)
            out[f"{CURVE}.losses"] = np.asarray(self.curve.losses, dtype=np.float32)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> EvalChunks:
        """The inverse of :meth:`to_arrays`; ``ValueError`` naming the key when one is missing or misshapen."""
        order = ("val", "test", "eval")  # the eval's row order; other names after them
        names = sorted(
            {k.split(".")[0] for k in arrays if k.endswith(".ids")},
            key=lambda n: (order.index(n) if n in order else len(order), n),
        )
        if "pool_digest" not in arrays or not names:
            raise ValueError("no 'pool_digest' or no '<split>.ids' array")
        splits = {}
        for name in names:
            ids = np.asarray(arrays[f"{name}.ids"])
            losses = {}
            for stage in STAGES:
                key = f"{name}.{stage}"
                if key not in arrays or np.shape(arrays[key]) != ids.shape:
                    raise ValueError(f"{key!r} is missing or not shaped like {name}.ids {ids.shape}")
                losses[stage] = np.asarray(arrays[key], dtype=np.float32)
            splits[name] = SplitLosses(ids=ids.astype(np.int64), **losses)
        curve = None
        if f"{CURVE}.losses" in arrays:
            curve = CurveLosses(
                ids=np.asarray(arrays[f"{CURVE}.chunk_ids"], dtype=np.int64),
                steps=np.asarray(arrays[f"{CURVE}.steps"], dtype=np.int64),
                losses=np.asarray(arrays[f"{CURVE}.losses"], dtype=np.float32),
            )
        return cls(str(arrays["pool_digest"]), splits, curve)


class RunStore:
    """Files of one run, in ``root`` (``<out_dir>/runs/<run_id>``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def run_id(self) -> str:
        return self.root.name

    def write_config(self, run_id: str, axes: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Write ``config.json``: the run's id, its grid values and its full resolved config."""
        atomic_write_json(self.root / CONFIG, {"run_id": run_id, "axes": dict(axes), "config": dict(config)})

    def append_metric(self, record: Mapping[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` and flush it (opened per call: a crash loses at most this line)."""
        line = json.dumps(to_strict_json(record), allow_nan=False)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / METRICS, "a+b") as f:
            # A crash may have left a line without its newline; start a fresh line so the new one stays readable.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode("utf-8") + b"\n")
            f.flush()

    def write_diagnostics(self, diagnostics: Mapping[str, Any]) -> None:
        """Write ``diagnostics.json`` (step-0 diagnostics)."""
        atomic_write_json(self.root / DIAGNOSTICS, dict(diagnostics))

    def write_eval_chunks(self, chunks: EvalChunks) -> None:
        """Write ``eval_chunks.npz`` atomically (compressed numpy arrays, no pickles)."""
        arrays = chunks.to_arrays()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

        atomic_write(self.root / EVAL_CHUNKS, write)

    def eval_chunks(self) -> EvalChunks | None:
        """``eval_chunks.npz`` read back, ``None`` when missing (runs stored before loralab wrote it).

        Raises:
            CorruptFileError: it exists but cannot be read as per-chunk losses, naming the file.
        """
        path = self.root / EVAL_CHUNKS
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                return EvalChunks.from_arrays({k: npz[k] for k in npz.files})
        except _NPZ_ERRORS as e:
            raise CorruptFileError(
                f"{path} is not a per-chunk eval file ({e}); rerun the run, or move the file "
                "aside (the report then shows this run without intervals)"
            ) from None

    def write_result(self, result: RunResult) -> None:
        """Write ``result.json``; a result is written once (a second one raises; :meth:`reset` moves one aside)."""
        if (self.root / RESULT).exists():
            raise FileExistsError(f"{self.root / RESULT} exists: a run's result is written once")
        atomic_write_json(self.root / RESULT, result.to_json())

    def result(self) -> RunResult | None:
        """``result.json`` read back as a :class:`RunResult`, ``None`` when missing.

        Raises:
            CorruptFileError: it exists but is not a result (bad JSON, not an object, an unknown status, a field of
                the wrong type), naming the file, the field and the fix.
        """
        path = self.root / RESULT
        fix = (
            f"rerun the sweep to redo the run (it moves the file aside to {RESULT}.corrupt), or restore the file "
            "from a copy"
        )
        data = read_object(path, fix)
        if data is None:
            return None
        if data.get("status") not in STATUSES:
            raise CorruptFileError(f"{path} has status {data.get('status')!r}, not one of {STATUSES}; {fix}")
        try:
            return RunResult.from_json(data)
        except (ConfigError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{path} is not a run result ({e}); {fix}") from None

    def status(self) -> str | None:
        """The status in ``result.json``; ``"corrupt"`` when it cannot be read, ``None`` when there is none."""
        try:
            result = self.result()
        except CorruptFileError:
            return "corrupt"
        return None if result is None else result.status

    def config(self) -> dict | None:
        return read_object(self.root / CONFIG)

    def diagnostics(self) -> dict | None:
        return read_object(self.root / DIAGNOSTICS)

    def metrics(self) -> list[dict]:
        """The metric records in order, skipping lines that do not parse (a crash can truncate the last one)."""
        path = self.root / METRICS
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        out = []
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict):
                out.append(rec)
            elif line.strip() and i < len(lines) - 1:  # only the last line can be cut short by a crash
                warnings.warn(f"{path}:{i + 1}: skipping a corrupt metrics line", stacklevel=2)
        return out

    def pool_digest(self) -> str | None:
        """The held-out pool the run was evaluated on (from ``eval_chunks.npz``); ``None`` without a readable one."""
        try:
            with np.load(self.root / EVAL_CHUNKS, allow_pickle=False) as npz:
                return str(npz["pool_digest"])
        except _NPZ_ERRORS:  # eval_chunks() names a bad file
            return None

    def is_finished(self) -> bool:
        """True iff the run has a readable ``ok`` or ``diverged`` result: a resumed sweep never redoes it."""
        return self.status() in FINISHED

    def reset(self) -> Path | None:
        """Clear an unfinished run so it can be redone; a finished run is never erased.

        A ``failed`` result is moved aside to ``result.json.failed`` (its error and traceback are kept), an
        unreadable one to ``result.json.corrupt``, and the attempt's ``metrics.jsonl`` beside it with the same suffix
        (its history is data too); the other files of the attempt are removed.

        Returns:
            Where the old ``result.json`` went, or ``None`` if there was none.
        """
        status = self.status()
        if status in FINISHED:
            raise RuntimeError(f"refusing to reset {self.root}: the run is finished ({RESULT} says {status!r})")
        if not self.root.exists():
            return None
        moved = None
        if status is not None:  # the metrics first: cut short between the two, a reset again still finds the result
            moved = free_name(self.root / RESULT, f".{status}")
            if (self.root / METRICS).exists():
                move_aside(self.root / METRICS, moved.name[len(RESULT) :])
            os.replace(self.root / RESULT, moved)
        for p in [self.root / n for n in (CONFIG, METRICS, DIAGNOSTICS, EVAL_CHUNKS)] + list(self.root.glob(".*.tmp")):
            p.unlink(missing_ok=True)
        for d in [self.root / ADAPTER, *self.root.glob(f".{ADAPTER}.*")]:  # an attempt's adapter, whole or half
            shutil.rmtree(d, ignore_errors=True)
        return moved

    @property
    def adapter_dir(self) -> Path:
        """Where the run's trained adapter is (or would be): ``<run dir>/adapter/``."""
        return self.root / ADAPTER

    def has_adapter(self) -> bool:
        """Whether ``adapter/`` is there; it appears whole or not at all (:meth:`write_adapter`)."""
        return self.adapter_dir.is_dir()

    def write_adapter(self, fill: Callable[[Path], Any]) -> Path:
        """Write ``adapter/`` atomically: ``fill(tmp)`` writes the files into a temp directory beside it, which is
        then renamed into place, so readers see the whole adapter or none (a crash leaves ``.adapter.*``, which
        :meth:`reset` removes). An existing ``adapter/`` is replaced: only an unfinished run writes one.

        Returns:
            The adapter directory.
        """
        if (self.root / RESULT).exists():
            raise FileExistsError(
                f"{self.root / RESULT} exists: a finished run's adapter is written before its result, never after"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{ADAPTER}.", dir=self.root))
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # the mode a plain mkdir gives, not mkdtemp's 0700
            fill(tmp)
            for f in tmp.iterdir():  # on disk before the rename makes them visible
                if f.is_file():
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
            if self.adapter_dir.exists():
                shutil.rmtree(self.adapter_dir)
            os.rename(tmp, self.adapter_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.adapter_dir

    def adapter_files(self) -> dict[str, bytes] | None:
        """The adapter's files as ``{name: bytes}`` (a few MB for r = 8 on a small model), ``None`` without one."""
        if not self.has_adapter():
            return None
        return {f.name: f.read_bytes() for f in sorted(self.adapter_dir.iterdir()) if f.is_file()}


class ManifestMismatchError(ValueError):
    """The sweep in ``out_dir`` was made from a different config (its run ids differ)."""


def _manifest_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """``"train.max_steps: 3 in the store, 4 now; ..."``: the fields of name, base and grid that differ."""
    a = {**flat(old.get("base", {})), **flat({"grid": old.get("grid", {})}), "name": old.get("name")}
    b = {**flat(new["base"]), **flat({"grid": new["grid"]}), "name": new["name"]}
    missing = "(absent)"
    diffs = [
        f"{k}: {clip(json.dumps(a.get(k, missing)))} in the store, {clip(json.dumps(b.get(k, missing)))} now"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]
    if not diffs:  # same fields, other run ids: e.g. a loralab version that hashes configs differently
        return f"{len(old.get('run_ids', []))} run ids in the store, {len(new['run_ids'])} now, with other ids"
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def config_diff(config: Mapping[str, Any], base: Mapping[str, Any], axes: Sequence[str], limit: int = 4) -> str:
    """``"train.max_steps: 400 in the run, 60 in the sweep"``: where a run's resolved config (its config.json's
    ``config``) differs from a sweep's base config outside the grid ``axes``; ``""`` when it does not.

    Fields whose role is :data:`~.config.schema.EXECUTION` (how fast a run trains, left out of run ids) are not
    compared, nor fields only one side has (a config written by another loralab version).
    """
    skip = [*axes, *(f"{section}.{name}" for section, name in fields_with_role(EXECUTION))]
    a, b = flat(config), flat(base)
    differ = [
        k for k in sorted(set(a) & set(b)) if a[k] != b[k] and not any(k == s or k.startswith(s + ".") for s in skip)
    ]
    diffs = [f"{k}: {clip(json.dumps(a[k]))} in the run, {clip(json.dumps(b[k]))} in the sweep" for k in differ]
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


class SweepStore:
    """A sweep's directory: ``sweep.json`` plus ``runs/<run_id>/`` for each run."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()  # "~/runs" in a config means the home directory, not a dir named "~"

    def check_manifest(
        self, name: str, grid: Mapping[str, Sequence], run_ids: Sequence[str], base: Mapping[str, Any]
    ) -> dict | None:
        """The existing manifest (``None`` if there is none), if it lists the same runs.

        Without ``sweep.json`` (deleted, lost in a copy) the run directories are the store's record of its config:
        one that this config does not plan is refused in the same way.

        Raises:
            ManifestMismatchError: it lists other runs (resuming would mix two sweeps), naming the fields that differ.
            CorruptFileError: ``sweep.json`` cannot be read.
        """
        old = self.manifest()
        if old is None:
            self._check_runs_without_manifest(grid, run_ids, base)
        if old is not None and list(old.get("run_ids", [])) != list(run_ids):
            diff = _manifest_diff(old, {"name": name, "grid": grid, "run_ids": run_ids, "base": base})
            raise ManifestMismatchError(
                f"{self.root / MANIFEST} was written by a different sweep config ({diff}). Its results would mix "
                f"with the new ones: use a new out_dir (--set out_dir=...), or rerun with the config it was made with"
            )
        return old

    def _check_runs_without_manifest(
        self, grid: Mapping[str, Sequence], run_ids: Sequence[str], base: Mapping[str, Any]
    ) -> None:
        runs_dir, planned = self.root / "runs", set(run_ids)
        others = (
            sorted(p for p in runs_dir.iterdir() if p.is_dir() and p.name not in planned and any(p.iterdir()))
            if runs_dir.is_dir()
            else []
        )
        if not others:
            return
        try:
            config = (RunStore(others[0]).config() or {}).get("config")
        except CorruptFileError:
            config = None
        diff = config_diff(config, base, list(grid)) if isinstance(config, dict) else ""
        raise ManifestMismatchError(
            f"{self.root / MANIFEST} is missing, and {runs_dir} holds {len(others)} run(s) this config does not plan, "
            f"e.g. {others[0].name} ({diff or 'another grid, or another loralab version'}). Their results would mix "
            "with the new ones: use a new out_dir (--set out_dir=...), or rerun with the config they were made with"
        )

    def write_manifest(
        self,
        name: str,
        grid: Mapping[str, Sequence],
        run_ids: Sequence[str],
        base: Mapping[str, Any],
        run_axes: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Write ``sweep.json``, or keep the existing one if it lists the same runs (see :meth:`check_manifest`)."""
        if self.check_manifest(name, grid, run_ids, base) is not None:
            return
        manifest: dict[str, Any] = {
            "name": name,
            "grid": {k: list(v) for k, v in grid.items()},
            "run_ids": list(run_ids),
            "base": dict(base),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if run_axes is not None:
            manifest["run_axes"] = [dict(a) for a in run_axes]
        atomic_write_json(self.root / MANIFEST, manifest)

    def drop_unused_manifest(self) -> None:
        """Remove ``sweep.json`` while no run directory holds a file (a sweep stopped before any run wrote one)."""
        runs = self.root / "runs"
        if not (runs.is_dir() and any(p.is_file() for p in runs.glob("*/*"))):
            (self.root / MANIFEST).unlink(missing_ok=True)

    def manifest(self) -> dict | None:
        """``sweep.json`` parsed, ``None`` when missing (``CorruptFileError`` naming it when unreadable)."""
        return read_object(
            self.root / MANIFEST,
            "restore it from a copy, or use a new out_dir: without it the "
            "store cannot tell which runs belong to the sweep",
        )

    def run(self, run_id: str) -> RunStore:
        """The store of one run; ``run_id`` must be a plain directory name."""
        if not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id:
            raise ValueError(f"invalid run id {run_id!r}: it must be a plain directory name")
        return RunStore(self.root / "runs" / run_id)

    def pools(self) -> dict[str, list[str]]:
        """Held-out pool digest -> the finished runs evaluated on it (those with per-chunk losses), in run order."""
        out: dict[str, list[str]] = {}
        for rid in self.run_ids():
            run = self.run(rid)
            digest = run.pool_digest() if run.is_finished() else None
            if digest is not None:
                out.setdefault(digest, []).append(rid)
        return out

    def other_pool(self, digest: str, here: Mapping[str, str]) -> str | None:
        """Why runs evaluated on held-out pool ``digest`` (with package versions ``here``) do not belong in this
        store: its finished runs were evaluated on another pool. ``None`` when they belong.

        The same data config gives another pool when the tokenizer maps the text to other ids, e.g. another
        transformers version converting a GGUF tokenizer with another EOS id; such runs trained on other tokens and
        their eval losses do not pair with the store's.
        """
        others = {d: ids for d, ids in self.pools().items() if d != digest}
        if not others:
            return None
        d, ids = next(iter(others.items()))
        result = self.run(ids[0]).result()
        theirs = {k: v for k, v in (result.versions if result else {}).items() if here.get(k) != v}
        differ = ", ".join(f"{k} {v} there, {here.get(k, '?')} here" for k, v in theirs.items())
        return (
            f"{self.root}: {sum(map(len, others.values()))} finished run(s), e.g. {ids[0]}, were evaluated on held-out "
            f"pool {d}, but the data here gives pool {digest}: the same data config became other tokens "
            f"({differ or 'the same package versions: check the dataset and the tokenizer files'}). Runs on both "
            "would not compare. Fix: install the versions its runs record (the versions in their result.json), or "
            "use a new out_dir (--set out_dir=...)"
        )

    def run_ids(self) -> list[str]:
        """Run ids in manifest order, then any other run directories (sorted)."""
        listed = list((self.manifest() or {}).get("run_ids", []))
        runs_dir = self.root / "runs"
        extra = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.exists() else []
        seen = set(listed)
        return listed + [r for r in extra if r not in seen]

    def statuses(self, run_ids: Sequence[str]) -> dict[str, str | None]:
        """``run_id -> RunStore.status()``: ``ok``/``diverged``/``failed``, ``corrupt`` or ``None`` (no result)."""
        return {r: self.run(r).status() for r in run_ids}

    def records(self) -> list[RunRecord]:
        """Every run joined with its files, in manifest order, including runs never started or unfinished."""
        manifest = self.manifest() or {}
        axes_by_id = dict(zip(manifest.get("run_ids", []), manifest.get("run_axes", [])))
        return [load_record(self.run(r), axes_by_id.get(r)) for r in self.run_ids()]


def sweep_of(run: RunStore) -> SweepStore:
    """The sweep a run belongs to: :meth:`SweepStore.run` puts it at ``<out_dir>/runs/<run_id>``."""
    return SweepStore(run.root.parent.parent)


@dataclass(frozen=True)
class RunRecord:
    """One run as read back from the store: its files joined, for reports.

    Attributes:
        run_id: the run's id.
        status: ``"ok"``, ``"diverged"``, ``"failed"`` (from result.json), ``"unfinished"`` (files but no result:
            crashed, killed or running) or ``"pending"`` (never started).
        axes: the run's grid values (from result.json, else config.json, else the manifest's ``run_axes``).
        path: the run directory.
        config, result, diagnostics: the parsed files, ``None`` when missing or unreadable.
        metrics: the metric records, in order.
        problem: why a file could not be read (an unreadable result makes the run unfinished), else ``None``.
        eval_chunks: the per-chunk eval losses, ``None`` when missing or unreadable (named in ``problem``).
    """

    run_id: str
    status: str
    axes: Mapping[str, Any]
    path: Path
    config: dict | None = None
    result: RunResult | None = None
    diagnostics: dict | None = None
    metrics: tuple[dict, ...] = ()
    problem: str | None = None
    eval_chunks: EvalChunks | None = None

    @property
    def final_eval_loss(self) -> float | None:
        """The run's final eval loss, ``None`` without a result or when it was not finite."""
        return None if self.result is None else self.result.final_eval_loss

    def eval_curve(self) -> list[tuple[int, float]]:
        """``(step, eval_loss)`` pairs with a finite loss, in order."""
        return [
            (int(m["step"]), float(m["eval_loss"]))
            for m in self.metrics
            if m.get("kind") == "eval" and isinstance(m.get("eval_loss"), (int, float))
        ]


def load_record(run: RunStore, axes: Mapping[str, Any] | None = None) -> RunRecord:
    """Read one run's files into a :class:`RunRecord`; ``axes`` is the fallback when no file holds them.

    An unreadable file is read as missing and named in ``problem``: a report lists the run, it does not crash.
    """
    problems: list[str] = []

    def read(method):
        try:
            return method()
        except CorruptFileError as e:
            problems.append(str(e))
            return None

    result, config, diagnostics, metrics = read(run.result), read(run.config), read(run.diagnostics), run.metrics()
    if result is not None:
        status = result.status
    else:
        status = "unfinished" if config is not None or metrics or problems else "pending"
    chunks = read(run.eval_chunks)  # a bad file costs this run its intervals, not its result
    found = (result.axes if result else None) or (config or {}).get("axes") or axes or {}
    return RunRecord(
        run.run_id,
        status,
        dict(found),
        run.root,
        config,
        result,
        diagnostics,
        tuple(metrics),
        "; ".join(problems) or None,
        chunks,
    )
