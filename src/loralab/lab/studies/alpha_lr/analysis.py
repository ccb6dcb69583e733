"""The statistics and verdicts of the α/rank study (issue 18, part 2), by the rules of docs/results/alpha-lr.md.

Three measurements, each read from an ordinary sweep store (:mod:`...store`) through the report's cells
(:mod:`...report.cells`) and statistics (:mod:`...report.stats`), never a second bootstrap of means:

- :func:`collapse`: the final test loss against α·lr, one curve per α; at each α·lr that two or more α reach, the
  paired differences between α (same seed, same chunk) against the margin :data:`DELTA`.
- :func:`edges` + :func:`edge_fit`: the largest stable learning rate of each init × α × seed, interval-censored by the
  learning-rate grid, and the log-log slope against α with a bootstrap that resamples seeds within each α and draws
  each cliff within its bracket.
- :func:`drift`: each rank's best learning rate chosen on validation chunks, the argmin's bootstrap over the same
  pigeonhole replicates as the report's intervals (one draw of seeds and chunks shared by every cell of a scaling,
  so the comparison stays paired), and the slope of log2(best lr) against log2(r).

Every function here is pure over records or arrays; ``page.py`` draws and writes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...report.cells import Cell, cell_grid, chunk_losses, dotted_get, eval_splits, make_layout
from ...report.stats import (
    LEVEL,
    N_BOOT,
    Estimate,
    Losses,
    bootstrap_means,
    choose,
    interval,
    paired_difference,
    seed_for,
)
from ...store import RunRecord, SweepStore

__all__ = [
    "CENSOR_LIMIT",
    "DELTA",
    "STAY",
    "TOY",
    "Collapse",
    "Drift",
    "Edge",
    "EdgeFit",
    "Pair",
    "Point",
    "Verdict",
    "collapse",
    "collapse_verdict",
    "drift",
    "drift_verdicts",
    "edge_fit",
    "edge_verdicts",
    "edges",
    "load",
]

DELTA = 0.03  # nats: two α agree at an α·lr when their paired difference's interval lies inside ±DELTA
STAY = 0.25  # |drift slope| of one 2× grid step over a 16× range of ranks
TOY = {"standard": -0.5, "reversed": -1.0}  # lr_max ∝ α^p in the one-layer toy (REFERENCE.md)
CENSOR_LIMIT = 0.25  # more than this fraction of an init's series off the grid: its verdicts are undecided
SPLIT = "test"  # the collapse compares reported losses; the drift chooses on validation
REPS = "train.seed"


@dataclass(frozen=True)
class Verdict:
    """``word`` is one of holds / holds partly / fails / undecided; ``why`` says which numbers decided it."""

    word: str
    why: str


def load(root: str | Path) -> tuple[dict, list[RunRecord]]:
    """A sweep store's manifest and its records (``FileNotFoundError`` naming the directory when it is none)."""
    store = SweepStore(root)
    manifest = store.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{Path(root) / 'sweep.json'} not found: {root} is not a sweep directory")
    return manifest, store.records()


def _need_chunks(records: Sequence[RunRecord], root: Any, what: str) -> None:
    splits = eval_splits(records)
    if splits != ("val", "test"):
        why = splits if isinstance(splits, str) else "it has no validation/test split"
        raise ValueError(
            f"{root}: {what} needs per-chunk validation and test losses, but {why}; run the preset as committed "
            "(data.val_chunks and data.test_chunks set)"
        )


def _one_group(layout, root: Any, rows: str) -> None:
    if len(layout.groups) != 1:
        raise ValueError(
            f"{root}: expected a grid of {rows} × train.lr × train.seed; it also varies "
            f"{', '.join(layout.others)}: give each value its own store"
        )


# ---- 1. the collapse of loss against α·lr --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """Two α at one α·lr: ``kind`` agrees / disagrees / unclear; ``diff`` = loss(α_a) − loss(α_b) when both stable."""

    alpha_a: float
    alpha_b: float
    kind: str
    diff: Estimate | None
    note: str


