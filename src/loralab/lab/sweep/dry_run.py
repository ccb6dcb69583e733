"""``loralab sweep CFG --dry-run``: print the grid and check everything the real sweep would, in seconds.

Nothing is trained, loaded (the model is checked on a meta-device skeleton and by its files' headers; the data is
read, not tokenized) or written: the same checks as the sweep (out_dir, the store's manifest, the executor's devices or
cluster, a data cap below one step's batches, and model, data, targets and context length of every run). Whether the
data itself fills one step is known only once it is tokenized: the sweep checks that after loading it, before
training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from ..config.grid import RunSpec
from ..store import FINISHED
from .lock import lock_holder
from .plan import Executor, SweepPlan


def dry_run(plan: SweepPlan, executor: Executor, log: Callable[[str], None] = print) -> int:
    """Print the grid and check everything the real sweep would, without training or writing (seconds).

    Raises:
        ValueError: what the real sweep would fail on (naming it and the fix); the CLI exits 2.
    """
    sweep, jobs = plan.sweep, plan.runs
    store = plan.check(executor)
    statuses = store.statuses(plan.run_ids)
    log(f"sweep {sweep.name!r} -> {store.root}: {len(jobs)} runs over {', '.join(sweep.grid) or 'no axes'}")
    for job in jobs:
        log(f"  {MARKS.get(statuses[job.run_id], 'todo'):<5}{job.run_id}")
    plan.check_inputs(jobs, log)
    todo = [j for j in jobs if statuses[j.run_id] not in FINISHED]
    _log_packs(plan, todo, log)
    if (pid := lock_holder(store.root)) is not None:
        log(
            f"note: a sweep (pid {pid}) is writing to {store.root} now; the real run would refuse to start until it "
            "ends"
        )
    redo = sum(MARKS.get(statuses[j.run_id]) == "redo" for j in jobs)
    log(
        f"ok: {len(todo)} runs to train, {len(jobs) - len(todo)} already finished"
        + (f"; {redo} failed before or cannot be read, and are redone" if redo else "")
    )
    return 0


# by RunStore.status()
MARKS: dict[str | None, str] = {"ok": "done", "diverged": "done", "failed": "redo", "corrupt": "redo"}


def _log_packs(plan: SweepPlan, todo: Sequence[RunSpec], log: Callable[[str], None]) -> None:
    sweep, packs = plan.sweep, plan.packs(todo)
    sizes = ", ".join(f"{n} x {size}" for size, n in sorted(Counter(len(p) for p in packs).items()))
    log(
        f"packing (pack={sweep.pack}{' = auto' if sweep.pack == 0 else ''}): locally, the runs to train go in "
        f"{len(packs)} pack(s): {sizes or 'none'} (count x runs per pack)"
    )
