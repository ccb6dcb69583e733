"""A sweep's report (markdown, self-contained HTML, PNG plots), read only from the store.

The report follows the study it reproduces: final eval loss per init (rows) and LR (columns), the same relative to a
baseline init (``standard`` unless ``--baseline`` says otherwise), loss-vs-LR plots (full and zoomed) and eval-loss
curves. Following the tuning playbook, the init is the scientific variable and the LR a nuisance tuned away per init.
Grid axes other than row/column/replicate (e.g. ``lora.rank``) give one table per combination of their values.

Diverged runs enter the numbers by two conventions, and every table of numbers comes in both, named above it
(:data:`.cells.CONVENTIONS`): excluded (the lab's) and included at their final loss (the published study's); when no
run diverged they agree, and the report says so and shows one set. Every cell shows its seed count; ▲ marks runs
that ended worse than the pretrained model.

With per-chunk eval losses in the store (docs/evaluation.md), the report can tell inits apart: every cell gets a 95%
bootstrap interval over seeds and chunks (:mod:`.stats`), the table against the baseline holds paired differences
(same seed, same chunks) marked ✱ where the interval excludes 0, and the *tuned comparison* puts each init at its
own best LR, chosen on the validation chunks and reported on the test chunks (Lee et al. 2026: only tuned inits are
compared fairly). A store without per-chunk losses (written before loralab stored them) gets means ± std, the table
relative to the baseline in %, and the best LR per init, with a note on what it lacks.

The document is built once as a list of blocks, then rendered twice (markdown and HTML), so both say the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..store import RunRecord
from . import plots
from .cells import (
    CONVENTIONS,
    DIAG_KEYS,
    Layout,
    best_in_column,
    best_in_row,
    compute_of,
    diagnostic_stats,
    fmt_value,
    mean_curve,
    mixed_compute,
)
from .markup import to_html, to_markdown
from .stats import LEVEL, N_BOOT, Estimate, choose
from .table import Table, open_table

STATUS_ORDER = ("ok", "diverged", "failed", "unfinished", "pending")
PNGS = {
    "loss_vs_lr": "final eval loss vs LR, per init (diverged runs: x at their loss, ^ when not finite)",
    "loss_vs_lr_zoom": "the same without diverged runs",
    "curves": "eval loss during training (mean over ok seeds; dashed: diverged runs)",
    "diagnostics": "step-0 diagnostics per init",
}
CONVENTION_TEXT = {
    "excluded": "Convention: **diverged runs excluded** (the lab's): a cell is over its seeds that finished ok; †k: "
    "k seeds diverged and are left out.",
    "included": "Convention: **diverged runs included at their final loss** (the published study's): a cell is over "
    "every finished seed, blown-up ones too; †k: k of them diverged. A diverged run's final loss is where "
    'it stopped (train.on_divergence = "stop") or at the last step ("continue").',
}
MARKS = (
    "n=k: seeds in the number; ‡k: k seeds failed (left out); ▲k: k runs ended above the pretrained model's "
    "loss on the same chunks; (k not run): pending or unfinished."
)
SUFFIX = {"excluded": "", "included": ", diverged runs included"}
Block = tuple  # see markup.py


def _num(v: Any, spec: str = ".4f") -> str:
    return "—" if v is None else ("0" if v == 0 else format(float(v), spec))


def _ci(est: Estimate) -> str:
    """``3.6653 [3.6601, 3.6705]``; a non-finite loss has no mean worth a number, nor an interval."""
    if not est.finite:
        return "not finite"
    return f"{est.mean:.4f} [{est.lo:.4f}, {est.hi:.4f}]"


def delta_text(est: Estimate | None) -> str:
    """``−0.0123 [−0.0150, −0.0096] ✱ n=2``: ✱ when the interval excludes 0."""
    if est is None:
        return "n/a (no seed in common)"
    if not est.finite:
        return f"not finite n={est.seeds}"
    star = " ✱" if est.excludes_zero else ""
    lo, mean, hi = (round(v, 4) + 0.0 for v in (est.lo, est.mean, est.hi))  # + 0.0: no "-0.0000"
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]{star} n={est.seeds}"


def _header(name: str, manifest: dict, records: Sequence[RunRecord], out_dir: Path) -> list[Block]:
    counts = Counter(r.status for r in records)
    status = " · ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s])
    grid = " × ".join(f"`{k}` ({len(v)})" for k, v in manifest.get("grid", {}).items())
    base = manifest.get("base", {})
    setup = ", ".join(
        f"{k} `{fmt_value(v)}`"
        for k, v in (
            ("model", base.get("model", {}).get("name")),
            ("data", base.get("data", {}).get("source")),
            ("rank", base.get("lora", {}).get("rank")),
            ("alpha", base.get("lora", {}).get("alpha")),
        )
        if v is not None
    )
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [
        ("h", 1, f"Sweep report: {name}"),
        ("p", f"**{len(records)} runs**: {status or 'none'}."),
        ("p", f"Grid: {grid or '(none)'}." + (f" Base: {setup}." if setup else "")),
        ("p", f"Store `{out_dir}`, created {manifest.get('created', '?')}; report generated {when}."),
    ]


def _evaluation(ctx: Table, records: Sequence[RunRecord], manifest: dict) -> list[Block]:
    """How the numbers below were measured, or what this store lacks for intervals."""
    if ctx.splits is None:
        return [
            ("h", 2, "Evaluation"),
            (
                "p",
                f"No intervals, paired differences or tuned comparison: {ctx.why_not}. The tables give means ± "
                "sample std over seeds, and the best learning rate is chosen and reported on the same eval "
                "chunks, which flatters it (selection bias). Rerun the sweep with data.val_chunks and "
                "data.test_chunks set for a report that can tell inits apart (docs/evaluation.md).",
            ),
        ]
    first = next(r.eval_chunks for r in records if r.eval_chunks is not None)
    sizes = {k: len(v.ids) for k, v in first.splits.items()}
    seq = manifest.get("base", {}).get("data", {}).get("seq_len")
    tokens = f" of {seq} tokens" if seq else ""
    sel, rep = ctx.splits
    where = (
        f"{sizes['val']} validation and {sizes['test']} test chunks{tokens}: learning rates are chosen on "
        "validation, and every number below is on test"
        if sel != rep
        else f"{sizes['eval']} eval chunks{tokens}, with no validation split: a learning rate is chosen and reported "
        "on the same chunks, which flatters it"
    )
    return [
        ("h", 2, "Evaluation"),
        (
            "p",
            f"Final eval on {where}; the same chunks for every run (held-out pool {first.pool_digest}), so "
            "differences between runs are paired by chunk and seed. Intervals: "
            f"{LEVEL:.0%} percentile bootstrap over seeds and chunks (pigeonhole scheme, {N_BOOT} replicates, "
            "seeded per cell; loralab/lab/report/stats.py). An interval covers seed-to-seed variation only as "
            "well as the cell's seeds show it: with 1 seed, chunk noise only (docs/evaluation.md).",
        ),
    ]


def _grid_table(ctx: Table, g: int, cell: Callable[[int, int], str], bold: Callable[[int, int], bool]) -> Block:
    """A rows × columns table of group ``g``: ``cell(r, c)`` is each entry's text, ``bold(r, c)`` marks it."""
    lay = ctx.lay
    header = [f"{lay.row_axis} \\ {lay.col_axis}"] + list(lay.col_labels)
    rows = []
    for r, label in enumerate(lay.row_labels):
        texts = [cell(r, c) for c in range(len(lay.cols))]
        rows.append([f"`{label}`"] + [f"**{t}**" if bold(r, c) else t for c, t in enumerate(texts)])
    return ("table", header, rows)


