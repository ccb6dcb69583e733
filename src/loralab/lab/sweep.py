"""Run a grid of runs, resumably, behind a small executor interface; locally, runs can share a base in packs.

Resume rule: a run is finished iff its ``result.json`` says ``ok`` or ``diverged`` (those are results). Rerunning the
same command skips finished runs, redoes unfinished ones (killed or crashed mid-run) and ``failed`` ones (their old
result is moved aside, see ``RunStore.reset``), and runs the rest. A run that raises is recorded as ``failed`` with
its traceback and the sweep goes on; the command then exits 1. Ctrl-C stops the sweep and leaves the interrupted run
unfinished, to be redone next time.

Errors that are not a run's fault (the configured device is missing, the data cannot fill one step's batches, the
out_dir is a file, another sweep writes there) would fail every run alike: they raise :class:`SweepAbort` (or a
``ValueError`` naming the problem) and stop the sweep instead, and ``--dry-run`` checks them before any training.
One sweep at a time writes to an out_dir (``lock.py``).
"""

from __future__ import annotations

import gc
import importlib
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .config import RunConfig, SweepConfig, expand, run_id, to_dict
from .lock import SweepLock
from .preflight import SweepAbort, check_batches, check_device
from .store import FINISHED, RunResult, RunStore, SweepStore, check_out_dir

__all__ = ["Executor", "Job", "LocalExecutor", "SweepAbort", "check_sweep", "make_executor", "outcome", "plan_jobs",
           "plan_packs", "run_job", "run_pack", "run_sweep"]


@dataclass(frozen=True)
class Job:
    run_id: str
    axes: dict
    run: RunConfig


class Executor(Protocol):
    """Runs jobs and writes each one's result into ``store``; finished jobs are never passed in.

    An executor may also have ``check(jobs)``: what can be checked before training (devices, a cluster's address),
    raising :class:`SweepAbort` or ``ValueError``; the sweep and its dry run call it first.
    """

    def run(self, jobs: Sequence[Job], store: SweepStore) -> None: ...


def plan_jobs(sweep: SweepConfig) -> list[Job]:
    return [Job(run_id(run, axes), axes, run) for axes, run in expand(sweep)]


class _Assets:
    """Keeps the last base model and dataset loaded, so consecutive runs on the same ones load them once."""

    def __init__(self):
        self._model_key = self._data_key = None
        self.model = self.tokenizer = self.data = None

    def get(self, run: RunConfig):
        from .data import load_data
        from .models import load_model
        from .train import pick_device

        model_key = (run.model, run.train.device)
        if model_key != self._model_key:
            self.model = self.tokenizer = self.data = self._data_key = None  # free memory before loading
            self.model, self.tokenizer = load_model(run.model, pick_device(run.train.device))
            self.model.requires_grad_(False)
            self._model_key = model_key
        if run.data != self._data_key:
            self.data, self._data_key = load_data(run.data, self.tokenizer), run.data
        return self.model, self.data


def _failed(job: Job, e: BaseException) -> RunResult:
    from .train import versions

    return RunResult(run_id=job.run_id, status="failed", axes=job.axes, error=f"{type(e).__name__}: {e}".splitlines()[0],
                     traceback=traceback.format_exc(), versions=versions())


def _train_jobs(jobs: Sequence[Job], stores: Sequence[RunStore], assets: _Assets, progress: bool,
                done: Callable[[int, RunResult], None]) -> None:
    from . import train

    model, data = assets.get(jobs[0].run)
    for job in jobs:
        check_batches(job.run, len(data.train))
    if len(jobs) == 1:   # the solo path, kept as its own call so a single run is easy to trace and hook
        done(0, train.train_run(jobs[0].run, stores[0], base_model=model, data=data, run_id=jobs[0].run_id,
                                axes=jobs[0].axes, progress=progress))
    else:
        train.train_pack([j.run for j in jobs], stores, base_model=model, data=data, run_ids=[j.run_id for j in jobs],
                         axes=[j.axes for j in jobs], progress=progress, on_done=done)


