"""Tables, slope fits and figures of a width sweep, read only from its ``results.json`` (``width.py`` writes it).

Slope: ordinary least squares of log2(max stable LR) on log2(n) over every (width, seed) cell, with the textbook
standard error σ̂/√Sxx (σ̂² = RSS/(m − 2)), once over all widths and once over the ``fit_largest`` largest (small widths
are noisy and the init's two update terms cross over there). A 95% bootstrap interval resamples the seeds within each
width (2,000 resamples, fixed seed). The cliff is known to one grid step (it lies in [lr*, lr*·2^(1/p))); that
quantisation is in the residuals, so in the standard error. Cells whose cliff is off the grid are listed with a mark
and left out of the fits (a censored value would bias them). Predictions: Hayou et al. 2024, Init[A] n^-1/2,
Init[B] n^-1.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from ...report.markup import Block, to_markdown
from ...report.plots import DPI, init_colors
from ...store import atomic_write_json, read_json
from .probe import cell_key

PREDICTED = {"standard": -0.5, "reversed": -1.0}  # Init[A], Init[B]


@dataclass(frozen=True)
class Fit:
    """log2(max stable LR) ≈ intercept + slope·log2(n), fitted on ``points`` cells at ``widths``."""

    slope: float
    se: float
    intercept: float
    ci: tuple[float, float]
    widths: tuple[int, ...]
    points: int


def ols(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """``(slope, standard error, intercept)`` of y ≈ a + b·x by least squares; the error is NaN below 3 points."""
    m = len(x)
    xm, ym = sum(x) / m, sum(y) / m
    sxx = sum((xi - xm) ** 2 for xi in x)
    if m < 2 or sxx == 0:
        raise ValueError(f"a slope needs points at >= 2 different x; got x = {list(x)}")
    slope = sum((xi - xm) * (yi - ym) for xi, yi in zip(x, y)) / sxx
    intercept = ym - slope * xm
    rss = sum((yi - intercept - slope * xi) ** 2 for xi, yi in zip(x, y))
    return slope, math.sqrt(rss / (m - 2) / sxx) if m > 2 else math.nan, intercept


def fit(points: Mapping[int, Sequence[float]], boot: int = 2000, seed: int = 0) -> Fit | None:
    """Fit ``{width: [log2 max LR of each seed]}``; ``None`` with fewer than two widths that have points."""
    points = {n: list(v) for n, v in sorted(points.items()) if v}
    if len(points) < 2:
        return None
    x = [math.log2(n) for n, v in points.items() for _ in v]
    y = [yi for v in points.values() for yi in v]
    slope, se, intercept = ols(x, y)
    rng, slopes = random.Random(seed), []
    for _ in range(boot):  # seeds are the replication unit: resample them within each width
        slopes.append(ols(x, [yi for v in points.values() for yi in rng.choices(v, k=len(v))])[0])
    slopes.sort()
    ci = (slopes[int(0.025 * boot)], slopes[int(0.975 * boot) - 1]) if boot else (math.nan, math.nan)
    return Fit(slope, se, intercept, ci, tuple(points), len(y))


def summarize(results: Mapping) -> dict:
    """Per init: ``{"cells": {width: [cell per seed]}, "all": Fit, "largest": Fit}`` for the stored config's grid."""
    cfg, cells = results["config"], results["cells"]
    largest = set(cfg["widths"][-cfg["fit_largest"] :])
    out = {}
    for init in cfg["inits"]:
        by_width = {n: [c for s in cfg["seeds"] if (c := cells.get(cell_key(init, n, s)))] for n in cfg["widths"]}
        logs = {n: [math.log2(c["max_lr"]) for c in cs if not c["censored"]] for n, cs in by_width.items()}
        out[init] = {
            "cells": by_width,
            "all": fit(logs),
            "largest": fit({n: v for n, v in logs.items() if n in largest}),
        }
    return out


def _geo(cells: Sequence[Mapping]) -> tuple[float, float, float] | None:
    lrs = [c["max_lr"] for c in cells if c["max_lr"]]
    return (math.exp(sum(map(math.log, lrs)) / len(lrs)), min(lrs), max(lrs)) if lrs else None


def _fmt_fit(f: Fit | None) -> str:
    if f is None:
        return "n/a"
    return f"{f.slope:+.2f} ± {f.se:.2f} [{f.ci[0]:+.2f}, {f.ci[1]:+.2f}]"


def _cell_text(cells: Sequence[Mapping], seeds: int) -> str:
    g = _geo(cells)
    text = "—" if g is None else f"{g[0]:.3g} ({g[1]:.3g}–{g[2]:.3g})"
    marks = [f"{c['seed']}: {c['censored']}" for c in cells if c["censored"]]
    missing = seeds - len(cells)
    return text + (f" ⚠ {'; '.join(marks)}" if marks else "") + (f" ({missing} seed(s) not run)" if missing else "")