def _best_of_column(ctx: Table, g: int, convention: str) -> Callable[[int, int], bool]:
    lay, cells = ctx.lay, ctx.cells
    return lambda r, c: len(lay.rows) > 1 and best_in_column(cells, lay, g, c, convention) == r


def _loss_table(ctx: Table, g: int, convention: str) -> Block:
    """Final eval loss of group ``g``: with an interval when the store has per-chunk losses."""
    cells = ctx.cells

    def cell(r: int, c: int) -> str:
        est = ctx.estimate(g, r, c, convention, ctx.splits[1]) if ctx.splits else None
        return _ci(est) + cells[g, r, c].marks(convention) if est is not None else cells[g, r, c].text(convention)

    return _grid_table(ctx, g, cell, _best_of_column(ctx, g, convention))


def _relative_table(ctx: Table, g: int, convention: str) -> Block:
    """Means relative to the baseline row in % (stores without per-chunk losses)."""
    cells, base = ctx.cells, ctx.base
    assert base is not None
    return _grid_table(
        ctx,
        g,
        lambda r, c: cells[g, r, c].relative_text(cells[g, base, c], convention),
        _best_of_column(ctx, g, convention),
    )


def _paired_table(ctx: Table, g: int, convention: str) -> Block:
    """Paired differences from the baseline row in the same column, with intervals."""
    cells, base = ctx.cells, ctx.base
    assert base is not None

    def cell(r: int, c: int) -> str:
        if r == base:
            return "baseline"
        if not cells[g, r, c].finished(convention) or not cells[g, base, c].finished(convention):
            return cells[g, r, c].text(convention) if not cells[g, r, c].finished(convention) else "n/a (no baseline)"
        return delta_text(ctx.paired(g, r, c, base, c, convention))

    return _grid_table(ctx, g, cell, lambda r, c: False)


