"""The run store: one directory per run, the only code that writes or reads run files.

Layout (the lab spec's "Store format"): ``<out_dir>/sweep.json`` (manifest), and per run ``<out_dir>/runs/<run_id>/``
with ``config.json``, ``metrics.jsonl``, ``diagnostics.json`` and ``result.json`` (a run is finished iff it exists).

Every JSON file except metrics.jsonl is written atomically (temp file in the same directory, fsync, ``os.replace``),
so a crash leaves either the old file or the new one, never half of one. JSON is strict: NaN and ±inf become ``null``
(a diverged loss is recorded as "no number", and any JSON reader can load the files). metrics.jsonl is appended line by
line, so a crash can truncate its last line; readers skip it.

Deviation from the spec, additive: ``sweep.json`` may hold ``"run_axes"`` (the axes of each run, parallel to
``run_ids``) so that runs never started still have axes in :meth:`SweepStore.records`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

STATUSES = ("ok", "diverged", "failed")
CONFIG, METRICS, DIAGNOSTICS, RESULT = "config.json", "metrics.jsonl", "diagnostics.json", "result.json"
MANIFEST = "sweep.json"


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


def read_json(path: str | os.PathLike) -> Any:
    """Parse the JSON file at ``path`` (raises ``FileNotFoundError`` if it is missing)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _read_optional(path: Path) -> Any:
    return read_json(path) if path.exists() else None


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

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> dict[str, Any]:
        """The ``result.json`` object (a plain dict, non-finite floats as ``None``)."""
        d = asdict(self)
        d["axes"], d["versions"] = dict(self.axes), dict(self.versions)
        return to_strict_json(d)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RunResult":
        """Build from a ``result.json`` object; unknown keys are an error (the format is versioned by its fields)."""
        return cls(**d)


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

    def write_result(self, result: RunResult) -> None:
        """Write ``result.json``, which marks the run finished; a result is written once (a second one raises)."""
        if self.is_finished():
            raise FileExistsError(f"{self.root / RESULT} exists: a run's result is written once")
        atomic_write_json(self.root / RESULT, result.to_json())

    def result(self) -> dict | None:
        return _read_optional(self.root / RESULT)

    def config(self) -> dict | None:
        return _read_optional(self.root / CONFIG)

    def diagnostics(self) -> dict | None:
        return _read_optional(self.root / DIAGNOSTICS)

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

    def is_finished(self) -> bool:
        return (self.root / RESULT).exists()

    def reset(self) -> None:
        """Remove the files of an unfinished run so it can be redone; a finished run is never erased."""
        if self.is_finished():
            raise RuntimeError(f"refusing to reset {self.root}: the run is finished ({RESULT} exists)")
        if not self.root.exists():
            return
        for p in [self.root / n for n in (CONFIG, METRICS, DIAGNOSTICS)] + list(self.root.glob(".*.tmp")):
            p.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunRecord:
    """One run as read back from the store: its files joined, for reports.

    Attributes:
        run_id: the run's id.
        status: ``"ok"``, ``"diverged"``, ``"failed"`` (from result.json), ``"unfinished"`` (files but no result:
            crashed, killed or running) or ``"pending"`` (never started).
        axes: the run's grid values (from result.json, else config.json, else the manifest's ``run_axes``).
        path: the run directory.
        config, result, diagnostics: the parsed files, ``None`` when missing.
        metrics: the metric records, in order.
    """

    run_id: str
    status: str
    axes: Mapping[str, Any]
    path: Path
    config: dict | None = None
    result: dict | None = None
    diagnostics: dict | None = None
    metrics: tuple[dict, ...] = ()

    def get(self, key: str) -> Any:
        """A field of result.json, ``None`` when the run has no result or no such field."""
        return (self.result or {}).get(key)

    def eval_curve(self) -> list[tuple[int, float]]:
        """``(step, eval_loss)`` pairs with a finite loss, in order."""
        return [(int(m["step"]), float(m["eval_loss"])) for m in self.metrics
                if m.get("kind") == "eval" and isinstance(m.get("eval_loss"), (int, float))]


def load_record(run: RunStore, axes: Mapping[str, Any] | None = None) -> RunRecord:
    """Read one run's files into a :class:`RunRecord`; ``axes`` is the fallback when no file holds them."""
    result, config, metrics = run.result(), run.config(), run.metrics()
    if result is not None:
        status = result.get("status", "failed")
    else:
        status = "unfinished" if config is not None or metrics else "pending"
    found = (result or {}).get("axes") or (config or {}).get("axes") or axes or {}
    return RunRecord(run.run_id, status, dict(found), run.root, config, result, run.diagnostics(), tuple(metrics))


class ManifestMismatchError(ValueError):
    """The sweep in ``out_dir`` was made from a different config (its run ids differ)."""


class SweepStore:
    """A sweep's directory: ``sweep.json`` plus ``runs/<run_id>/`` for each run."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def write_manifest(self, name: str, grid: Mapping[str, Sequence], run_ids: Sequence[str],
                       base: Mapping[str, Any], run_axes: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Write ``sweep.json``, or keep the existing one if it lists the same runs.

        Raises:
            ManifestMismatchError: a manifest with different run ids exists: resuming would mix two sweeps.
        """
        old = self.manifest()
        if old is not None:
            if list(old.get("run_ids", [])) != list(run_ids):
                raise ManifestMismatchError(
                    f"{self.root / MANIFEST} was written by a different sweep config (name {old.get('name')!r}, "
                    f"{len(old.get('run_ids', []))} runs; now {name!r}, {len(run_ids)} runs). Its results would "
                    "mix with the new ones: use a new out_dir, or pass the same config to resume.")
            return
        manifest = {"name": name, "grid": {k: list(v) for k, v in grid.items()}, "run_ids": list(run_ids),
                    "base": dict(base), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if run_axes is not None:
            manifest["run_axes"] = [dict(a) for a in run_axes]
        atomic_write_json(self.root / MANIFEST, manifest)

    def manifest(self) -> dict | None:
        return _read_optional(self.root / MANIFEST)

    def run(self, run_id: str) -> RunStore:
        """The store of one run; ``run_id`` must be a plain directory name."""
        if not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id:
            raise ValueError(f"invalid run id {run_id!r}: it must be a plain directory name")
        return RunStore(self.root / "runs" / run_id)

    def run_ids(self) -> list[str]:
        """Run ids in manifest order, then any other run directories (sorted)."""
        listed = list((self.manifest() or {}).get("run_ids", []))
        runs_dir = self.root / "runs"
        extra = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.exists() else []
        seen = set(listed)
        return listed + [r for r in extra if r not in seen]

    def finished_ids(self) -> list[str]:
        """Ids of finished runs (``result.json`` exists), in :meth:`run_ids` order."""
        return [r for r in self.run_ids() if self.run(r).is_finished()]

    def records(self) -> list[RunRecord]:
        """Every run joined with its files, in manifest order, including runs never started or unfinished."""
        manifest = self.manifest() or {}
        axes_by_id = dict(zip(manifest.get("run_ids", []), manifest.get("run_axes", [])))
        return [load_record(self.run(r), axes_by_id.get(r)) for r in self.run_ids()]