def run_pack(jobs: Sequence[Job], stores: Sequence[RunStore], assets: _Assets, progress: bool = True,
             on_result: Callable[[RunResult], None] = lambda r: None) -> list[RunResult]:
    """Train ``jobs`` together (one pack, see :mod:`.pack`) and write each result the moment its run ends.

    A pack that runs out of GPU memory is split in two and each half trained (recursively, down to single runs);
    otherwise a pack that raises records every run not yet finished as ``failed`` with the traceback, and the sweep
    goes on.
    """
    results: dict[int, RunResult] = {}

    def done(k: int, result: RunResult) -> None:
        stores[k].write_result(result)
        results[k] = result
        on_result(result)

    for job in jobs:   # before any file is touched: a missing device is no run's failure
        check_device(job.run.train.device)
    for job, store in zip(jobs, stores):
        store.reset()
        store.write_config(job.run_id, job.axes, to_dict(job.run))
    try:
        _train_jobs(jobs, stores, assets, progress, done)
    except SweepAbort:
        for store in stores:   # nothing trained: leave the runs as never started
            store.reset()
        raise
    except Exception as e:  # noqa: BLE001 - any failure is a result, and the sweep goes on
        left = [k for k in range(len(jobs)) if k not in results]
        if not (isinstance(e, torch.cuda.OutOfMemoryError) and len(left) > 1):
            for k in left:
                done(k, _failed(jobs[k], e))
    left = [k for k in range(len(jobs)) if k not in results]
    if left:   # the pack did not fit: its unfinished runs train in two halves, once the traceback (which holds
        gc.collect()   # the pack's model, optimizer state and activations) is gone
        torch.cuda.empty_cache()
        for half in (left[:len(left) // 2], left[len(left) // 2:]):
            for k, r in zip(half, run_pack([jobs[k] for k in half], [stores[k] for k in half], assets, progress,
                                           on_result)):
                results[k] = r
    return [results[k] for k in range(len(jobs))]


def run_job(job: Job, store: RunStore, assets: _Assets, progress: bool = True) -> RunResult:
    """Train one job and record its result (``failed`` with the traceback if it raised)."""
    return run_pack([job], [store], assets, progress)[0]


def plan_packs(jobs: Sequence[Job], pack: int, device: str = "auto") -> list[list[Job]]:
    """Split ``jobs`` into packs: runs that may share a base (equal :func:`.pack.pack_key`), in grid order,
    at most ``pack`` per pack (0 = auto: as many as :data:`AUTO_PACK_TOKENS` tokens per micro-batch allow on CUDA,
    one run at a time elsewhere)."""
    from .pack import pack_key
    from .train import pick_device

    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(pack_key(job.run), []).append(job)
    packs = []
    for group in groups.values():
        size = pack
        if size == 0:
            cfg = group[0].run
            on_cuda = pick_device(cfg.train.device if device == "auto" else device).type == "cuda"
            size = max(1, AUTO_PACK_TOKENS // (cfg.train.batch_size * cfg.data.seq_len)) if on_cuda else 1
        packs += [group[i:i + size] for i in range(0, len(group), size)]
    return packs


AUTO_PACK_TOKENS = 16384   # tokens per packed micro-batch on CUDA (a pack that does not fit is split)


def summarize(r: RunResult) -> str:
    """One line on a finished run, for sweep logs."""
    loss = "n/a" if r.final_eval_loss is None else f"{r.final_eval_loss:.4f}"
    return (f"{r.status}: eval loss {loss}, {r.steps} steps, {r.tokens_per_s:.0f} tok/s"
            + (f" (pack of {r.pack_size})" if r.pack_size > 1 else "") + (f" ({r.error})" if r.error else ""))


class LocalExecutor:
    """The runs in this process: one after another, or ``pack`` at a time on one shared base (0 = auto)."""

    def __init__(self, progress: bool = True, log: Callable[[str], None] = print, pack: int = 0):
        self.progress, self.log, self.pack = progress, log, pack

    def check(self, jobs: Sequence[Job]) -> None:
        for device in dict.fromkeys(j.run.train.device for j in jobs):
            check_device(device)

    def run(self, jobs: Sequence[Job], store: SweepStore) -> None:
        assets, done = _Assets(), 0
        for group in plan_packs(jobs, self.pack):
            names = ", ".join(j.run_id for j in group)
            self.log(f"[{done + 1}{f'-{done + len(group)}' if len(group) > 1 else ''}/{len(jobs)}] {names}")
            named = len(group) > 1   # a pack's runs end in any order: name each
            run_pack(group, [store.run(j.run_id) for j in group], assets, self.progress,
                     lambda r: self.log(f"    {r.run_id + ' ' if named else ''}{summarize(r)}"))
            done += len(group)


def make_executor(name: str, **kwargs) -> Executor:
    if name == "local":
        return LocalExecutor(**{k: v for k, v in kwargs.items() if k in ("progress", "log", "pack")})
    if name == "ray":
        try:   # checked here, so a missing Ray fails the dry run, not the real one
            importlib.import_module("ray")
        except ImportError as e:
            raise ValueError("the ray executor needs Ray, which is not installed: pip install 'loralab[ray]' "
                             "(or pip install 'ray>=2.9'), or use --executor local") from e
        from .ray_executor import RayExecutor

        # Not `progress`: bars drawn on Ray workers only reach their log files.
        return RayExecutor(**{k: v for k, v in kwargs.items() if k in ("address", "resources", "log")})
    raise ValueError(f"unknown executor {name!r}; valid: local, ray")


def manifest_fields(sweep: SweepConfig, jobs: Sequence[Job]) -> dict:
    """What ``sweep.json`` records (and is checked against): the same for the real sweep and its dry run."""
    return {"name": sweep.name, "grid": {k: list(v) for k, v in sweep.grid.items()},
            "run_ids": [j.run_id for j in jobs], "base": to_dict(sweep.base)}


def check_sweep(sweep: SweepConfig, jobs: Sequence[Job], executor: Executor) -> SweepStore:
    """What the sweep and its dry run check before any training; returns the store (not written to)."""
    store = SweepStore(sweep.out_dir)
    check_out_dir(store.root)
    store.check_manifest(**manifest_fields(sweep, jobs))
    for job in jobs:   # the real chunk count needs tokenizing (run_pack checks it); a cap below one step fails already
        if job.run.data.max_train_chunks:
            check_batches(job.run, job.run.data.max_train_chunks, "data.max_train_chunks keeps")
    check = getattr(executor, "check", None)
    if check is not None:
        check(jobs)
    return store


def _prepare_redo(store: SweepStore, jobs: Sequence[Job], statuses: dict, log: Callable[[str], None]) -> int:
    """Move aside the results of failed and unreadable runs (``RunStore.reset``); returns how many failed before."""
    for job in jobs:
        status = statuses[job.run_id]
        if status in ("failed", "corrupt"):
            moved = store.run(job.run_id).reset()
            if status == "corrupt":
                log(f"warning: {moved.parent / 'result.json'} could not be read; moved aside to {moved.name}, the "
                    "run is redone")
    return sum(statuses[j.run_id] == "failed" for j in jobs)


def run_sweep(sweep: SweepConfig, executor: Executor | None = None, log: Callable[[str], None] = print) -> SweepStore:
    """Run every unfinished or failed job of the grid; returns the store (the report reads it).

    Raises:
        SweepAbort, ValueError: a problem no run can get past (see the module docstring); nothing is trained.
    """
    jobs = plan_jobs(sweep)
    executor = executor or LocalExecutor(log=log)
    store = check_sweep(sweep, jobs, executor)
    with SweepLock(store.root, log):
        store.write_manifest(**manifest_fields(sweep, jobs), run_axes=[j.axes for j in jobs])
        statuses = store.statuses([j.run_id for j in jobs])
        todo = [j for j in jobs if statuses[j.run_id] not in FINISHED]
        failed = _prepare_redo(store, todo, statuses, log)
        log(f"sweep {sweep.name!r}: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run"
            + (f" ({failed} of them failed before: redoing them)" if failed else "") + f" -> {store.root}")
        executor.run(todo, store)
    return store


def outcome(sweep: SweepConfig, store: SweepStore) -> tuple[int, str]:
    """``(exit code, last line)`` of a sweep: 1 when any of its runs ended ``failed``, else 0."""
    statuses = store.statuses((store.manifest() or {}).get("run_ids", []))
    counts = Counter(s or "not run" for s in statuses.values())
    text = ", ".join(f"{n} {s}" for s, n in counts.items())
    if counts["failed"]:
        return 1, (f"sweep {sweep.name!r} FAILED: {counts['failed']} of {len(statuses)} runs failed ({text}); their "
                   f"errors are in {store.root}/runs/*/result.json; fix the cause and rerun the same command to redo "
                   "them")
    return 0, f"sweep {sweep.name!r} done: {text} -> {store.root}"