def _edge_warnings(lay: Layout, chosen: dict[int, int]) -> list[Block]:
    out = []
    for r, c in chosen.items():
        edge = "lowest" if c == 0 else "highest" if c == len(lay.cols) - 1 else None
        if edge and len(lay.cols) > 1:
            out.append(
                (
                    "warn",
                    f"`{lay.row_labels[r]}`: the best {lay.col_axis} ({lay.col_labels[c]}) is the {edge} "
                    "value of the grid; the optimum may lie outside the range tuned: extend the grid "
                    "(tuning playbook).",
                )
            )
    if len(lay.cols) == 1:
        out.append(("warn", f"only one value of {lay.col_axis}: it was not tuned."))
    return out


def _best_lr(ctx: Table, g: int, convention: str) -> list[Block]:
    """Each row's best column by mean (stores without per-chunk losses), warning when it is the grid's edge."""
    lay, cells = ctx.lay, ctx.cells
    items, chosen = [], {}
    for r, label in enumerate(lay.row_labels):
        c = best_in_row(cells, lay, g, r, convention)
        if c is None:
            items.append(f"`{label}`: no eligible cell (every {lay.col_axis} diverged, failed or is not done)")
            continue
        chosen[r] = c
        items.append(f"`{label}`: best {lay.col_axis} = {lay.col_labels[c]} ({cells[g, r, c].mean(convention):.4f})")
    best = sorted((cells[g, r, c].mean(convention), r, c) for r, c in chosen.items())
    overall = [
        ("p", f"Lowest overall: `{lay.row_labels[r]}` at {lay.col_axis} = {lay.col_labels[c]} ({m:.4f}).")
        for m, r, c in best[:1]
    ]
    return overall + [("ul", items)] + _edge_warnings(lay, chosen)


def _tuned(ctx: Table, g: int, convention: str) -> list[Block]:
    """Each row at its own best column, chosen on the validation split only and reported on the test split."""
    lay = ctx.lay
    assert ctx.splits is not None
    sel, rep = ctx.splits
    val, chosen = ctx.tuned(g, convention)  # validation only
    base_c = chosen.get(ctx.base) if ctx.base is not None else None
    delta_head = f"Δ vs `{ctx.baseline}` at its own {lay.col_axis}" if ctx.base is not None else "Δ (no baseline)"
    header = [
        lay.row_axis,
        f"{lay.col_axis} (lowest {sel} loss)",
        f"{sel} loss",
        f"{rep} loss [95% CI]",
        f"{delta_head} [95% CI]",
    ]
    rows = []
    for r, label in enumerate(lay.row_labels):
        if r not in chosen:
            rows.append([f"`{label}`", "none eligible", "—", "—", "—"])
            continue
        c = chosen[r]
        est = ctx.estimate(g, r, c, convention, rep)
        test = (_ci(est) + f" n={est.seeds}") if est is not None else "—"
        if r == ctx.base:
            delta = "baseline"
        elif base_c is None or ctx.base is None:
            delta = "—"
        else:
            delta = delta_text(ctx.paired(g, r, c, ctx.base, base_c, convention))
        rows.append([f"`{label}`", lay.col_labels[c], f"{val[r, c]:.4f}", test, delta])
    blocks: list[Block] = [("table", header, rows)]
    if val:
        r, c = choose(val)  # the lowest validation loss of the whole table
        est = ctx.estimate(g, r, c, convention, rep)
        blocks.append(
            (
                "p",
                f"Lowest overall, chosen on {sel}: `{lay.row_labels[r]}` at {lay.col_axis} = "
                f"{lay.col_labels[c]}: {rep} loss {_ci(est) if est else '—'}.",
            )
        )
    if sel == rep:
        blocks.append(
            (
                "warn",
                "no validation split: each choice is made and reported on the same chunks, so its "
                "loss is biased low; set data.val_chunks and data.test_chunks.",
            )
        )
    return blocks + _edge_warnings(lay, chosen)


