"""A run as read back from the store, for reports: its files joined, unreadable ones named instead of raising."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .jsonfiles import CorruptFileError

if TYPE_CHECKING:
    from .store import RunStore


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
        problem: why a file could not be read (the run then counts as unfinished), else ``None``.
    """

    run_id: str
    status: str
    axes: Mapping[str, Any]
    path: Path
    config: dict | None = None
    result: dict | None = None
    diagnostics: dict | None = None
    metrics: tuple[dict, ...] = ()
    problem: str | None = None

    def get(self, key: str) -> Any:
        """A field of result.json, ``None`` when the run has no result or no such field."""
        return (self.result or {}).get(key)

    def eval_curve(self) -> list[tuple[int, float]]:
        """``(step, eval_loss)`` pairs with a finite loss, in order."""
        return [(int(m["step"]), float(m["eval_loss"])) for m in self.metrics
                if m.get("kind") == "eval" and isinstance(m.get("eval_loss"), (int, float))]


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
        status = result["status"]
    else:
        status = "unfinished" if config is not None or metrics or problems else "pending"
    found = (result or {}).get("axes") or (config or {}).get("axes") or axes or {}
    return RunRecord(run.run_id, status, dict(found), run.root, config, result, diagnostics, tuple(metrics),
                     "; ".join(problems) or None)
