"""Run a grid of runs, resumably, behind a small executor interface; locally, runs can share a base in packs.

Resume rule: a run is finished iff its ``result.json`` exists. Rerunning the same command skips finished runs, resets
and redoes unfinished ones (killed or crashed mid-run), and runs the rest. A run that raises is recorded as
``failed`` with its traceback and the sweep goes on; Ctrl-C stops the sweep and leaves the interrupted run
unfinished, to be redone next time.
"""

from __future__ import annotations

import gc
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .config import RunConfig, SweepConfig, expand, run_id, to_dict
from .store import RunResult, RunStore, SweepStore


@dataclass(frozen=True)
class Job:
    run_id: str
    axes: dict
    run: RunConfig


class Executor(Protocol):
    """Runs jobs and writes each one's result into ``store``; finished jobs are never passed in."""

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


def run_pack(jobs: Sequence[Job], stores: Sequence[RunStore], assets: _Assets, progress: bool = True,
             on_result: Callable[[RunResult], None] = lambda r: None) -> list[RunResult]:
    """Train ``jobs`` together (one pack, see :mod:`.pack`) and write each result the moment its run ends.

    A pack that runs out of GPU memory is split in two and each half trained (recursively, down to single runs);
    otherwise a pack that raises records every run not yet finished as ``failed`` with the traceback, and the sweep
    goes on.
    """
    from . import train

    results: dict[int, RunResult] = {}

    def done(k: int, result: RunResult) -> None:
        stores[k].write_result(result)
        results[k] = result
        on_result(result)

    for job, store in zip(jobs, stores):
        store.reset()
        store.write_config(job.run_id, job.axes, to_dict(job.run))
    try:
        model, data = assets.get(jobs[0].run)
        if len(jobs) == 1:   # the solo path, kept as its own call so a single run is easy to trace and hook
            done(0, train.train_run(jobs[0].run, stores[0], base_model=model, data=data, run_id=jobs[0].run_id,
                                    axes=jobs[0].axes, progress=progress))
        else:
            train.train_pack([j.run for j in jobs], stores, base_model=model, data=data,
                             run_ids=[j.run_id for j in jobs], axes=[j.axes for j in jobs], progress=progress,
                             on_done=done)
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
        try:
            import ray  # noqa: F401 - checked here, so a missing Ray fails the dry run, not the real one
        except ImportError as e:
            raise ValueError("the ray executor needs Ray, which is not installed: pip install 'loralab[ray]' "
                             "(or pip install 'ray>=2.9'), or use --executor local") from e
        from .ray_executor import RayExecutor

        # Not `progress`: bars drawn on Ray workers only reach their log files.
        return RayExecutor(**{k: v for k, v in kwargs.items() if k in ("address", "resources", "log")})
    raise ValueError(f"unknown executor {name!r}; valid: local, ray")


def run_sweep(sweep: SweepConfig, executor: Executor | None = None, log: Callable[[str], None] = print) -> SweepStore:
    """Run every unfinished job of the grid; returns the store (the report reads it)."""
    jobs = plan_jobs(sweep)
    store = SweepStore(sweep.out_dir)
    store.write_manifest(sweep.name, {k: list(v) for k, v in sweep.grid.items()}, [j.run_id for j in jobs],
                         to_dict(sweep.base), run_axes=[j.axes for j in jobs])
    done = set(store.finished_ids())
    todo = [j for j in jobs if j.run_id not in done]
    log(f"sweep {sweep.name!r}: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run "
        f"-> {store.root}")
    (executor or LocalExecutor(log=log)).run(todo, store)
    return store


def dry_run(sweep: SweepConfig, log: Callable[[str], None] = print) -> int:
    """Print the grid and validate model, data and targets of every run without training (seconds)."""
    from loralab.inject import validate

    from .data import check_data
    from .models import check_model, model_skeleton

    jobs = plan_jobs(sweep)
    store = SweepStore(sweep.out_dir)
    done = set(store.finished_ids()) if store.manifest() else set()
    axes = list(sweep.grid)
    log(f"sweep {sweep.name!r} -> {store.root}: {len(jobs)} runs over {', '.join(axes) or 'no axes'}")
    for job in jobs:
        log(f"  {'done' if job.run_id in done else 'todo':<5}{job.run_id}")
    for model_cfg in dict.fromkeys(j.run.model for j in jobs):
        log(f"model: {check_model(model_cfg)}")
        skeleton = model_skeleton(model_cfg)
        for lora in dict.fromkeys(j.run.lora for j in jobs if j.run.model == model_cfg):
            n = len(validate(skeleton, lora))
            log(f"  lora {lora.init} r={lora.rank}: {n} modules match targets={lora.targets!r}")
    for data_cfg in dict.fromkeys(j.run.data for j in jobs):
        log(f"data: {check_data(data_cfg)}")
    packs = plan_packs([j for j in jobs if j.run_id not in done], sweep.pack)
    sizes = ", ".join(f"{n} x {size}" for size, n in sorted(Counter(len(p) for p in packs).items()))
    log(f"packing (pack={sweep.pack}{' = auto' if sweep.pack == 0 else ''}): locally, the runs to train go in "
        f"{len(packs)} pack(s): {sizes or 'none'} (count x runs per pack)")
    log(f"ok: {len(jobs) - len(done)} runs to train, {len(done)} already finished")
    return 0
