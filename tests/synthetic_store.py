"""A synthetic sweep store shaped like the study being reproduced (5 inits × 7 LRs × seeds), for report tests.

Cell means follow the study's published table (REFERENCE.md); cells whose published mean is above 5 are diverged on
every seed (loss 7-9, one of them not finite). Also: one partly diverged cell, one failed run, optionally one
unfinished and one pending run. :func:`build_study_store` returns what it wrote, so tests can compute expectations
independently of the code under test.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loralab.lab.store import EvalChunks, RunResult, RunStore, SplitLosses, SweepStore

INITS = ("standard", "reversed", "orthogonal-eye", "orthogonal-qr-const", "orthogonal-qr-match")
LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
STUDY = {  # lr -> mean final eval loss per init, in INITS order (the study's table)
    1e-4: (2.2576, 2.2513, 2.2801, 2.2802, 2.2874), 2e-4: (2.2391, 2.2440, 2.2633, 2.2667, 2.2809),
    5e-4: (2.2228, 2.2461, 2.2558, 2.2611, 2.2827), 1e-3: (2.2178, 2.2607, 2.2592, 2.2700, 2.3014),
    2e-3: (2.2173, 2.2898, 2.2721, 2.2925, 7.0413), 5e-3: (2.2348, 7.2726, 2.3011, 2.3891, 7.8028),
    1e-2: (9.3169, 7.7805, 7.4645, 7.1409, 7.8530)}
PARTLY_DIVERGED = ("orthogonal-qr-const", 5e-3, 1)  # this seed diverges, the others do not
FAILED = ("orthogonal-eye", 1e-3, 1)
UNFINISHED = ("orthogonal-qr-match", 1e-2, 1)
PENDING = ("orthogonal-qr-const", 1e-2, 1)
ERROR = "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB"
STEPS, EVAL_EVERY, INITIAL = 600, 40, 2.65
AXES = ("lora.init", "train.lr", "train.seed")


@dataclass
class Written:
    """What the builder wrote: run id -> (axes, status, final eval loss or None)."""

    runs: dict[str, tuple[dict, str, float | None]] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)


def run_id(init: str, lr: float, seed: int) -> str:
    return f"{init}__lr{lr:g}__s{seed}"


def _final(init: str, lr: float, seed: int, n_seeds: int) -> tuple[str, float | None]:
    i = INITS.index(init)
    mean = STUDY[lr][i]
    if mean > 5 or (init, lr, seed) == PARTLY_DIVERGED:
        loss = 7.0 + ((i + 3 * seed + LRS.index(lr)) % 5) * 0.45
        return "diverged", (None if (init, lr, seed) == ("reversed", 1e-2, 0) else loss)
    # symmetric offsets around the study's mean: the seeds' mean is the published number
    return "ok", mean + (0.001 + 0.0007 * i) * (seed - (n_seeds - 1) / 2)


def _curve(status: str, final: float | None, lr: float) -> list[tuple[int, float]]:
    if status == "diverged":  # improves, then blows up; training stops once the loss is past the threshold
        stop = EVAL_EVERY * (2 + int(8 * 1e-3 / lr) + len(str(final)) % 3)
        pts = [(s, INITIAL - 0.25 * (1 - math.exp(-s / 60))) for s in range(0, stop, EVAL_EVERY)]
        return pts + [(stop, final if final is not None else float("nan"))]
    tau = 60 * (1e-3 / lr) ** 0.5
    shape = lambda s: (math.exp(-s / tau) - math.exp(-STEPS / tau)) / (1 - math.exp(-STEPS / tau))  # noqa: E731
    return [(s, final + (INITIAL - final) * shape(s)) for s in range(0, STEPS + 1, EVAL_EVERY)]


def _diagnostics(init: str, seed: int) -> dict:
    g, va, vb = {"standard": ((0.0, 2e-2), 1 / (3 * 1536), 0.0), "reversed": ((3e-1, 0.0), 0.0, 1 / 24),
                 "orthogonal-eye": ((1.5e-1, 1e-2), 3.3e-4, 6.2e-2), "orthogonal-qr-const": ((4e-2, 6e-2), 5e-3, 5e-3),
                 "orthogonal-qr-match": ((2e-1, 1.2e-2), 3.3e-4, 6.2e-2)}[init]
    f = 1 + 0.05 * seed
    layers = {f"model.layers.{n}.self_attn.{p}": {"grad_norm_a": g[0] * f * (1 + 0.1 * n), "grad_norm_b": g[1] * f,
                                                   "var_a": va, "var_b": vb}
              for n in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return {"identity_max_abs": 0.0 if init in ("standard", "reversed") else 3e-7 * f, "layers": layers}


def _write_run(store: SweepStore, axes: dict, status: str, final: float | None, *, finish: bool = True) -> None:
    init, lr, seed = (axes[a] for a in AXES)
    rid = run_id(init, lr, seed)
    run = store.run(rid)
    run.write_config(rid, axes, {"lora": {"init": init, "rank": 8}, "train": {"lr": lr, "seed": seed}})
    if status == "failed":
        run.write_result(RunResult(rid, "failed", axes, error=ERROR + "\nmore detail", traceback="Traceback ...\n"))
        return
    run.write_diagnostics(_diagnostics(init, seed))
    curve = _curve(status, final, lr)
    for step, loss in curve:
        run.append_metric({"kind": "train", "step": step, "loss": loss + 0.05, "lr": lr, "tokens": step * 4096,
                           "elapsed_s": step * 0.5})
        run.append_metric({"kind": "eval", "step": step, "eval_loss": loss, "elapsed_s": step * 0.5})
    if finish:
        run.write_result(RunResult(rid, status, axes, final_eval_loss=final, initial_eval_loss=INITIAL,
                                   best_eval_loss=min(v for _, v in curve if math.isfinite(v)), steps=curve[-1][0],
                                   tokens=curve[-1][0] * 4096, wall_time_s=curve[-1][0] * 0.5 + 1,
                                   tokens_per_s=8192.0 - 500 * INITS.index(init), device="cuda"))


def build_study_store(root: Path, *, seeds: tuple[int, ...] = (0, 1), lrs: tuple[float, ...] = LRS,
                      incomplete: bool = True) -> Written:
    """Write the synthetic sweep into ``root``; ``incomplete`` adds one unfinished and one pending run."""
    store, written = SweepStore(root), Written()
    grid = {"lora.init": list(INITS), "train.lr": list(lrs), "train.seed": list(seeds)}
    combos = [(i, lr, s) for i in INITS for lr in lrs for s in seeds]
    written.run_ids = [run_id(*c) for c in combos]
    base = {"model": {"name": "Qwen/Qwen2.5-1.5B-Instruct"}, "data": {"source": "HuggingFaceH4/no_robots"},
            "lora": {"rank": 8, "alpha": 16.0, "init": "standard"}, "train": {"lr": 1e-3, "seed": 0}}
    store.write_manifest("study-synthetic", grid, written.run_ids, base,
                         run_axes=[dict(zip(AXES, c)) for c in combos])
    for c in combos:
        axes = dict(zip(AXES, c))
        status, final = ("failed", None) if c == FAILED else _final(*c, n_seeds=len(seeds))
        if incomplete and c in (UNFINISHED, PENDING):
            status, final = ("unfinished" if c == UNFINISHED else "pending"), None
        if status == "unfinished":  # crashed mid-run: metrics but no result
            _write_run(store, axes, "ok", 2.5, finish=False)
        elif status != "pending":
            _write_run(store, axes, status, final)
        written.runs[run_id(*c)] = (axes, status, final)
    return written


def build_grid_store(root: Path, grid: dict[str, list], outcome, base: dict | None = None) -> list[dict]:
    """A store with one finished run per grid point; ``outcome(axes) -> (status, final eval loss)``.

    Returns the axes of each run, in grid order.
    """
    store = SweepStore(root)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    ids = ["__".join(f"{k.split('.')[-1]}{v}" for k, v in axes.items()) or "only" for axes in combos]
    store.write_manifest("grid", grid, ids, base or {}, run_axes=combos)
    for rid, axes in zip(ids, combos):
        status, final = outcome(axes)
        run = store.run(rid)
        run.write_config(rid, axes, {})
        for step in (0, 10, 20):
            run.append_metric({"kind": "eval", "step": step, "eval_loss": (final or 3.0) + (20 - step) / 100})
        run.write_result(RunResult(rid, status, axes, final_eval_loss=final, steps=20))
    return combos


# ---- a store with per-chunk eval losses (val/test), for the report's statistics ------------------------------------

CHUNKED_INITS = ("standard", "reversed", "qr")
CHUNKED_LRS = (1e-4, 1e-3, 1e-2)
CHUNKED_SEEDS = (0, 1, 2)
N_VAL = N_TEST = 100
# effect on the loss (nats) per init and lr, on val and on test. standard: val prefers 1e-3, test prefers 1e-2, so a
# choice that peeked at test would differ. reversed: standard's losses plus zero-mean noise (a zero difference).
# qr: +0.05 everywhere (a planted difference); at 1e-2 seed 2 blows up (diverged, +5 nats) and seed 0 ends above
# the pretrained model.
CHUNKED_EFFECT = {"val": {1e-4: -0.05, 1e-3: -0.20, 1e-2: -0.15}, "test": {1e-4: -0.05, 1e-3: -0.20, 1e-2: -0.30}}
QR_DELTA, BLOWN_UP, WORSE = 0.05, ("qr", 1e-2, 2), ("qr", 1e-2, 0)


@dataclass
class Chunked:
    """What :func:`build_chunked_store` wrote: (init, lr, seed) -> {"val"/"test": final per-chunk losses}, and the
    pretrained losses per split."""

    final: dict[tuple[str, float, int], dict[str, np.ndarray]] = field(default_factory=dict)
    status: dict[tuple[str, float, int], str] = field(default_factory=dict)
    pretrained: dict[str, np.ndarray] = field(default_factory=dict)


def build_chunked_store(root: Path, *, splits: tuple[str, ...] = ("val", "test")) -> Chunked:
    """3 inits × 3 lrs × 3 seeds with per-chunk losses on ``splits`` (``("eval",)``: the old single eval set)."""
    rng = np.random.default_rng(0)
    store, out = SweepStore(root), Chunked()
    ids = {"val": np.arange(N_VAL), "test": np.arange(N_VAL, N_VAL + N_TEST), "eval": np.arange(N_TEST)}
    hard = {s: rng.normal(3.0, 0.5, len(ids[s])) for s in splits}     # how hard each chunk is
    out.pretrained = {s: hard[s] + 0.4 for s in splits}
    grid = {"lora.init": list(CHUNKED_INITS), "train.lr": list(CHUNKED_LRS), "train.seed": list(CHUNKED_SEEDS)}
    combos = [(i, lr, s) for i in CHUNKED_INITS for lr in CHUNKED_LRS for s in CHUNKED_SEEDS]
    run_ids = [run_id(*c) for c in combos]
    store.write_manifest("chunked", grid, run_ids, {"data": {"seq_len": 128}}, run_axes=[dict(zip(AXES, c))
                                                                                           for c in combos])
    for (init, lr, seed), rid in zip(combos, run_ids):
        finals = {}
        for s in splits:
            effect = CHUNKED_EFFECT["test" if s == "eval" else s][lr]
            std = hard[s] + effect + rng.normal(0, 0.01, (len(CHUNKED_SEEDS), len(ids[s])))[seed]
            if init == "standard":
                finals[s] = std
            elif init == "reversed":
                noise = rng.normal(0, 0.02, len(ids[s]))
                finals[s] = out.final["standard", lr, seed][s] + noise - noise.mean()
            else:
                finals[s] = std + QR_DELTA + (5.0 if (init, lr, seed) == BLOWN_UP else 0.0) + (
                    1.0 if (init, lr, seed) == WORSE else 0.0)
        status = "diverged" if (init, lr, seed) == BLOWN_UP else "ok"
        out.final[init, lr, seed], out.status[init, lr, seed] = finals, status
        axes = dict(zip(AXES, (init, lr, seed)))
        run = store.run(rid)
        run.write_config(rid, axes, {"lora": {"init": init}, "train": {"lr": lr, "seed": seed}})
        run.write_eval_chunks(EvalChunks("pool0", {s: SplitLosses(ids=ids[s], pretrained=out.pretrained[s],
                                                                     step0=out.pretrained[s], final=finals[s])
                                                    for s in splits}))
        report = splits[-1]
        run.write_result(RunResult(rid, status, axes, final_eval_loss=float(finals[report].astype(np.float32).mean()),
                                   initial_eval_loss=float(out.pretrained[report].astype(np.float32).mean()),
                                   steps=10))
    return out


def rewrite_result(run: RunStore, **changes) -> None:
    """Change fields of a run's result.json (written once: the old file goes first), e.g. where it computed."""
    result = run.result()
    (run.root / "result.json").unlink()
    run.write_result(dataclasses.replace(result, **changes))