def _tables(ctx: Table) -> list[Block]:
    lay = ctx.lay
    heads = [[("h", 3, lay.group_label(g))] if lay.others else [] for g in range(len(lay.groups))]
    ci = " Each cell: mean [95% interval]." if ctx.splits else " Each cell: mean ± sample std over seeds."

    def section(title: str, text: str, per_group: Callable[[int, str], list[Block]], conv: str) -> list[Block]:
        """A heading, its explanation, then each group's blocks (under ``conv``) under the group's own heading."""
        groups = range(len(lay.groups))
        return [("h", 2, title), ("p", text)] + [b for g in groups for b in heads[g] + per_group(g, conv)]

    out: list[Block] = []
    if ctx.conventions != CONVENTIONS:
        out.append(
            (
                "p",
                "No run diverged, so the two conventions for diverged runs (excluded, or included at their "
                "final loss) give the same numbers: one set of tables.",
            )
        )
    for conv in ctx.conventions:
        out += section(
            f"Final eval loss{SUFFIX[conv]}",
            f"{CONVENTION_TEXT[conv]}{ci} {MARKS} **Bold**: the lowest mean in its column among eligible "
            "cells (no seed diverged; under the included convention, a finite mean).",
            lambda g, c: [_loss_table(ctx, g, c)],
            conv,
        )
    if ctx.base is not None:
        for conv in ctx.conventions:
            if ctx.splits:
                out += section(
                    f"Paired difference vs `{ctx.baseline}`{SUFFIX[conv]}",
                    f"{CONVENTION_TEXT[conv]} Each cell: the mean over seeds and {ctx.splits[1]} chunks of "
                    f"(loss − `{ctx.baseline}`'s loss in the same column, same seed, same chunk), in nats "
                    "(negative = lower loss), its 95% interval, ✱ when the interval excludes 0, and "
                    "n = the seeds both have.",
                    lambda g, c: [_paired_table(ctx, g, c)],
                    conv,
                )
            else:
                out += section(
                    f"Relative to `{ctx.baseline}`{SUFFIX[conv]}",
                    f"{CONVENTION_TEXT[conv]} (mean / mean of `{ctx.baseline}` in the same column − 1) × "
                    "100; negative = lower loss. Bold as in the table above.",
                    lambda g, c: [_relative_table(ctx, g, c)],
                    conv,
                )
    for conv in ctx.conventions:
        if ctx.splits:
            sel, rep = ctx.splits
            out += section(
                f"Tuned comparison: each {lay.row_axis} at its best {lay.col_axis}{SUFFIX[conv]}",
                f"{CONVENTION_TEXT[conv]} Each row's {lay.col_axis} is the one with the lowest mean {sel} "
                f"loss among its eligible cells; the {rep} loss of that cell is reported, and compared with "
                f"`{ctx.baseline}` at *its* best {lay.col_axis} (paired: same seeds, same chunks; ✱ when "
                "the interval excludes 0). This decides which init is better (Lee et al. 2026: once each "
                "method's learning rate is tuned, gaps shrink); the interval is conditional on the choice.",
                lambda g, c: _tuned(ctx, g, c),
                conv,
            )
        else:
            out += section(
                f"Best {lay.col_axis} per {lay.row_axis}{SUFFIX[conv]}",
                f"{CONVENTION_TEXT[conv]} Lowest mean final eval loss over eligible cells, chosen and "
                "reported on the same eval chunks.",
                lambda g, c: _best_lr(ctx, g, c),
                conv,
            )
    return out


def _diagnostics(lay: Layout, cells: dict) -> list[Block]:
    header = list(lay.others) + [
        lay.row_axis,
        "runs",
        "layers",
        "mean ‖∇A‖",
        "mean ‖∇B‖",
        "mean Var(A)",
        "mean Var(B)",
        "max |Δ output|",
    ]
    rows = []
    for g, combo in enumerate(lay.groups):
        for r, label in enumerate(lay.row_labels):
            stats = diagnostic_stats([run for c in range(len(lay.cols)) for run in cells[g, r, c].runs])
            if stats:
                values = [_num(stats[k], ".3e") for k in DIAG_KEYS + ("identity_max_abs",)]
                rows.append(
                    [fmt_value(v) for v in combo.values()]
                    + [f"`{label}`", f"{stats['runs']:.0f}", f"{stats['layers']:.0f}"]
                    + values
                )
    note = (
        "Step-0 quantities (Frobenius norms of the first gradients, variances of the initial factors), averaged "
        "over adapted layers, then over runs; |Δ output| is the largest change of the model's output caused by "
        "the adapter at init (0 = output preserved)."
    )
    return [("h", 2, "Step-0 diagnostics"), ("p", note), ("table", header, rows) if rows else ("p", "No diagnostics.")]


