"""Run a sweep, resumably: every run of the plan that is not finished, through an executor.

Resume rule: a run is finished iff its ``result.json`` says ``ok`` or ``diverged`` (those are results). Rerunning the
same command skips finished runs, redoes unfinished ones (killed or crashed mid-run) and ``failed`` ones (their old
result is moved aside, see ``RunStore.reset``), and runs the rest. A run that raises is recorded as ``failed`` with
its traceback and the sweep goes on; the command then exits 1. Ctrl-C stops the sweep and leaves the interrupted run
unfinished, to be redone next time. Problems no run is at fault for stop the sweep first (``plan.py``); one sweep at
a time writes to an out_dir (``lock.py``).

A new executor implements :class:`.plan.Executor` in a module of its own and is named in :func:`make_executor`.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ..config.grid import RunSpec
from ..config.schema import EXECUTORS, SweepConfig
from ..store import FINISHED, SweepStore
from ..tracking import Tracking
from .local import LocalExecutor
from .lock import SweepLock
from .plan import Executor, SweepAbort, SweepPlan

__all__ = ["make_executor", "outcome", "prepare_redo", "run_sweep"]


def make_executor(
    plan: SweepPlan,
    name: str = "local",
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    address: str | None = None,
) -> Executor:
    """The executor called ``name`` for ``plan``; ``address`` is a Ray cluster's (Ray only)."""
    if name == "local":
        return LocalExecutor(plan, progress=progress, log=log)
    if name == "ray":
        try:  # checked here, so a missing Ray fails the dry run, not the real one
            importlib.import_module("ray")
        except ImportError as e:
            raise ValueError(
                "the ray executor needs Ray, which is not installed: pip install 'loralab[ray]' "
                "(or pip install 'ray>=2.9'), or use --executor local"
            ) from e
        from .ray_executor import RayExecutor

        # Not `progress`: bars drawn on Ray workers only reach their log files.
        return RayExecutor(address=address, resources=plan.sweep.resources, log=log, tracking=Tracking(plan.sweep, log))
    raise ValueError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")


def prepare_redo(
    store: SweepStore, runs: Sequence[RunSpec], statuses: dict[str, Any], log: Callable[[str], None]
) -> int:
    """Move aside the results of failed and unreadable runs (``RunStore.reset``); returns how many failed before."""
    for spec in runs:
        status = statuses[spec.run_id]
        if status in ("failed", "corrupt"):
            moved = store.run(spec.run_id).reset()
            if status == "corrupt" and moved is not None:
                log(
                    f"warning: {moved.parent / 'result.json'} could not be read; moved aside to {moved.name}, the "
                    "run is redone"
                )
    return sum(statuses[s.run_id] == "failed" for s in runs)


def run_sweep(plan: SweepPlan, executor: Executor | None = None, log: Callable[[str], None] = print) -> SweepStore:
    """Run every unfinished or failed run of ``plan``; returns the store (the report reads it).

    Raises:
        SweepAbort, ValueError: a problem no run can get past (see ``plan.py``); nothing is trained.
    """
    executor = executor or LocalExecutor(plan, log=log)
    store = plan.check(executor)
    with SweepLock(store.root, log):
        statuses = store.statuses(plan.run_ids)
        todo = [s for s in plan.runs if statuses[s.run_id] not in FINISHED]
        plan.check_inputs(todo)  # what would fail every run alike stops the sweep here, once, writing nothing
        fresh = store.manifest() is None
        store.write_manifest(**plan.manifest(), run_axes=[s.axes for s in plan.runs])
        failed = prepare_redo(store, todo, statuses, log)
        log(
            f"sweep {plan.sweep.name!r}: {len(plan.runs)} runs, {len(plan.runs) - len(todo)} already finished, "
            f"{len(todo)} to run"
            + (f" ({failed} of them failed before: redoing them)" if failed else "")
            + f" -> {store.root}"
        )
        try:
            executor.run(todo, store)
        except SweepAbort:  # the fix (another model, data or batch size) gives other run ids: let them start here
            if fresh:
                store.drop_unused_manifest()
            raise
    return store


def outcome(sweep: SweepConfig, store: SweepStore) -> tuple[int, str]:
    """``(exit code, last line)`` of a sweep: 1 when any of its runs ended ``failed``, else 0."""
    statuses = store.statuses((store.manifest() or {}).get("run_ids", []))
    counts = Counter(s or "not run" for s in statuses.values())
    text = ", ".join(f"{n} {s}" for s, n in counts.items())
    if counts["failed"]:
        return 1, (
            f"sweep {sweep.name!r} FAILED: {counts['failed']} of {len(statuses)} runs failed ({text}); their "
            f"errors are in {store.root}/runs/*/result.json; fix the cause and rerun the same command to redo "
            "them"
        )
    return 0, f"sweep {sweep.name!r} done: {text} -> {store.root}"
