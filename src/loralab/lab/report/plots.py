"""The report's figures, drawn from plain lists (no store access, no pyplot: figures are made and closed here).

Every function takes ``colors`` (init label → colour) so an init has the same colour in every figure, and writes
one PNG at ``DPI``. Diverged runs are drawn, never dropped: as ``x`` at their final loss, or ``^`` at the top edge
when the loss was not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure  # a bare Figure renders PNGs with Agg and never touches pyplot's global state
from matplotlib.lines import Line2D

DPI = 120
LOSS_UNIT = "eval loss (nats/token)"
# label -> [(x, ok final losses, diverged final losses or None)]
LossSeries = Mapping[str, Sequence[tuple[float, Sequence[float], Sequence[float | None]]]]
Curve = Sequence[tuple[int, float]]


def init_colors(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per init label, in order (tab10, or tab20 past ten)."""
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _grid(n_panels: int, max_cols: int, w: float, h: float, extra_w: float = 0.0):
    ncols = max(1, min(n_panels, max_cols))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(w * ncols + extra_w, h * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    fig.clear()  # Figure objects made without pyplot are freed with their last reference; clear() drops artists now
    return path


def _jitter(i: int, n: int) -> float:
    """A small multiplicative x offset per init so that markers at the same LR do not hide each other."""
    return 10 ** (0.018 * (i - (n - 1) / 2))


def _loss_panel(ax, series: LossSeries, colors: Mapping, zoom: bool) -> list[tuple[float, str]]:
    """Draw one panel; returns (x, label) of non-finite diverged runs, drawn at the top edge once y is known."""
    top_edge: list[tuple[float, str]] = []
    for i, (label, points) in enumerate(series.items()):
        j, color = _jitter(i, len(series)), colors[label]
        ok = [(x * j, sum(v) / len(v), _std(v)) for x, v, _ in points if v]
        if ok:
            xs, ms, ss = zip(*ok)
            ax.errorbar(xs, ms, yerr=ss, color=color, marker="o", ms=4.5, lw=1.6, capsize=3, label=label)
        if zoom:  # the cell's mean leaves diverged seeds out: say how many, as the table does
            for x, v, ds in points:
                if v and ds:
                    ax.annotate(
                        f"†{len(ds)}",
                        (x * j, sum(v) / len(v)),
                        xytext=(5, 3),
                        textcoords="offset points",
                        fontsize=9,
                        color=color,
                        fontweight="bold",
                    )
            continue
        div = [(x * j, d) for x, _, ds in points for d in ds]
        finite = [(x, d) for x, d in div if d is not None and math.isfinite(d)]
        if finite:
            ax.scatter(*zip(*finite), marker="x", s=42, linewidths=1.6, color=color, zorder=3)
        top_edge += [(x, label) for x, d in div if d is None or not math.isfinite(d)]
    return top_edge


def _std(v: Sequence[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def _fit_ylim(ax, series: LossSeries) -> None:
    """Y range of the zoomed plot: every mean ± std of non-diverged values, plus a margin."""
    lo, hi = [], []
    for points in series.values():
        for _, v, _ in points:
            if v:
                m, s = sum(v) / len(v), _std(v)
                lo.append(m - s)
                hi.append(m + s)
    if lo:
        pad = max(max(hi) - min(lo), 1e-3) * 0.08
        ax.set_ylim(min(lo) - pad, max(hi) + pad)


def plot_loss_vs_lr(
    path: Path,
    panels: Sequence[tuple[str, LossSeries]],
    colors: Mapping,
    *,
    xlabel: str,
    tick_label: Callable[[float], str] = str,
    zoom: bool = False,
    log_x: bool = True,
    what: str = "learning rate",
) -> Path:
    """Final eval loss vs the column axis (the LR), one line per init: mean over seeds, std error bars.

    Each panel is ``(title, series)``, ``series`` being init label → ``[(x, ok losses, diverged losses)]``;
    ``tick_label`` names an x value (the grid's values are the ticks).
    """
    xticks = sorted({x for _, series in panels for points in series.values() for x, _, _ in points})
    fig, axes = _grid(len(panels), 3, 5.6, 4.2, extra_w=2.4)
    for ax, (title, series) in zip(axes, panels):
        top_edge = _loss_panel(ax, series, colors, zoom)
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xticks, [tick_label(x) for x in xticks], fontsize=8)
        if zoom:
            _fit_ylim(ax, series)
        if top_edge:  # headroom, so the edge markers do not sit on top of finite points
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.1 * (hi - lo))
        for x, label in top_edge:
            ax.plot(
                x,
                0.97,
                marker="^",
                ms=7,
                mfc="none",
                mew=1.5,
                color=colors[label],
                clip_on=False,
                transform=ax.get_xaxis_transform(),
            )
        ax.set(title=title, xlabel=xlabel, ylabel="final " + LOSS_UNIT)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=c, marker="o", lw=1.6, label=k) for k, c in colors.items()]
    if not zoom:
        handles += [
            Line2D([], [], color="0.3", marker="x", ls="none", mew=1.6, label="diverged run"),
            Line2D([], [], color="0.3", marker="^", mfc="none", ls="none", label="diverged, loss not finite"),
        ]
    else:
        handles.append(Line2D([], [], ls="none", label="†k: k diverged seeds left out"))
    # attached to the top-right panel, so the constrained layout makes room for it (a figure legend can hit the title)
    axes[min(len(panels), 3) - 1].legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="init", alignment="left"
    )
    fig.suptitle(
        f"Final eval loss vs {what}"
        + (", zoomed: diverged runs left out" if zoom else "")
        + "\nmean ± std over seeds that finished ok",
        fontsize=11,
    )
    return _save(fig, path)