@dataclass(frozen=True)
class Point:
    """One shared α·lr value: its pairs, its verdict (collapses / separates / unclear) and its spread."""

    x: float
    alphas: tuple[float, ...]
    pairs: tuple[Pair, ...]
    verdict: str

    @property
    def spread(self) -> float | None:
        """Largest |mean paired difference| between two stable α here (``None`` without such a pair)."""
        d = [abs(p.diff.mean) for p in self.pairs if p.diff is not None and p.diff.finite]
        return max(d) if d else None

    @property
    def half_width(self) -> float | None:
        """Largest half-width of those pairs' intervals: what the spread is measured against."""
        d = [(p.diff.hi - p.diff.lo) / 2 for p in self.pairs if p.diff is not None and p.diff.finite]
        return max(d) if d else None


@dataclass(frozen=True)
class Collapse:
    """``curves``: α -> [(α·lr, lr, test-loss estimate or None, unstable seeds, seeds)]; ``points``: shared α·lr."""

    curves: Mapping[float, list[tuple[float, float, Estimate | None, int, int]]]
    points: tuple[Point, ...]
    verdict: Verdict


def _xkey(x: float) -> float:
    return round(math.log2(x), 6)  # α·lr values from 4× grids meet on one lattice up to float rounding


def _pair(a: float, b: float, ca: Cell, cb: Cell, x: float, delta: float) -> Pair:
    ua, ub = ca.diverged > 0, cb.diverged > 0
    if ua and ub:
        return Pair(a, b, "agrees", None, "both unstable")
    if ua or ub:
        return Pair(a, b, "disagrees", None, f"unstable at α = {a if ua else b:g} only")
    la, lb = (chunk_losses(c, "excluded", SPLIT, REPS) for c in (ca, cb))
    est = None if la is None or lb is None else paired_difference(la, lb, seed=seed_for("alpha-lr", a, b, x))
    if est is None or not est.finite:
        return Pair(a, b, "unclear", est, "no paired losses")
    kind = (
        "agrees"
        if -delta <= est.lo and est.hi <= delta
        else "disagrees"
        if est.lo > delta or est.hi < -delta
        else ("unclear")
    )
    return Pair(a, b, kind, est, "")


def collapse(manifest: Mapping, records: Sequence[RunRecord], *, delta: float = DELTA, root: Any = "store") -> Collapse:
    """Loss against α·lr per α, and the verdict at every α·lr that two or more α reach (module docstring)."""
    _need_chunks(records, root, "the α·lr collapse")
    lay = make_layout(manifest, "lora.alpha", "train.lr", REPS)
    _one_group(lay, root, "lora.alpha")
    cells = cell_grid(lay, records)
    curves: dict[float, list] = {}
    at: dict[float, dict[float, Cell]] = {}
    for r, c in itertools.product(range(len(lay.rows)), range(len(lay.cols))):
        alpha, lr, cell = float(lay.rows[r]), float(lay.cols[c]), cells[0, r, c]
        done = cell.finished("included")
        if not done:
            continue
        losses = chunk_losses(cell, "excluded", SPLIT, REPS)
        est = None
        if losses is not None and cell.eligible():
            est = interval(losses.values, seed=seed_for("alpha-lr", alpha, lr))
        curves.setdefault(alpha, []).append((alpha * lr, lr, est, cell.diverged, len(done)))
        at.setdefault(_xkey(alpha * lr), {})[alpha] = cell
    points = []
    for key in sorted(at):
        by_alpha = at[key]
        if len(by_alpha) < 2:
            continue
        x = 2.0**key
        pairs = tuple(
            _pair(a, b, by_alpha[a], by_alpha[b], x, delta) for a, b in itertools.combinations(sorted(by_alpha), 2)
        )
        kinds = {p.kind for p in pairs}
        verdict = "separates" if "disagrees" in kinds else "collapses" if kinds == {"agrees"} else "unclear"
        points.append(Point(x, tuple(sorted(by_alpha)), pairs, verdict))
    return Collapse(curves, tuple(points), collapse_verdict(points, delta))