def _spikes(by_width: Mapping[int, Sequence[Mapping]]) -> str:
    """Median (min–max) step of the first spike at the grid point just above each cell's cliff."""
    steps = sorted(
        p["spike_step"]
        for cs in by_width.values()
        for c in cs
        if c["k"] is not None
        for p in c["probes"]
        if p["k"] == c["k"] + 1 and p["spike_step"] is not None
    )
    return f"{steps[len(steps) // 2]} ({steps[0]}–{steps[-1]})" if steps else "—"


def tables(results: Mapping, summary: Mapping) -> list[Block]:
    """Max stable LR per width × init, the slopes, and the per-width task sizes, as report blocks."""
    cfg = results["config"]
    inits, seeds = cfg["inits"], len(cfg["seeds"])
    big = cfg["widths"][-cfg["fit_largest"] :]
    predicted = {-0.5: "−1/2 (Init[A])", -1.0: "−1 (Init[B])"}
    slopes = [
        [
            i,
            _fmt_fit(summary[i]["all"]),
            _fmt_fit(summary[i]["largest"]),
            predicted.get(PREDICTED.get(i, 0.0), "—"),
            _spikes(summary[i]["cells"]),
        ]
        for i in inits
    ]
    return [
        ("p", f"Max stable learning rate: geometric mean over {seeds} seeds (min–max)."),
        (
            "table",
            ["width", *inits],
            [[n, *(_cell_text(summary[i]["cells"][n], seeds) for i in inits)] for n in cfg["widths"]],
        ),
        ("p", "Slope of log2(max stable LR) vs log2(width): OLS ± standard error [95% bootstrap over seeds]."),
        (
            "table",
            [
                "init",
                f"all widths ({cfg['widths'][0]}–{cfg['widths'][-1]})",
                f"largest {len(big)} ({big[0]}–{big[-1]})",
                "predicted (Hayou et al. 2024)",
                "spike step one grid point above the cliff",
            ],
            slopes,
        ),
        (
            "p",
            "Task and features per width (mean over seeds): step-0 fine-tuning loss L0, target and feature RMS per "
            "coordinate, pretraining loss.",
        ),
        (
            "table",
            ["width", "L0", "target RMS", "shift RMS", "feature RMS", "pretrain loss first → last"],
            [_task_row(results, summary, inits, n) for n in cfg["widths"]],
        ),
    ]


def _task_row(results: Mapping, summary: Mapping, inits: Sequence[str], n: int) -> list:
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    infos = [v for k, v in results["pretrain"].items() if k.startswith(f"n{n}|")]
    cells = [c for i in inits for c in summary[i]["cells"][n]]
    info = {
        k: mean([d[k] for d in infos if d.get(k) is not None])
        for k in ("target_rms", "shift_rms", "z_rms", "pretrain_loss_first", "pretrain_loss_last")
    }
    return [
        n,
        f"{mean([c['loss0'] for c in cells]):.3f}",
        f"{info['target_rms']:.3f}",
        f"{info['shift_rms']:.3f}",
        f"{info['z_rms']:.3f}",
        f"{info['pretrain_loss_first']:.3f} → {info['pretrain_loss_last']:.3f}",
    ]


