"""The stability search of claim 2 (docs/results/alpha-lr.md): the largest stable learning rate of every series of a
sweep (a series = one value of every grid axis but ``train.lr``), training only the probes the search needs.

The store is the sweep's own (``configs/alpha-lr-probe.toml``): its manifest lists the whole grid, the search trains
some of its runs through the sweep's executor and leaves the others pending. So ``loralab sweep`` on the same file
trains the rest (the brute-force check, e.g. packed on a GPU), ``loralab report`` reads the store as any other, and a
rerun resumes: the search walks the same path over the finished probes and trains only what is missing. A probe is
stable iff its run finished ``ok``; ``diverged`` (the lab's divergence rule) is unstable.

The search is the width study's (:func:`..width.probe.max_stable`) on the indices of the learning-rate grid: walk an
octave at a time to a bracket, bisect to adjacent grid points, confirm that the next ``confirm`` points above are
unstable too. Its start: the same series at the nearest smaller α, moved by α^-3/4 (between the toy's α^-1/2 and
α^-1); else a finished series that differs only in its seed; else ``start_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ...config.grid import RunSpec
from ...config.schema import SweepConfig
from ...store import FINISHED, SweepStore
from ...sweep.lock import SweepLock
from ...sweep.plan import Executor, SweepPlan
from ...sweep.run import make_executor, prepare_redo
from ..width.probe import max_stable

__all__ = ["lr_grid", "plan_search", "run_search", "series_of"]

LR, ALPHA, SEED = "train.lr", "lora.alpha", "train.seed"
Key = tuple[tuple[str, Any], ...]


def lr_grid(sweep: SweepConfig) -> tuple[list[float], int]:
    """The sweep's learning rates and how many of them make an octave.

    Raises:
        ValueError: ``train.lr`` is not a grid axis, or not an ascending geometric grid of 2^(1/p) steps.
    """
    values = [float(v) for v in sweep.grid.get(LR, ())]
    fix = 'list ascending learning rates 2^(1/p) apart, e.g. "train.lr" = [2^(k/2) for k = -28 … 0]'
    if len(values) < 3:
        raise ValueError(f"the stability search needs a train.lr grid axis of >= 3 values; got {values}: {fix}")
    ratios = [b / a for a, b in zip(values, values[1:])]
    per_octave = 1 / math.log2(ratios[0]) if ratios[0] > 1 else 0.0
    p = round(per_octave)
    if p < 1 or abs(per_octave - p) > 1e-6 or any(abs(r / ratios[0] - 1) > 1e-9 for r in ratios):
        raise ValueError(f"train.lr = {values} is not an ascending grid of 2^(1/p) steps: {fix}")
    return values, p


def series_of(plan: SweepPlan) -> dict[Key, list[RunSpec]]:
    """The plan's runs grouped by every axis but ``train.lr``, in grid order, each list in learning-rate order."""
    out: dict[Key, list[RunSpec]] = {}
    for spec in plan.runs:
        out.setdefault(tuple((a, v) for a, v in spec.axes.items() if a != LR), []).append(spec)
    return {k: sorted(v, key=lambda s: float(s.axes[LR])) for k, v in out.items()}


def _start(found: Mapping[Key, int | None], key: Key, lrs: Sequence[float], start_lr: float, p: int) -> int:
    """Grid index where the search of ``key`` starts (module docstring)."""
    mine = dict(key)

    def differs_only_in(other: Key, axis: str) -> bool:
        o = dict(other)
        return all(o[a] == v for a, v in mine.items() if a != axis)

    if ALPHA in mine:
        smaller = [(dict(o)[ALPHA], k) for o, k in found.items() if k is not None and differs_only_in(o, ALPHA)]
        smaller = [(a, k) for a, k in smaller if a < mine[ALPHA]]
        if smaller:
            alpha, k = max(smaller)
            return round(k + p * math.log2((mine[ALPHA] / alpha) ** -0.75))
    same = [k for o, k in found.items() if k is not None and differs_only_in(o, SEED)]
    if same:
        return same[-1]
    return min(range(len(lrs)), key=lambda i: abs(math.log2(lrs[i] / start_lr)))


def plan_search(sweep: SweepConfig) -> str:
    """What :func:`run_search` would do, read from the store without writing: series, probes already finished."""
    plan = SweepPlan.build(sweep)
    lrs, p = lr_grid(sweep)
    store = SweepStore(sweep.out_dir)
    statuses = store.statuses(plan.run_ids) if (store.root / "runs").is_dir() else {}
    done = sum(s in FINISHED for s in statuses.values())
    return (
        f"stability search '{sweep.name}' -> {store.root}: {len(series_of(plan))} series x {len(lrs)} learning "
        f"rates ({lrs[0]:.3g} … {lrs[-1]:.3g}, {p} per octave) = {len(plan.runs)} grid points; {done} probes "
        "finished; the search trains ~4-6 probes per series"
    )


def run_search(
    sweep: SweepConfig,
    *,
    start_lr: float = 1e-2,
    confirm: int = 1,
    executor: Executor | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[Key, float | None]:
    """Find every series' largest stable grid learning rate (``None``: the lowest is unstable), training what is
    missing into the sweep's store; returns ``{series: lr}``.

    Raises:
        SweepAbort, ValueError: what the sweep itself would refuse (device, store of another config, model, data), a
            learning-rate axis that is not a geometric grid, or a probe that failed (its traceback is in the store).
    """
    if confirm < 0:
        raise ValueError(f"confirm must be >= 0 (grid points above the answer checked unstable); got {confirm}")
    plan = SweepPlan.build(sweep)
    lrs, p = lr_grid(sweep)
    executor = executor or make_executor(plan, "local", progress=progress, log=log)
    store = plan.check(executor)
    groups = series_of(plan)
    found: dict[Key, int | None] = {}
    with SweepLock(store.root, log):
        plan.check_inputs(plan.runs)  # what would fail every probe alike stops here, once
        store.write_manifest(**plan.manifest(), run_axes=[s.axes for s in plan.runs])
        log(plan_search(sweep))
        for key, specs in groups.items():

            def stable(k: int, specs: list[RunSpec] = specs) -> bool:
                spec = specs[k]
                status = store.run(spec.run_id).status()
                if status not in FINISHED:
                    prepare_redo(store, [spec], {spec.run_id: status}, log)
                    executor.run([spec], store)
                    status = store.run(spec.run_id).status()
                if status not in FINISHED:
                    raise ValueError(
                        f"probe {spec.run_id} ended {status}: see {store.run(spec.run_id).root / 'result.json'}; "
                        "fix the cause and rerun the same command (finished probes are kept)"
                    )
                return status == "ok"

            k = max_stable(stable, 0, len(lrs) - 1, _start(found, key, lrs, start_lr, p), p, confirm)
            found[key] = k
            name = ", ".join(f"{a.split('.')[-1]}={v}" for a, v in key)
            log(f"  {name}: max stable lr {'below the grid' if k is None else f'{lrs[k]:.4g}'}")
    return {key: None if k is None else lrs[k] for key, k in found.items()}