def collapse_verdict(points: Sequence[Point], delta: float = DELTA) -> Verdict:
    """The rule of docs/results/alpha-lr.md, claim 1, from the shared points' verdicts."""
    at = {k: [f"{p.x:.3g}" for p in points if p.verdict == k] for k in ("collapses", "separates", "unclear")}
    text = "; ".join(f"{k} at α·lr = {', '.join(v)}" for k, v in at.items() if v) + f" (δ = {delta:g} nats)"
    c, s, u = (len(at[k]) for k in ("collapses", "separates", "unclear"))
    if len(points) < 2 or c + s == 0:
        return Verdict("undecided", f"{len(points)} shared α·lr point(s): {text}")
    if s == 0 and u == 0:
        return Verdict("holds", text)
    if c == 0:
        return Verdict("fails", text)
    return Verdict("holds partly", text)


# ---- 2. the largest stable learning rate against α -----------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """One init × α × seed: lr_max lies in [lo, hi) (grid learning rates); ``censored`` says when it is off the grid
    ("below the grid": the lowest lr unstable; "above the grid": the highest stable; "not bracketed": the search did
    not finish)."""

    init: str
    alpha: float
    seed: Any
    lo: float | None
    hi: float | None
    censored: str | None
    probes: int


def edges(manifest: Mapping, records: Sequence[RunRecord]) -> list[Edge]:
    """The stability bracket of every init × α × seed of a probe store (its unrun grid points are simply unknown)."""
    grid = manifest.get("grid", {})
    for axis in ("lora.alpha", "train.lr"):
        if axis not in grid:
            raise ValueError(f"a probe store varies lora.alpha and train.lr; this one's grid axes: {', '.join(grid)}")
    lrs = sorted(float(v) for v in grid["train.lr"])
    base_init = dotted_get(manifest.get("base", {}), "lora.init") or "standard"
    series: dict[tuple, dict[int, str]] = {}
    for rec in records:
        if rec.status not in ("ok", "diverged"):
            continue
        axes = rec.axes
        key = (axes.get("lora.init", base_init), float(axes["lora.alpha"]), axes.get(REPS, 0))
        series.setdefault(key, {})[lrs.index(float(axes["train.lr"]))] = rec.status
    out = []
    for (init, alpha, seed), seen in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1], repr(kv[0][2]))):
        stable = [k for k, s in seen.items() if s == "ok"]
        lo = max(stable) if stable else None
        above = [k for k, s in seen.items() if s == "diverged" and (lo is None or k > lo)]
        hi = min(above) if above else None
        censored = None
        if lo is None:
            censored = "below the grid" if 0 in seen else "not bracketed"
        elif hi is None:
            censored = "above the grid" if lo == len(lrs) - 1 else "not bracketed"
        out.append(
            Edge(
                init,
                alpha,
                seed,
                None if lo is None else lrs[lo],
                None if hi is None else lrs[hi],
                censored,
                len(seen),
            )
        )
    return out


@dataclass(frozen=True)
class EdgeFit:
    """log2 lr_max ≈ intercept + slope·log2 α for one init, with the bootstrap interval; ``replicates`` kept for the
    difference of two inits' slopes."""

    init: str
    slope: float
    intercept: float
    ci: tuple[float, float]
    points: int
    censored: int
    replicates: np.ndarray = field(repr=False, compare=False)