# ---- the published inits with per-chunk losses and planted effects (scripts/compare_study.py) ----------------------


def build_published_store(root: Path, *, lrs: tuple[float, ...], seeds: tuple[int, ...], shift,
                          diverged: tuple = (), pending: tuple = (), n_chunks: int = 64, lr_effect=None) -> dict:
    """The published inits × ``lrs`` × ``seeds``; each run's per-chunk val/test losses are the chunks' difficulty +
    ``lr_effect(split, lr)`` (default: −0.1 per decade above 1e-4) + ``shift(init, lr)`` + per-seed noise (sd 0.01).
    ``diverged``/``pending``: ``(init, lr, seed)`` runs with that status (a diverged one ends 2 nats up). Returns
    ``(init, lr, seed) -> {split: losses}``."""
    lr_effect = lr_effect or (lambda split, lr: -0.1 * math.log10(lr / 1e-4))
    rng = np.random.default_rng(1)
    store = SweepStore(root)
    ids = {"val": np.arange(n_chunks), "test": np.arange(n_chunks, 2 * n_chunks)}
    hard = {s: rng.normal(3.0, 0.5, n_chunks) for s in ids}
    combos = [(i, lr, s) for s in seeds for i in INITS for lr in lrs]
    grid = {"train.seed": list(seeds), "lora.init": list(INITS), "train.lr": list(lrs)}
    store.write_manifest("published", grid, [run_id(*c) for c in combos], {"data": {"seq_len": 128}},
                         run_axes=[dict(zip(AXES, c)) for c in combos])
    out = {}
    for init, lr, seed in combos:
        if (init, lr, seed) in pending:
            continue
        status = "diverged" if (init, lr, seed) in diverged else "ok"
        finals = {s: hard[s] + lr_effect(s, lr) + shift(init, lr) + rng.normal(0, 0.01, n_chunks)
                  + (2.0 if status == "diverged" else 0.0) for s in ids}
        out[init, lr, seed] = finals
        rid, axes = run_id(init, lr, seed), dict(zip(AXES, (init, lr, seed)))
        run = store.run(rid)
        run.write_config(rid, axes, {"lora": {"init": init}, "train": {"lr": lr, "seed": seed}})
        run.write_eval_chunks(EvalChunks("pool0", {s: SplitLosses(ids=ids[s], pretrained=hard[s] + 0.4,
                                                                     step0=hard[s] + 0.4, final=finals[s])
                                                    for s in ids}))
        run.write_result(RunResult(rid, status, axes, final_eval_loss=float(finals["test"].mean()),
                                   initial_eval_loss=float((hard["test"] + 0.4).mean()), steps=10))
    return out