def _problems(records: Sequence[RunRecord], out_dir: Path) -> list[Block]:
    failed = [r for r in records if r.status == "failed"]
    waiting = [r for r in records if r.status in ("unfinished", "pending")]
    blocks: list[Block] = []
    if failed:
        items = []
        for r in failed:
            res = r.result
            error = (
                (res.error or "").strip().splitlines()[0]
                if res and res.error and res.error.strip()
                else "no error message recorded"
            )
            where = (
                f"`{r.path.relative_to(out_dir) / 'result.json'}` (field `traceback`)"
                if res and res.traceback
                else "no traceback recorded"
            )
            items.append(f"`{r.run_id}` ({_axes_text(r)}): {error} — traceback: {where}")
        blocks += [("h", 2, f"Failed runs ({len(failed)})"), ("ul", items)]
    if waiting:
        items = [
            f"`{r.run_id}` ({_axes_text(r)}): {r.status}" + (f" — {r.problem}" if r.problem else "") for r in waiting
        ]
        blocks += [
            ("h", 2, f"Unfinished and pending runs ({len(waiting)})"),
            ("p", "Not counted in the tables; a sweep resumed on this directory redoes them."),
            ("ul", items),
        ]
    return blocks


def _other_configs(others: Sequence[tuple[RunRecord, str]]) -> list[Block]:
    """A section naming the runs made with another config than sweep.json's (left out), if any."""
    if not others:
        return []
    note = (
        f"{len(others)} run(s) in this store were made with another config than sweep.json's (the fields that "
        "differ are named below). They are left out of every table and plot; move them to their own out_dir."
    )
    return [
        ("warn", note),
        ("h", 2, f"Runs of another config, left out ({len(others)})"),
        ("ul", [f"`{r.run_id}` ({_axes_text(r)}): {diff}" for r, diff in others]),
    ]


def _axes_text(r: RunRecord) -> str:
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in r.axes.items()) or "axes unknown"


def _listing(records: Sequence[RunRecord], axes: Sequence[str]) -> list[Block]:
    header = ["run id"] + list(axes)
    header += ["status", "final eval loss", "best eval loss", "steps", "tokens/s", "wall (s)", "computed on"]
    rows = []
    for r in records:
        res = r.result
        tps = res.tokens_per_s if res else None
        wall = res.wall_time_s if res and res.wall_time_s else None
        rows.append(
            [f"`{r.run_id}`"]
            + [fmt_value(r.axes[a]) if a in r.axes else "?" for a in axes]
            + [
                r.status,
                _num(r.final_eval_loss),
                _num(res.best_eval_loss if res else None),
                _num(res.steps if res else None, ".0f"),
                _num(tps, ".1f" if tps is not None and tps < 100 else ".0f"),
                _num(wall, ".0f"),
                compute_of(r) or "—",
            ]
        )
    return [("h", 2, f"All runs ({len(records)})"), ("table", header, rows)]


def _loss_panel(lay: Layout, cells: dict, g: int, xs: Sequence[float]) -> dict:
    """init label -> [(x, ok final losses, diverged final losses)] for group ``g``."""

    def diverged(c: int, r: int) -> list:
        return [x.final_eval_loss for x in cells[g, r, c].runs if x.status == "diverged"]

    return {
        lay.row_labels[r]: [(xs[c], cells[g, r, c].ok, diverged(c, r)) for c in range(len(lay.cols))]
        for r in range(len(lay.rows))
    }


def _curve_panels(lay: Layout, cells: dict, g: int, title: str) -> list[tuple[str, dict]]:
    """One panel per column: init label -> (mean eval curve of ok runs, eval curves of diverged runs)."""
    panels = []
    for c, col in enumerate(lay.col_labels):
        name = ", ".join(
            t for t in (f"{lay.col_axis.split('.')[-1]} = {col}" if lay.cols != (None,) else col, title) if t
        )
        panels.append(
            (
                name,
                {
                    lay.row_labels[r]: (
                        mean_curve([x.eval_curve() for x in cells[g, r, c].runs if x.status == "ok"]),
                        [x.eval_curve() for x in cells[g, r, c].runs if x.status == "diverged"],
                    )
                    for r in range(len(lay.rows))
                },
            )
        )
    return panels


