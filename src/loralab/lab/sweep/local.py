"""The local executor: a sweep's runs in this process, one after another, or several at once in packs on one base.

``run_pack`` is the unit every executor uses to train: it resets the runs' directories, writes their configs, trains
them (a pack of one is a solo run) and, the moment a run ends, saves its adapter and then writes its result
(:func:`..adapters.save_run_adapter`). A run that raises is recorded ``failed`` with its traceback and the sweep goes
on; a pack that runs out of GPU memory is split in halves.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..adapters import save_run_adapter
from ..config.grid import RunSpec
from ..config.typecheck import to_dict
from ..run import train
from ..run.assets import Assets
from ..run.data import DataError
from ..run.models import ModelError
from ..runtime import versions
from ..store import RunResult, RunStore, SweepStore, sweep_of
from ..tracking import Tracking
from .plan import SweepAbort, SweepPlan, check_batches, check_device

__all__ = ["LocalExecutor", "failed_result", "run_pack", "summarize"]


def failed_result(spec: RunSpec, error: str, trace: str) -> RunResult:
    """The ``failed`` result of ``spec``, with the error's first line and the full traceback."""
    return RunResult(
        run_id=spec.run_id,
        status="failed",
        axes=spec.axes,
        error=error.splitlines()[0] if error else "",
        traceback=trace,
        versions=versions(),
    )


def _train(
    specs: Sequence[RunSpec],
    stores: Sequence[RunStore],
    assets: Assets,
    progress: bool,
    done: Callable[[int, RunResult, nn.Module], None],
) -> None:
    try:
        model, data = assets.get(specs[0].run)
    except (ModelError, DataError) as e:  # the model's or the data's fault: every run on them would fail alike
        raise SweepAbort(str(e)) from None
    if problem := sweep_of(stores[0]).other_pool(data.pool_digest, versions()):
        raise SweepAbort(problem)
    for spec in specs:
        check_batches(spec.run, len(data.train))
    train.train_pack(
        specs, stores, base_model=model, data=data, progress=progress, on_done=done, pretrained_cache=assets.pretrained
    )


def run_pack(
    specs: Sequence[RunSpec],
    stores: Sequence[RunStore],
    assets: Assets,
    progress: bool = True,
    on_result: Callable[[RunResult], None] = lambda r: None,
) -> list[RunResult]:
    """Train ``specs`` together (one pack, see :mod:`..run.pack`); the moment a run ends, save its adapter (unless
    ``train.save_adapter`` is off), then write its result: a run is finished only with both.

    A pack that runs out of GPU memory is split in two and each half trained (recursively, down to single runs);
    otherwise a pack that raises records every run not yet finished as ``failed`` with the traceback.
    """
    results: dict[int, RunResult] = {}

    def done(k: int, result: RunResult, model: nn.Module | None = None) -> None:
        if model is not None:  # a run that trained to its end (ok or diverged); failed ones have nothing to save
            result = save_run_adapter(stores[k], specs[k], model, result)
        stores[k].write_result(result)
        results[k] = result
        on_result(result)

    for spec in specs:  # before any file is touched: a missing device is no run's failure
        check_device(spec.run.train.device)
    for spec, store in zip(specs, stores):
        store.reset()
        store.write_config(spec.run_id, spec.axes, to_dict(spec.run))
    try:
        _train(specs, stores, assets, progress, done)
    except SweepAbort:
        for store in stores:  # nothing trained: leave the runs as never started
            store.reset()
        raise
    except Exception as e:  # noqa: BLE001 - any failure is a result, and the sweep goes on
        left = [k for k in range(len(specs)) if k not in results]
        if not (isinstance(e, torch.cuda.OutOfMemoryError) and len(left) > 1):
            for k in left:
                done(k, failed_result(specs[k], f"{type(e).__name__}: {e}", traceback.format_exc()))
    left = [k for k in range(len(specs)) if k not in results]
    if left:  # the pack did not fit: its unfinished runs train in two halves, once the traceback (which holds
        gc.collect()  # the pack's model, optimizer state and activations) is gone
        torch.cuda.empty_cache()
        for half in (left[: len(left) // 2], left[len(left) // 2 :]):
            for k, r in zip(
                half, run_pack([specs[k] for k in half], [stores[k] for k in half], assets, progress, on_result)
            ):
                results[k] = r
    return [results[k] for k in range(len(specs))]


def summarize(r: RunResult) -> str:
    """One line on a finished run, for sweep logs."""
    loss = "n/a" if r.final_eval_loss is None else f"{r.final_eval_loss:.4f}"
    return (
        f"{r.status}: eval loss {loss}, {r.steps} steps, {r.tokens_per_s:.0f} tok/s"
        + (f" (pack of {r.pack_size})" if r.pack_size > 1 else "")
        + (f" ({r.error})" if r.error else "")
    )


class LocalExecutor:
    """The runs in this process: one after another, or packed on one shared base as the plan says."""

    def __init__(self, plan: SweepPlan, progress: bool = True, log: Callable[[str], None] = print):
        self.plan, self.progress, self.log = plan, progress, log
        self.assets = Assets()  # kept across calls of run(): a search that trains one probe at a time loads once

    def check(self, runs: Sequence[RunSpec]) -> None:
        for device in dict.fromkeys(s.run.train.device for s in runs):
            check_device(device)

    def _logger(self, named: bool) -> Callable[[RunResult], None]:
        return lambda r: self.log(f"    {r.run_id + ' ' if named else ''}{summarize(r)}")

    def run(self, runs: Sequence[RunSpec], store: SweepStore) -> None:
        assets, done = self.assets, 0
        tracking = Tracking(self.plan.sweep, self.log)  # the runs' store writes also go to the tracker, if any
        try:
            for group in self.plan.packs(runs):
                names = ", ".join(s.run_id for s in group)
                self.log(f"[{done + 1}{f'-{done + len(group)}' if len(group) > 1 else ''}/{len(runs)}] {names}")
                named = len(group) > 1  # a pack's runs end in any order: name each
                stores = [tracking.watch(store.run(s.run_id)) for s in group]
                run_pack(group, stores, assets, self.progress, self._logger(named))
                done += len(group)
        finally:
            tracking.close()