def _curve_panel(ax, lines: Mapping[str, tuple[Curve, Sequence[Curve]]], colors: Mapping) -> None:
    for label, (mean, diverged) in lines.items():
        if mean:
            ax.plot(*zip(*mean), color=colors[label], lw=1.6)
        for run in diverged:
            ax.plot(*zip(*run), color=colors[label], lw=1.0, ls="--", alpha=0.8)
    if not any(m for m, _ in lines.values()):
        text = "every finished run diverged" if any(d for _, d in lines.values()) else "no finished runs"
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.35", fontsize=9)


def plot_curves(
    path: Path,
    panels: Sequence[tuple[str, Mapping[str, tuple[Curve, Sequence[Curve]]]]],
    colors: Mapping,
    what: str = "learning rate",
) -> Path:
    """Eval loss over training, one panel per LR: mean over ok seeds (solid), diverged runs (dashed, each).

    Each panel is ``(title, lines)``, ``lines`` being init label → ``(mean curve, [diverged run curves])``.
    All panels share x and y ranges (those of the ok runs): diverged runs leave through the top.
    """
    fig, axes = _grid(len(panels) + 1, 4, 3.4, 2.7)
    ncols = min(len(panels) + 1, 4)
    ys = [y for _, lines in panels for mean, _ in lines.values() for _, y in mean]
    steps = [x for _, lines in panels for m, ds in lines.values() for c in [m, *ds] for x, _ in c]
    for i, (ax, (title, lines)) in enumerate(zip(axes, panels)):
        _curve_panel(ax, lines, colors)
        if ys:
            pad = (max(ys) - min(ys)) * 0.06 or 0.01
            ax.set_ylim(min(ys) - pad, max(ys) + pad)
        if steps:
            ax.set_xlim(min(steps), max(steps))
        ax.set(title=title, xlabel="optimizer step", ylabel=LOSS_UNIT if i % ncols == 0 else "")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    handles = [Line2D([], [], color=c, lw=1.6, label=k) for k, c in colors.items()]
    handles.append(Line2D([], [], color="0.3", lw=1.0, ls="--", label="a diverged run"))
    axes[len(panels)].legend(handles=handles, loc="center", frameon=False, title="init (mean over ok seeds)")
    fig.suptitle(f"Eval loss during training, per {what}", fontsize=12)
    return _save(fig, path)


DIAG_PANELS = (
    ("grad_norm_a", "mean ‖∇A‖ at step 0 (Frobenius)"),
    ("grad_norm_b", "mean ‖∇B‖ at step 0 (Frobenius)"),
    ("var_a", "mean Var(A) at init"),
    ("var_b", "mean Var(B) at init"),
    ("identity_max_abs", "max |Δ output| at init (0 = preserved)"),
)


def _bar_panel(ax, key: str, groups: Sequence[tuple[str, Mapping[str, Mapping]]], colors: Mapping) -> None:
    """Bars per init (colour) within each group, log y; zero / missing values are written as text, not drawn."""
    labels = list(colors)
    width = 0.8 / len(labels)
    values = [
        (gi + (i - (len(labels) - 1) / 2) * width, stats[lab][key], colors[lab])
        for gi, (_, stats) in enumerate(groups)
        for i, lab in enumerate(labels)
        if lab in stats
    ]
    pos = [v for _, v, _ in values if v is not None and math.isfinite(v) and v > 0]
    lo, hi = (min(pos) / 8, max(pos) * 8) if pos else (1e-3, 1.0)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.set_xlim(-0.5, len(groups) - 0.5)  # fixed, so that a zero (undrawn) bar keeps its place
    rotation = 0 if len(values) <= 6 else 90
    for x, v, color in values:
        if v is not None and math.isfinite(v) and v > 0:
            ax.bar(x, v, width * 0.9, color=color)
            ax.text(x, v * 1.25, f"{v:.1e}", ha="center", va="bottom", fontsize=7, rotation=rotation)
        else:
            text = "0" if v == 0 else "n/a"
            ax.text(x, lo * 1.5, text, ha="center", va="bottom", fontsize=9, color=color, fontweight="bold")
    if len(groups) == 1:
        ax.set_xticks(
            [x for x, _, _ in values],
            [lab for lab in labels if lab in groups[0][1]],
            rotation=30,
            ha="right",
            fontsize=8,
        )
    else:
        ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    ax.grid(True, axis="y", which="major", alpha=0.3)


def plot_diagnostics(
    path: Path, groups: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]], colors: Mapping
) -> Path:
    """Step-0 diagnostics per init (means over layers and seeds), one panel per quantity, log scale."""
    fig, axes = _grid(6, 3, 4.4, 3.6)
    for ax, (key, title) in zip(axes, DIAG_PANELS):
        _bar_panel(ax, key, groups, colors)
        ax.set_title(title, fontsize=10)
    axes[-1].axis("off")
    handles = [Line2D([], [], color=c, lw=6, label=k) for k, c in colors.items()]
    axes[-1].legend(handles=handles, loc="upper center", frameon=False, title="init")
    axes[-1].text(
        0.5,
        0.02,
        'log scale; "0" marks an exact zero\n(e.g. ∇A under standard: B = 0)',
        ha="center",
        va="bottom",
        fontsize=8,
        color="0.3",
        transform=axes[-1].transAxes,
    )
    fig.suptitle("Step-0 diagnostics (mean over adapted layers and seeds)", fontsize=12)
    return _save(fig, path)