def _plot_all(report_dir: Path, lay: Layout, cells: dict) -> dict[str, Path]:
    """Draw the four figures from plain per-cell lists (``diagnostics`` only when some run has diagnostics)."""
    colors = plots.init_colors(list(lay.row_labels))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in lay.cols)
    xs = list(lay.cols) if numeric else list(range(1, len(lay.cols) + 1))
    loss, curves, diags = [], [], []
    for g in range(len(lay.groups)):
        title = lay.group_label(g) if lay.others else ""
        loss.append((title, _loss_panel(lay, cells, g, xs)))
        curves += _curve_panels(lay, cells, g, title)
        stats = {
            label: diagnostic_stats([x for c in range(len(lay.cols)) for x in cells[g, r, c].runs])
            for r, label in enumerate(lay.row_labels)
        }
        diags.append((title, {k: v for k, v in stats.items() if v}))
    name = "learning rate" if lay.col_axis.split(".")[-1] == "lr" else lay.col_axis
    notes = [a for a in (lay.col_axis if name != lay.col_axis else "", "log scale" if numeric else "") if a]
    names = dict(zip(xs, lay.col_labels))
    xlabel = name + (f" ({', '.join(notes)})" if notes else "")

    def loss_plot(file: str, zoom: bool) -> Path:
        return plots.plot_loss_vs_lr(
            report_dir / file,
            loss,
            colors,
            zoom=zoom,
            xlabel=xlabel,
            log_x=numeric,
            what=name,
            tick_label=lambda x: names.get(x, str(x)),
        )

    out = {
        "loss_vs_lr": loss_plot("loss_vs_lr.png", False),
        "loss_vs_lr_zoom": loss_plot("loss_vs_lr_zoom.png", True),
        "curves": plots.plot_curves(report_dir / "curves.png", curves, colors, what=name),
    }
    if any(stats for _, stats in diags):
        out["diagnostics"] = plots.plot_diagnostics(report_dir / "diagnostics.png", diags, colors)
    return out


def write_report(
    out_dir: str | Path,
    *,
    row_axis: str = "lora.init",
    col_axis: str = "train.lr",
    rep_axis: str = "train.seed",
    out: str | Path | None = None,
    baseline: str | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``<out_dir>/report/`` (or ``out``).

    Args:
        out_dir: a sweep's directory (holding ``sweep.json``).
        out: where to write the report instead of ``<out_dir>/report``.
        row_axis, col_axis, rep_axis: grid axes for table rows (the scientific variable), columns (the nuisance
            parameter tuned per row) and replicates (averaged over). A missing axis gives one row / column.
        baseline: the row the others are compared with; ``None``: ``standard`` when it is a row, else no comparison.

    Returns:
        ``{"md", "html", "loss_vs_lr", "loss_vs_lr_zoom", "curves", "diagnostics"}`` → file paths
        (``diagnostics`` only when some run has step-0 diagnostics).

    A run whose ``result.json`` cannot be read is listed as unfinished, with the reason. Runs made with another
    config (their config.json differs from ``sweep.json``'s outside the grid axes) are left out and named.

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``sweep.json``.
        CorruptFileError: ``sweep.json`` cannot be read (naming it).
        ValueError: ``baseline`` is not one of the rows (naming them).
    """
    out_dir = Path(out_dir).expanduser()
    opened = open_table(out_dir, row_axis=row_axis, col_axis=col_axis, rep_axis=rep_axis, baseline=baseline)
    manifest, records, ctx = opened.manifest, opened.records, opened.table
    lay, cells = ctx.lay, ctx.cells
    report_dir = Path(out).expanduser() if out is not None else out_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = _plot_all(report_dir, lay, cells)
    name = manifest.get("name", out_dir.name)
    images = [("h", 2, "Plots")] + [("img", paths[k], cap) for k, cap in PNGS.items() if k in paths]
    blocks = (
        _header(name, manifest, records, out_dir)
        + _other_configs(opened.others)
        + [("warn", note) for note in [mixed_compute(records)] if note]
        + _evaluation(ctx, records, manifest)
        + _tables(ctx)
        + images
        + _diagnostics(lay, cells)
        + _problems(records, out_dir)
        + _listing(records, list(manifest.get("grid", {})))
    )
    paths["md"] = report_dir / "report.md"
    paths["md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["html"] = report_dir / "report.html"
    paths["html"].write_text(to_html(blocks, f"Sweep report: {name}"), encoding="utf-8")
    return paths