def _write_csv(path: Path, results: Mapping) -> Path:
    fields = ["init", "width", "seed", "max_lr", "k", "censored", "loss0", "probes", "seconds"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for c in results["cells"].values():
            w.writerow(
                [
                    c["init"],
                    c["width"],
                    c["seed"],
                    c["max_lr"],
                    c["k"],
                    c["censored"] or "",
                    c["loss0"],
                    len(c["probes"]),
                    c["seconds"],
                ]
            )
    return path


def _log_axes(ax, widths: Sequence[int], ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(widths, [str(n) for n in widths])
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("width n (LoRA on an n×n layer)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def plot_max_lr(path: Path, results: Mapping, summary: Mapping) -> Path:
    """Left: max stable LR vs width, log-log, fits and predictions. Right: the same × n (flat = the n^-1 law)."""
    cfg = results["config"]
    widths, inits, colors = cfg["widths"], cfg["inits"], init_colors(cfg["inits"])
    ends, mid = [widths[0], widths[-1]], math.sqrt(widths[0] * widths[-1])
    fig = Figure(figsize=(13, 5.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    for j, init in enumerate(inits):
        jit = 2 ** (0.03 * (j - (len(inits) - 1) / 2))  # a small x offset per init so markers do not hide each other
        s, color, f = summary[init], colors[init], summary[init]["all"]
        for ax, times_n in zip(axes, (False, True)):
            y = (lambda lr, n: lr * n) if times_n else (lambda lr, n: lr)
            seeds = [(n * jit, y(c["max_lr"], n)) for n, cs in s["cells"].items() for c in cs if c["max_lr"]]
            if seeds:
                ax.scatter(*zip(*seeds), color=color, s=14, alpha=0.4, lw=0)
            geo = [(n, g[0]) for n, cs in s["cells"].items() if (g := _geo(cs))]
            ax.plot([n * jit for n, _ in geo], [y(lr, n) for n, lr in geo], "o", color=color, ms=6)
            if f is None:
                continue
            big = f"  (largest: {s['largest'].slope:+.2f} ± {s['largest'].se:.2f})" if s["largest"] else ""
            ax.plot(
                ends,
                [y(2 ** (f.intercept + f.slope * math.log2(n)), n) for n in ends],
                "-",
                color=color,
                lw=1.6,
                label=f"{init}: {f.slope:+.2f} ± {f.se:.2f}{big}",
            )
            if init in PREDICTED:  # the prediction, through this init's fit at the middle width
                at = 2 ** (f.intercept + f.slope * math.log2(mid))
                ax.plot(
                    ends,
                    [y(at * (n / mid) ** PREDICTED[init], n) for n in ends],
                    ls=(0, (4, 3)),
                    color=color,
                    lw=1.2,
                    alpha=0.8,
                    label=f"predicted n^{PREDICTED[init]:g} for {init}",
                )
    _log_axes(axes[0], widths, "max stable learning rate")
    _log_axes(axes[1], widths, "max stable learning rate × width")
    axes[0].legend(
        fontsize=8, loc="lower left", title="fitted slope ± s.e. (all widths; largest widths)", title_fontsize=8
    )
    axes[0].set_title("AdamW, no warmup: dots = seeds, circles = geometric mean, dashed = predicted", fontsize=10)
    axes[1].set_title("× width: an n^-1 law is flat, an n^-1/2 law rises like √n", fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path


def plot_cliff(path: Path, results: Mapping) -> Path:
    """Loss / L0 over steps at the largest width (first seed): the max stable LR and the next grid LR, per init."""
    cfg = results["config"]
    n, seed, factor, p = cfg["widths"][-1], cfg["seeds"][0], cfg["probe"]["spike_factor"], cfg["probe"]["per_octave"]
    colors = init_colors(cfg["inits"])
    fig = Figure(figsize=(3.1 * len(cfg["inits"]), 3.3), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(cfg["inits"]), sharey=True, squeeze=False)[0]
    for ax, init in zip(axes, cfg["inits"]):
        cell = results["cells"].get(cell_key(init, n, seed)) or {"k": None, "cliff": {}}
        for kind, style, dk in (("stable", "-", 0), ("unstable", "--", 1)):
            losses = cell["cliff"].get(kind)
            if losses and cell["k"] is not None:
                ax.plot(
                    range(1, len(losses) + 1),
                    [x / losses[0] if x is not None else math.nan for x in losses],
                    style,
                    lw=1.2,
                    color=colors[init],
                    alpha=1.0 if dk else 0.6,
                    label=f"lr {2 ** ((cell['k'] + dk) / p):.3g} ({kind})",
                )
        ax.axhline(factor, color="0.3", lw=0.8, ls=":")
        ax.set_xscale("log")  # the spikes come in the first steps: give them room
        ax.set_yscale("log")
        ax.set_title(init, fontsize=10)
        ax.set_xlabel("step + 1")
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel(f"train loss / step-0 loss (dotted: {factor:g}×)")
    fig.suptitle(
        f"At the cliff: width {n}, seed {seed}; the max stable LR (solid) and one grid step above (dashed)", fontsize=10
    )
    fig.savefig(path, dpi=DPI)
    return path


def write_width_report(out_dir: str | Path) -> dict[str, Path]:
    """Write ``table.md``, ``cells.csv``, ``slopes.json`` and two PNGs next to ``results.json``; returns their paths."""
    out = Path(out_dir)
    results = read_json(out / "results.json")
    summary = summarize(results)
    paths = {
        "results": out / "results.json",
        "table": out / "table.md",
        "cells": out / "cells.csv",
        "slopes": out / "slopes.json",
        "figure": out / "max_stable_lr.png",
        "cliff": out / "cliff_curves.png",
    }
    paths["table"].write_text(to_markdown(tables(results, summary)), encoding="utf-8")
    _write_csv(paths["cells"], results)
    atomic_write_json(
        paths["slopes"],
        {i: {k: asdict(s[k]) if s[k] else None for k in ("all", "largest")} for i, s in summary.items()},
    )
    plot_max_lr(paths["figure"], results, summary)
    plot_cliff(paths["cliff"], results)
    return paths
