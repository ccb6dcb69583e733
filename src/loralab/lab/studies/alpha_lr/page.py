"""The α/rank study's results: ``results.md`` (tables and verdicts), ``results.json`` (the numbers) and three
figures, written next to each other from the stores; docs/results/alpha-lr.md holds the criteria and links them.

Each part is optional (a store not given is said to be missing), so a page can be made as the runs come in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ...report.markup import Block, to_markdown
from ...report.plots import DPI, init_colors
from ...report.stats import LEVEL, Estimate
from ...store import atomic_write_json
from . import analysis as A

__all__ = ["write_page"]

FILES = {
    "md": "results.md",
    "json": "results.json",
    "collapse": "loss_vs_alpha_lr.png",
    "edges": "max_stable_lr_vs_alpha.png",
    "drift": "best_lr_vs_rank.png",
}


def _diff(e: Estimate | None) -> str:
    """A signed difference with its interval, ✱ when it excludes 0."""
    if e is None or not e.finite:
        return "—" if e is None else "not finite"
    return f"{e.mean:+.4f} [{e.lo:+.4f}, {e.hi:+.4f}]" + (" ✱" if e.excludes_zero else "")


def _loss(e: Estimate | None) -> str:
    if e is None or not e.finite:
        return "—" if e is None else "not finite"
    return f"{e.mean:.4f} [{e.lo:.4f}, {e.hi:.4f}]"


def _verdict(title: str, v: A.Verdict) -> Block:
    return ("p", f"**{title}: {v.word}.** {v.why}.")


# ---- 1. collapse --------------------------------------------------------------------------------------------------


def _collapse_blocks(c: A.Collapse, figure: str) -> list[Block]:
    alphas = sorted(c.curves)
    xs = sorted({round(math.log2(x), 6) for pts in c.curves.values() for x, *_ in pts})
    cell = {(a, round(math.log2(x), 6)): (est, div, n) for a, pts in c.curves.items() for x, _, est, div, n in pts}

    def text(a: float, k: float) -> str:
        if (a, k) not in cell:
            return ""
        est, div, n = cell[a, k]
        if div:
            return f"unstable ({div}/{n})"
        return _loss(est)

    rows = [[f"{2.0**k:.4g}", *(text(a, k) for a in alphas)] for k in xs]
    pts = [
        [
            f"{p.x:.4g}",
            ", ".join(f"{a:g}" for a in p.alphas),
            "; ".join(
                f"{q.alpha_a:g}−{q.alpha_b:g}: {_diff(q.diff) if q.diff is not None else q.note} ({q.kind})"
                for q in p.pairs
            ),
            "—" if p.spread is None else f"{p.spread:.4f}",
            "—" if p.half_width is None else f"{p.half_width:.4f}",
            p.verdict,
        ]
        for p in c.points
    ]
    return [
        ("h", 2, "1. Does the loss depend on α·lr only?"),
        _verdict("Verdict", c.verdict),
        (
            "p",
            "Final test loss, mean [95% interval] over seeds and test chunks; unstable (k/n): k of n seeds diverged.",
        ),
        ("table", ["α·lr", *(f"α = {a:g}" for a in alphas)], rows),
        (
            "p",
            f"At each α·lr that two or more α reach: paired differences (same seed, same test chunk), the spread (the "
            f"largest |difference|) and the largest interval half-width; δ = {A.DELTA:g} nats.",
        ),
        ("table", ["α·lr", "α", "pairs: difference [95% CI] (kind)", "spread", "half-width", "point"], pts),
        ("img", figure, "final test loss against α·lr, one curve per α (left); paired differences from the middle α"),
    ]


def _plot_collapse(path: Path, c: A.Collapse) -> Path:
    alphas = sorted(c.curves)
    colors = init_colors([f"{a:g}" for a in alphas])
    fig = Figure(figsize=(13, 5), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    top = max((e.hi for pts in c.curves.values() for _, _, e, _, _ in pts if e is not None and e.finite), default=4.0)
    for a in alphas:
        pts = sorted(c.curves[a])
        ok = [(x, e) for x, _, e, div, _ in pts if e is not None and not div]
        if ok:
            x, e = zip(*ok)
            left.errorbar(
                x,
                [v.mean for v in e],
                yerr=[[v.mean - v.lo for v in e], [v.hi - v.mean for v in e]],
                fmt="o-",
                color=colors[f"{a:g}"],
                capsize=3,
                label=f"α = {a:g}",
            )
        bad = [x for x, _, _, div, _ in pts if div]
        if bad:
            left.plot(bad, [top] * len(bad), "^", color=colors[f"{a:g}"], ms=8)
    left.set_xscale("log")
    left.set_xlabel("α · learning rate (log scale)")
    left.set_ylabel("final test loss (nats/token); ^ = unstable")
    left.legend(fontsize=8)
    mid = alphas[len(alphas) // 2]
    for a in alphas:
        if a == mid:
            continue
        d = []
        for p in c.points:
            for q in p.pairs:
                if {q.alpha_a, q.alpha_b} == {a, mid} and q.diff is not None and q.diff.finite:
                    sign = 1 if q.alpha_a == a else -1
                    low, high = sorted((sign * q.diff.lo, sign * q.diff.hi))
                    d.append((p.x, sign * q.diff.mean, low, high))
        if d:
            right.errorbar(
                [t[0] for t in d],
                [t[1] for t in d],
                yerr=[[t[1] - t[2] for t in d], [t[3] - t[1] for t in d]],
                fmt="o",
                color=colors[f"{a:g}"],
                capsize=3,
                label=f"α = {a:g} − α = {mid:g}",
            )
    right.axhspan(-A.DELTA, A.DELTA, color="0.85", alpha=0.6, label=f"±δ = {A.DELTA:g}")
    right.axhline(0, color="0.3", lw=0.8)
    right.set_xscale("log")
    right.set_xlabel("α · learning rate (log scale)")
    right.set_ylabel("paired difference of test loss (nats)")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=DPI)
    return path


# ---- 2. lr_max against α ------------------------------------------------------------------------------------------


def _edge_blocks(found: Sequence[A.Edge], fits: Mapping, verdicts: Mapping, figure: str) -> list[Block]:
    inits = sorted({e.init for e in found})
    alphas = sorted({e.alpha for e in found})

    def text(init: str, alpha: float) -> str:
        es = [e for e in found if e.init == init and e.alpha == alpha]
        parts = []
        for e in es:
            if e.lo and e.hi:
                rng = f"[{e.lo:.3g}, {e.hi:.3g})"
            elif e.lo:
                rng = f"≥ {e.lo:.3g} ⚠ {e.censored}"
            elif e.hi:
                rng = f"< {e.hi:.3g} ⚠ {e.censored}"
            else:
                rng = f"⚠ {e.censored}"
            parts.append(f"s{e.seed}: {rng}")
        return "; ".join(parts) or "—"

    rows = [[f"{a:g}", *(text(i, a) for i in inits)] for a in alphas]
    fit_rows = []
    for i in inits:
        f = fits.get(i)
        pred = A.TOY.get(i)
        fit_rows.append(
            [
                i,
                "n/a" if f is None else f"{f.slope:+.2f} [{f.ci[0]:+.2f}, {f.ci[1]:+.2f}]",
                "—" if f is None else f"{f.points} ({f.censored} off the grid)",
                "—" if pred is None else f"{pred:g}",
                verdicts.get(f"equivalence {i}", A.Verdict("undecided", "")).word,
            ]
        )
    blocks: list[Block] = [
        ("h", 2, "2. The largest stable learning rate against α"),
        _verdict("Verdict, the toy's slopes on the real model", verdicts["toy"]),
    ]
    blocks += [_verdict(f"Verdict, α ≡ lr at the edge for `{i}`", verdicts[f"equivalence {i}"]) for i in inits]
    blocks += [
        ("p", "lr_max per seed: [largest stable, smallest unstable) grid learning rate."),
        ("table", ["α", *inits], rows),
        (
            "p",
            "Slope of log2 lr_max against log2 α: OLS [95% bootstrap: seeds within α, each cliff within its bracket].",
        ),
        ("table", ["init", "slope [95% CI]", "series fitted", "toy", "α ≡ lr (slope −1)"], fit_rows),
    ]
    if {"standard", "reversed"} <= set(fits) and fits["standard"] is not None and fits["reversed"] is not None:
        d = fits["reversed"].replicates - fits["standard"].replicates
        q = np.quantile(d, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        diff = fits["reversed"].slope - fits["standard"].slope
        blocks.append(("p", f"Difference of slopes, reversed − standard: {diff:+.2f} [{q[0]:+.2f}, {q[1]:+.2f}]."))
    blocks.append(("img", figure, "largest stable learning rate against α (log-log), per init, with fits"))
    return blocks


def _plot_edges(path: Path, found: Sequence[A.Edge], fits: Mapping) -> Path:
    inits = sorted({e.init for e in found})
    colors = init_colors(inits)
    fig = Figure(figsize=(7.5, 5.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    alphas = sorted({e.alpha for e in found})
    for j, init in enumerate(inits):
        jit = 2 ** (0.04 * (j - (len(inits) - 1) / 2))
        for e in found:
            if e.init != init or not (e.lo and e.hi):
                continue
            ax.plot([e.alpha * jit] * 2, [e.lo, e.hi], "-", color=colors[init], lw=3, alpha=0.5)
        f = fits.get(init)
        if f is not None and alphas:
            ends = [alphas[0], alphas[-1]]
            ax.plot(
                ends,
                [2 ** (f.intercept + f.slope * math.log2(a)) for a in ends],
                "-",
                color=colors[init],
                label=f"{init}: {f.slope:+.2f} [{f.ci[0]:+.2f}, {f.ci[1]:+.2f}]",
            )
            mid = math.sqrt(ends[0] * ends[1])
            at = 2 ** (f.intercept + f.slope * math.log2(mid))
            if init in A.TOY:
                ax.plot(
                    ends,
                    [at * (a / mid) ** A.TOY[init] for a in ends],
                    ls=(0, (4, 3)),
                    color=colors[init],
                    alpha=0.7,
                    label=f"toy: α^{A.TOY[init]:g}",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("α (r = 8, s = α/r)")
    ax.set_ylabel("largest stable learning rate (bars: its grid bracket)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=DPI)
    return path


# ---- 3. best lr against rank --------------------------------------------------------------------------------------


def _drift_blocks(drifts: Sequence[A.Drift], verdicts: Mapping, figure: str) -> list[Block]:
    blocks: list[Block] = [
        ("h", 2, "3. The best learning rate against rank, α/r and α/√r"),
        _verdict("Verdict, rsLoRA (α/r drifts, α/√r stays)", verdicts["rslora"]),
        _verdict("Verdict, the LoRA paper (α/r keeps the best learning rate)", verdicts["lora paper"]),
    ]
    for d in drifts:
        rows = []
        for r, c in enumerate(d.chosen):
            ci = d.best_ci[r]
            rows.append(
                [
                    d.ranks[r],
                    "none stable"
                    if c is None
                    else f"{d.lrs[c]:.3g}" + (" (edge of stability)" if d.at_edge_of_stability[r] else ""),
                    "—" if ci is None else f"{ci[0]:.3g} – {ci[1]:.3g}",
                    "—" if c is None else f"{d.val[r, c]:.4f}",
                    _loss(d.test[r]),
                ]
            )
        slope = "n/a" if d.slope is None or d.ci is None else f"{d.slope:+.2f} [{d.ci[0]:+.2f}, {d.ci[1]:+.2f}]"
        blocks += [
            ("h", 3, f"{d.scaling}, α = {d.alpha:.4g} ({d.seeds} seeds)"),
            ("table", ["rank", "best lr (val)", "95% bootstrap range", "val loss", "test loss [95% CI]"], rows),
            ("p", f"Drift: slope of log2(best lr) against log2(r) = {slope}."),
        ]
    blocks.append(("img", figure, "validation loss against learning rate per rank (left panels); best lr against rank"))
    return blocks


def _plot_drift(path: Path, drifts: Sequence[A.Drift]) -> Path:
    fig = Figure(figsize=(5 * (len(drifts) + 1), 4.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(drifts) + 1, squeeze=False)[0]
    colors = init_colors([d.scaling for d in drifts])
    for ax, d in zip(axes, drifts):
        rc = init_colors([str(r) for r in d.ranks])
        for r, rank in enumerate(d.ranks):
            ok = [(lr, v) for lr, v in zip(d.lrs, d.val[r]) if np.isfinite(v)]
            if ok:
                ax.plot(*zip(*ok), "o-", color=rc[str(rank)], label=f"r = {rank}")
            c = d.chosen[r]
            if c is not None:
                ax.plot([d.lrs[c]], [d.val[r, c]], "*", color=rc[str(rank)], ms=14)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels would overlap
        ax.set_title(f"{d.scaling}: mean validation loss (★ best)", fontsize=10)
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for j, d in enumerate(drifts):
        jit = 2 ** (0.05 * (j - (len(drifts) - 1) / 2))
        pts = [(d.ranks[r], d.lrs[c], d.best_ci[r]) for r, c in enumerate(d.chosen) if c is not None]
        if not pts:
            continue
        ranks, best, ci = zip(*pts)
        ax.errorbar(
            [r * jit for r in ranks],
            best,
            yerr=[[b - q[0] for b, q in zip(best, ci)], [q[1] - b for b, q in zip(best, ci)]],
            fmt="o-",
            color=colors[d.scaling],
            capsize=3,
            label=f"{d.scaling}: slope "
            + ("n/a" if d.slope is None or d.ci is None else f"{d.slope:+.2f} [{d.ci[0]:+.2f}, {d.ci[1]:+.2f}]"),
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("best learning rate (bars: 95% bootstrap range)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=DPI)
    return path


# ---- the page -----------------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_page(
    out: str | Path,
    *,
    collapse: str | Path | None = None,
    probe: str | Path | None = None,
    ranks: Sequence[str | Path] = (),
) -> dict[str, Path]:
    """Read the stores given, compute the verdicts, write ``results.md``, ``results.json`` and the figures in ``out``.

    Raises:
        ValueError: no store given, or a store that is not what its part needs (named, with the fix).
        FileNotFoundError: a directory that is not a sweep store.
    """
    if collapse is None and probe is None and not ranks:
        raise ValueError("give at least one store: --collapse DIR, --probe DIR or --rank DIR")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    blocks: list[Block] = [
        ("h", 1, "α versus learning rate, and α/r versus α/√r: results"),
        ("p", "Measured by the rules in [../alpha-lr.md](../alpha-lr.md) (criteria written before the run)."),
    ]
    data: dict[str, Any] = {"delta": A.DELTA, "stay": A.STAY}
    missing = []
    if collapse is not None:
        c = A.collapse(*A.load(collapse), root=collapse)
        paths["collapse"] = _plot_collapse(out / FILES["collapse"], c)
        blocks += [("p", f"Store: `{collapse}`.")] + _collapse_blocks(c, FILES["collapse"])
        data["collapse"] = {
            "verdict": asdict(c.verdict),
            "points": [
                {
                    "x": p.x,
                    "verdict": p.verdict,
                    "spread": p.spread,
                    "half_width": p.half_width,
                    "pairs": [
                        {"a": q.alpha_a, "b": q.alpha_b, "kind": q.kind, "diff": q.diff and asdict(q.diff)}
                        for q in p.pairs
                    ],
                }
                for p in c.points
            ],
        }
    else:
        missing.append("1 (--collapse)")
    if probe is not None:
        found = A.edges(*A.load(probe))
        fits = {i: A.edge_fit(found, i) for i in sorted({e.init for e in found})}
        verdicts = A.edge_verdicts(found, fits)
        paths["edges"] = _plot_edges(out / FILES["edges"], found, fits)
        blocks += [("p", f"Store: `{probe}`.")] + _edge_blocks(found, fits, verdicts, FILES["edges"])
        data["edges"] = {
            "series": [asdict(e) for e in found],
            "fits": {
                i: None if f is None else {k: v for k, v in asdict(f).items() if k != "replicates"}
                for i, f in fits.items()
            },
            "verdicts": {k: asdict(v) for k, v in verdicts.items()},
        }
    else:
        missing.append("2 (--probe)")
    if ranks:
        drifts = [d for root in ranks for d in A.drift(*A.load(root), root=root)]
        scalings = [d.scaling for d in drifts]
        if len(set(scalings)) != len(scalings):
            raise ValueError(f"the --rank stores hold the same scaling twice ({', '.join(scalings)}); give one each")
        verdicts = A.drift_verdicts(drifts)
        paths["drift"] = _plot_drift(out / FILES["drift"], drifts)
        blocks += [("p", f"Stores: {', '.join(f'`{r}`' for r in ranks)}.")] + _drift_blocks(
            drifts, verdicts, FILES["drift"]
        )
        data["drift"] = {
            "scalings": [
                {k: _jsonable(v) for k, v in asdict(d).items() if k != "test"}
                | {"test": [e and asdict(e) for e in d.test]}
                for d in drifts
            ],
            "verdicts": {k: asdict(v) for k, v in verdicts.items()},
        }
    else:
        missing.append("3 (--rank)")
    if missing:
        blocks.append(("warn", f"Not measured in this page: part {', '.join(missing)}; no store was given."))
    paths["md"] = out / FILES["md"]
    paths["md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["json"] = out / FILES["json"]
    atomic_write_json(paths["json"], _jsonable(data))
    return paths