def edge_fit(found: Sequence[Edge], init: str, *, n_boot: int = N_BOOT, seed: int = 0) -> EdgeFit | None:
    """OLS fit of one init's bracketed cliffs, with the bootstrap of docs/results/alpha-lr.md (claim 2); ``None``
    with fewer than two α bracketed."""
    mine = [e for e in found if e.init == init]
    ok = [e for e in mine if e.censored is None]
    by_alpha: dict[float, list[Edge]] = {}
    for e in ok:
        by_alpha.setdefault(e.alpha, []).append(e)
    if len(by_alpha) < 2:
        return None
    alphas = sorted(by_alpha)
    x = np.array([math.log2(a) for a in alphas for _ in by_alpha[a]])
    lo = np.array([math.log2(e.lo) for a in alphas for e in by_alpha[a]])  # type: ignore[arg-type]
    hi = np.array([math.log2(e.hi) for a in alphas for e in by_alpha[a]])  # type: ignore[arg-type]
    slope, intercept = _ols(x, (lo + hi) / 2)
    rng = np.random.default_rng(seed)
    starts = np.cumsum([0] + [len(by_alpha[a]) for a in alphas])
    pick = np.concatenate(  # seeds resampled within each α: (B, points) indices into the flat arrays
        [s + rng.integers(0, e - s, size=(n_boot, e - s)) for s, e in zip(starts[:-1], starts[1:])], axis=1
    )
    y = lo[pick] + rng.random(pick.shape) * (hi[pick] - lo[pick])  # each cliff anywhere in its bracket
    xc = x - x.mean()
    reps = (y - y.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    q = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return EdgeFit(init, slope, intercept, (float(q[0]), float(q[1])), len(ok), len(mine) - len(ok), reps)


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    xc = x - x.mean()
    slope = float(xc @ (y - y.mean()) / (xc @ xc))
    return slope, float(y.mean() - slope * x.mean())


def _inside(ci: tuple[float, float], v: float) -> bool:
    return ci[0] <= v <= ci[1]


def edge_verdicts(found: Sequence[Edge], fits: Mapping[str, EdgeFit | None]) -> dict[str, Verdict]:
    """Claim 2's verdicts: ``"equivalence <init>"`` per init, and ``"toy"`` (docs/results/alpha-lr.md)."""
    out: dict[str, Verdict] = {}
    usable: dict[str, EdgeFit] = {}
    for init, f in fits.items():
        total = sum(e.init == init for e in found)
        off = sum(e.init == init and e.censored is not None for e in found)
        if f is None or (total and off / total > CENSOR_LIMIT):
            kinds = sorted({e.censored for e in found if e.init == init and e.censored})
            fix = {"not bracketed": "finish the search (rerun it)"}
            todo = "; ".join(fix.get(k, "extend the grid") + f" ({k})" for k in kinds) or "measure more α"
            out[f"equivalence {init}"] = Verdict(
                "undecided", f"{off} of {total} series off the grid or not bracketed, fits need 2 α: {todo}"
            )
            continue
        usable[init] = f
        ci = f"slope {f.slope:+.2f} [{f.ci[0]:+.2f}, {f.ci[1]:+.2f}]"
        if _inside(f.ci, -1.0):
            out[f"equivalence {init}"] = Verdict("holds", f"{ci} contains −1")
        else:
            out[f"equivalence {init}"] = Verdict("fails", f"{ci} excludes −1")
    match = {}
    for init, p in TOY.items():
        other = TOY["reversed" if init == "standard" else "standard"]
        f = usable.get(init)
        match[init] = None if f is None else _inside(f.ci, p) and not _inside(f.ci, other)
    text = "; ".join(
        f"{i} {'matches' if m else 'does not match'} α^{TOY[i]:g} (slope {usable[i].slope:+.2f} "
        f"[{usable[i].ci[0]:+.2f}, {usable[i].ci[1]:+.2f}])"
        if i in usable
        else f"{i}: no usable fit"
        for i, m in match.items()
    )
    if all(m is True for m in match.values()):
        out["toy"] = Verdict("holds", text)
    elif all(m is None for m in match.values()):
        out["toy"] = Verdict("undecided", text)
    elif any(m is True for m in match.values()):
        out["toy"] = Verdict("holds partly", text)
    else:
        out["toy"] = Verdict("fails", text)
    return out


# ---- 3. the best learning rate against rank, under α/r and α/√r ---------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """One scaling's best learning rate per rank (chosen on val) with bootstrap intervals, and the drift slope."""

    scaling: str  # "α/r" or "α/√r"
    alpha: float
    ranks: tuple[int, ...]
    lrs: tuple[float, ...]
    val: np.ndarray  # (ranks, lrs) mean validation loss; inf where the cell is not eligible (unstable or missing)
    chosen: tuple[int | None, ...]  # index into lrs per rank
    best_ci: tuple[tuple[float, float] | None, ...]  # per rank, the argmin's 95% bootstrap range (grid lrs)
    test: tuple[Estimate | None, ...]  # the chosen cell's test loss
    at_edge_of_stability: tuple[bool, ...]  # the lr above the chosen one was unstable
    slope: float | None
    ci: tuple[float, float] | None
    seeds: int


def _scaling_groups(manifest: Mapping, root: Any) -> list[tuple[int, bool, float]]:
    lay = make_layout(manifest, "lora.rank", "train.lr", REPS)
    base = manifest.get("base", {})
    out = []
    for g, combo in enumerate(lay.groups):
        extra = set(combo) - {"lora.rslora", "lora.alpha"}
        if extra:
            raise ValueError(
                f"{root}: a rank store varies lora.rank × train.lr × train.seed (and lora.rslora); "
                f"it also varies {', '.join(sorted(extra))}: give each value its own store"
            )
        rslora = combo.get("lora.rslora", dotted_get(base, "lora.rslora") or False)
        alpha = combo.get("lora.alpha", dotted_get(base, "lora.alpha") or 16.0)
        out.append((g, bool(rslora), float(alpha)))
    return out


def drift(manifest: Mapping, records: Sequence[RunRecord], *, n_boot: int = N_BOOT, root: Any = "store") -> list[Drift]:
    """Each scaling's best learning rate per rank and its drift (docs/results/alpha-lr.md, claim 3)."""
    _need_chunks(records, root, "the best learning rate against rank")
    lay = make_layout(manifest, "lora.rank", "train.lr", REPS)
    cells = cell_grid(lay, records)
    out = []
    for g, rslora, alpha in _scaling_groups(manifest, root):
        ranks, lrs = [int(r) for r in lay.rows], [float(c) for c in lay.cols]
        grid = {(r, c): cells[g, r, c] for r in range(len(ranks)) for c in range(len(lrs))}
        val: dict[tuple[int, int], Losses] = {}
        for k, cell in grid.items():
            losses = chunk_losses(cell, "excluded", "val", REPS) if cell.eligible() else None
            if losses is not None:
                val[k] = losses
        common = sorted(set.intersection(*(set(v.seeds) for v in val.values())), key=repr) if val else []
        if not common:
            raise ValueError(f"{root}: no stable cell with per-chunk validation losses on a common seed")
        n = next(iter(val.values())).values.shape[1]
        x = np.zeros((len(ranks), len(lrs), len(common), n))
        ok = np.zeros((len(ranks), len(lrs)), dtype=bool)
        for (r, c), v in val.items():
            x[r, c], ok[r, c] = v.values[[v.seeds.index(s) for s in common]], True
        means = np.where(ok, x.mean(axis=(2, 3)), np.inf)
        chosen = tuple(choose({c: float(means[r, c]) for c in range(len(lrs)) if ok[r, c]}) for r in range(len(ranks)))
        reps = bootstrap_means(x, n_boot, np.random.default_rng(seed_for("rank-lr", rslora, alpha)))  # (R, L, B)
        reps = np.where(ok[..., None], reps, np.inf)
        arg = reps.argmin(axis=1)  # (R, B); a rank with no stable cell has argmin 0 over inf: masked below
        log_lr = np.log2(np.array(lrs))[arg]
        has = [any(ok[r]) for r in range(len(ranks))]
        best_ci = tuple(
            (
                float(np.quantile(2.0 ** log_lr[r], (1 - LEVEL) / 2, method="inverted_cdf")),
                float(np.quantile(2.0 ** log_lr[r], (1 + LEVEL) / 2, method="inverted_cdf")),
            )
            if has[r]
            else None
            for r in range(len(ranks))
        )
        slope = ci = None
        rows = [r for r in range(len(ranks)) if chosen[r] is not None]
        if len(rows) >= 2:
            xr = np.log2(np.array([ranks[r] for r in rows], dtype=float))
            slope = _ols(xr, np.log2(np.array([lrs[chosen[r]] for r in rows])))[0]  # type: ignore[index]
            xc = xr - xr.mean()
            yr = log_lr[rows]  # (rows, B)
            slopes = xc @ (yr - yr.mean(axis=0)) / (xc @ xc)
            q = np.quantile(slopes, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
            ci = (float(q[0]), float(q[1]))
        test = tuple(
            _test_estimate(grid[r, c], (rslora, ranks[r], lrs[c])) if c is not None else None
            for r, c in enumerate(chosen)
        )
        edge = tuple(c is not None and c + 1 < len(lrs) and grid[r, c + 1].diverged > 0 for r, c in enumerate(chosen))
        out.append(
            Drift(
                "α/√r" if rslora else "α/r",
                alpha,
                tuple(ranks),
                tuple(lrs),
                means,
                chosen,
                best_ci,
                test,
                edge,
                slope,
                ci,
                len(common),
            )
        )
    return out


def _test_estimate(cell: Cell, labels: tuple) -> Estimate | None:
    losses = chunk_losses(cell, "excluded", "test", REPS)
    return None if losses is None else interval(losses.values, seed=seed_for("rank-lr test", *labels))


def _scaling_word(d: Drift | None) -> tuple[str, str]:
    """(drifts | stays | undecided, why) for one scaling."""
    if d is None:
        return "undecided", "not measured"
    if d.slope is None or d.ci is None:
        return "undecided", "fewer than two ranks with a stable learning rate"
    ci = f"slope {d.slope:+.2f} [{d.ci[0]:+.2f}, {d.ci[1]:+.2f}]"
    edge = [d.ranks[r] for r, c in enumerate(d.chosen) if c in (0, len(d.lrs) - 1)]
    if edge:
        return "undecided", f"{ci}, but the best lr is on the grid's edge at r = {', '.join(map(str, edge))}"
    if not _inside(d.ci, 0.0):
        return "drifts", f"{ci} excludes 0"
    if -STAY <= d.ci[0] and d.ci[1] <= STAY:
        return "stays", f"{ci} lies within ±{STAY:g}"
    return "undecided", f"{ci} contains 0 but reaches past ±{STAY:g}"


def drift_verdicts(drifts: Sequence[Drift]) -> dict[str, Verdict]:
    """Claim 3's verdicts: ``"rslora"`` and ``"lora paper"`` (docs/results/alpha-lr.md)."""
    by = {d.scaling: d for d in drifts}
    (r_word, r_why), (s_word, s_why) = _scaling_word(by.get("α/r")), _scaling_word(by.get("α/√r"))
    part_r = {"drifts": "holds", "stays": "fails"}.get(r_word, "undecided")  # rsLoRA: α/r drifts
    part_s = {"stays": "holds", "drifts": "fails"}.get(s_word, "undecided")  # rsLoRA: α/√r stays
    parts = (part_r, part_s)
    if parts == ("holds", "holds"):
        word = "holds"
    elif "holds" in parts:
        word = "holds partly"
    elif "fails" in parts:
        word = "fails"
    else:
        word = "undecided"
    why = f"α/r {r_word} ({r_why}); α/√r {s_word} ({s_why})"
    lora = {"stays": "holds", "drifts": "fails"}.get(r_word, "undecided")
    return {"rslora": Verdict(word, why), "lora paper": Verdict(lora, f"α/r {r_word} ({r_why})")}
