"""``loralab sweep CFG --dry-run``: print the grid and check everything the real sweep would, in seconds.

Nothing is trained, loaded (the model is checked on a meta-device skeleton) or written: the same checks as the sweep
(out_dir, the store's manifest, the executor's devices or cluster, a data cap below one step's batches) plus model,
data and targets of every run. Whether the data itself fills one step is known only once it is tokenized: the sweep
checks that after loading it, before training.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

from .config import SweepConfig
from .lock import lock_holder
from .store import FINISHED
from .sweep import Executor, Job, LocalExecutor, check_sweep, plan_jobs, plan_packs


def dry_run(sweep: SweepConfig, executor: Executor | None = None, log: Callable[[str], None] = print) -> int:
    """Print the grid and check everything the real sweep would, without training or writing (seconds).

    Raises:
        ValueError: what the real sweep would fail on (naming it and the fix); the CLI exits 2.
    """
    jobs = plan_jobs(sweep)
    store = check_sweep(sweep, jobs, executor or LocalExecutor(log=log))
    statuses = store.statuses([j.run_id for j in jobs])
    log(f"sweep {sweep.name!r} -> {store.root}: {len(jobs)} runs over {', '.join(sweep.grid) or 'no axes'}")
    for job in jobs:
        log(f"  {MARKS.get(statuses[job.run_id], 'todo'):<5}{job.run_id}")
    _check_inputs(jobs, log)
    todo = [j for j in jobs if statuses[j.run_id] not in FINISHED]
    _log_packs(sweep, todo, log)
    if (pid := lock_holder(store.root)) is not None:
        log(f"note: a sweep (pid {pid}) is writing to {store.root} now; the real run would refuse to start until it "
            "ends")
    redo = sum(MARKS.get(statuses[j.run_id]) == "redo" for j in jobs)
    log(f"ok: {len(todo)} runs to train, {len(jobs) - len(todo)} already finished"
        + (f"; {redo} failed before or cannot be read, and are redone" if redo else ""))
    return 0


MARKS = {"ok": "done", "diverged": "done", "failed": "redo", "corrupt": "redo"}   # by RunStore.status()


def _check_inputs(jobs: Sequence[Job], log: Callable[[str], None]) -> None:
    """Model, targets and data of every run, without loading weights or reading the data."""
    from loralab.inject import validate

    from .data import check_data
    from .models import check_model, model_skeleton

    for model_cfg in dict.fromkeys(j.run.model for j in jobs):
        log(f"model: {check_model(model_cfg)}")
        skeleton = model_skeleton(model_cfg)
        for lora in dict.fromkeys(j.run.lora for j in jobs if j.run.model == model_cfg):
            n = len(validate(skeleton, lora))
            log(f"  lora {lora.init} r={lora.rank}: {n} modules match targets={lora.targets!r}")
    for data_cfg in dict.fromkeys(j.run.data for j in jobs):
        log(f"data: {check_data(data_cfg)}")


def _log_packs(sweep: SweepConfig, todo: Sequence[Job], log: Callable[[str], None]) -> None:
    packs = plan_packs(todo, sweep.pack)
    sizes = ", ".join(f"{n} x {size}" for size, n in sorted(Counter(len(p) for p in packs).items()))
    log(f"packing (pack={sweep.pack}{' = auto' if sweep.pack == 0 else ''}): locally, the runs to train go in "
        f"{len(packs)} pack(s): {sizes or 'none'} (count x runs per pack)")
