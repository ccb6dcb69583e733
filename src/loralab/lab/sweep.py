"""Run a grid of runs, resumably, behind a small executor interface.

Resume rule: a run is finished iff its ``result.json`` exists. Rerunning the same command skips finished runs, resets
and redoes unfinished ones (killed or crashed mid-run), and runs the rest. A run that raises is recorded as
``failed`` with its traceback and the sweep goes on; Ctrl-C stops the sweep and leaves the interrupted run
unfinished, to be redone next time.
"""

from __future__ import annotations

import traceback
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


def run_job(job: Job, store: RunStore, assets: _Assets, progress: bool = True) -> RunResult:
    """Train one job and record its result (``failed`` with the traceback if it raised)."""
    from .train import train_run, versions

    store.reset()
    store.write_config(job.run_id, job.axes, to_dict(job.run))
    try:
        model, data = assets.get(job.run)
        result = train_run(job.run, store, base_model=model, data=data, run_id=job.run_id, axes=job.axes,
                           progress=progress)
    except Exception as e:  # noqa: BLE001 - any failure is a result, and the sweep goes on
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        result = RunResult(run_id=job.run_id, status="failed", axes=job.axes,
                           error=f"{type(e).__name__}: {e}".splitlines()[0], traceback=traceback.format_exc(),
                           versions=versions())
    store.write_result(result)
    return result


class LocalExecutor:
    """One run after another in this process."""

    def __init__(self, progress: bool = True, log: Callable[[str], None] = print):
        self.progress, self.log = progress, log

    def run(self, jobs: Sequence[Job], store: SweepStore) -> None:
        assets = _Assets()
        for i, job in enumerate(jobs, 1):
            self.log(f"[{i}/{len(jobs)}] {job.run_id}")
            r = run_job(job, store.run(job.run_id), assets, self.progress)
            loss = "n/a" if r.final_eval_loss is None else f"{r.final_eval_loss:.4f}"
            self.log(f"    {r.status}: eval loss {loss}, {r.steps} steps, {r.tokens_per_s:.0f} tok/s"
                     + (f" ({r.error})" if r.error else ""))


def make_executor(name: str, **kwargs) -> Executor:
    if name == "local":
        return LocalExecutor(**{k: v for k, v in kwargs.items() if k in ("progress", "log")})
    if name == "ray":
        raise ValueError("the ray executor is not available yet; use --executor local")
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
    log(f"ok: {len(jobs) - len(done)} runs to train, {len(done)} already finished")
    return 0
