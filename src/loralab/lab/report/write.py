"""A sweep's report (markdown, self-contained HTML, PNG plots), read only from the store.

The report follows the study it reproduces: final eval loss per init (rows) and LR (columns), mean ± std over seeds,
the same table relative to ``standard`` in %, loss-vs-LR plots (full and zoomed) and eval-loss curves. Following
the tuning playbook, the init is the scientific variable and the LR a nuisance tuned away per init: each init's best
LR is reported, with a warning when it sits on the grid's edge (the optimum may lie outside the range tuned).
Diverged and failed runs are shown as such, never averaged in. Grid axes other than row/column/replicate (e.g.
``lora.rank``) give one table per combination of their values.

The document is built once as a list of blocks, then rendered twice (markdown and HTML), so both say the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..store import RunRecord, SweepStore, config_diff
from . import plots
from .cells import (
    DIAG_KEYS,
    Layout,
    best_in_column,
    best_in_row,
    cell_grid,
    diagnostic_stats,
    fmt_value,
    make_layout,
    mean_curve,
)
from .markup import to_html, to_markdown

REFERENCE_ROW = "standard"
STATUS_ORDER = ("ok", "diverged", "failed", "unfinished", "pending")
PNGS = {"loss_vs_lr": "final eval loss vs LR, per init (diverged runs: x at their loss, ^ when not finite)",
        "loss_vs_lr_zoom": "the same without diverged runs",
        "curves": "eval loss during training (mean over ok seeds; dashed: diverged runs)",
        "diagnostics": "step-0 diagnostics per init"}
LEGEND = ("Final eval loss (nats/token): mean ± sample std over seeds that finished ok. "
          "†k: k seeds diverged (excluded from the mean); ‡k: k seeds failed (excluded); (k not run): pending or "
          "unfinished. **Bold**: the lowest mean in its column among cells where no seed diverged.")
Block = tuple  # see markup.py


def _num(v: Any, spec: str = ".4f") -> str:
    return "—" if v is None else ("0" if v == 0 else format(float(v), spec))


def _header(name: str, manifest: dict, records: Sequence[RunRecord], out_dir: Path) -> list[Block]:
    counts = Counter(r.status for r in records)
    status = " · ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s])
    grid = " × ".join(f"`{k}` ({len(v)})" for k, v in manifest.get("grid", {}).items())
    base = manifest.get("base", {})
    setup = ", ".join(f"{k} `{fmt_value(v)}`" for k, v in (
        ("model", base.get("model", {}).get("name")), ("data", base.get("data", {}).get("source")),
        ("rank", base.get("lora", {}).get("rank")), ("alpha", base.get("lora", {}).get("alpha"))) if v is not None)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [("h", 1, f"Sweep report: {name}"),
            ("p", f"**{len(records)} runs**: {status or 'none'}."),
            ("p", f"Grid: {grid or '(none)'}." + (f" Base: {setup}." if setup else "")),
            ("p", f"Store `{out_dir}`, created {manifest.get('created', '?')}; report generated {when}.")]


def _loss_table(lay: Layout, cells: dict, g: int, ref: int | None) -> Block:
    """The loss table of group ``g``; relative to row ``ref`` in % when ``ref`` is given."""
    header = [f"{lay.row_axis} \\ {lay.col_axis}"] + list(lay.col_labels)
    rows = []
    for r, label in enumerate(lay.row_labels):
        row = [f"`{label}`"]
        for c in range(len(lay.cols)):
            cell = cells[g, r, c]
            text = cell.text() if ref is None else cell.relative_text(cells[g, ref, c])
            best = len(lay.rows) > 1 and best_in_column(cells, lay, g, c) == r  # one row: nothing to compare
            row.append(f"**{text}**" if best else text)
        rows.append(row)
    return ("table", header, rows)


def _best_lr(lay: Layout, cells: dict, g: int) -> list[Block]:
    """Each init's best column value, warning when it is the grid's first or last value."""
    items, warnings = [], []
    for r, label in enumerate(lay.row_labels):
        c = best_in_row(cells, lay, g, r)
        if c is None:
            items.append(f"`{label}`: no clean cell (every {lay.col_axis} diverged, failed or is not done)")
            continue
        items.append(f"`{label}`: best {lay.col_axis} = {lay.col_labels[c]} ({cells[g, r, c].mean:.4f})")
        edge = "lowest" if c == 0 else "highest" if c == len(lay.cols) - 1 else None
        if edge and len(lay.cols) > 1:
            warnings.append(("warn", f"`{label}`: the best {lay.col_axis} ({lay.col_labels[c]}) is the {edge} "
                                     "value of the grid; the optimum may lie outside the range tuned: extend the grid "
                                     "(tuning playbook)."))
    if len(lay.cols) == 1:
        warnings.append(("warn", f"only one value of {lay.col_axis}: it was not tuned."))
    best = [(cells[g, r, c].mean, r, c) for r in range(len(lay.rows))
            if (c := best_in_row(cells, lay, g, r)) is not None]
    overall = [("p", f"Lowest overall: `{lay.row_labels[r]}` at {lay.col_axis} = {lay.col_labels[c]} ({m:.4f}).")
               for m, r, c in sorted(best)[:1]]
    return overall + [("ul", items)] + warnings


def _tables(lay: Layout, cells: dict) -> list[Block]:
    ref = lay.row_labels.index(REFERENCE_ROW) if REFERENCE_ROW in lay.row_labels else None
    sections = [("h", 2, "Final eval loss"), ("p", LEGEND)]
    if ref is not None:
        rel = [("h", 2, f"Relative to `{REFERENCE_ROW}`"),
               ("p", f"(mean / mean of `{REFERENCE_ROW}` in the same column − 1) × 100; negative = lower loss. Bold "
                     "as in the table above.")]
    best = [("h", 2, f"Best {lay.col_axis} per {lay.row_axis}"),
            ("p", "Lowest mean final eval loss over cells where no seed diverged.")]
    for g in range(len(lay.groups)):
        head = [("h", 3, lay.group_label(g))] if lay.others else []
        sections += head + [_loss_table(lay, cells, g, None)]
        if ref is not None:
            rel += head + [_loss_table(lay, cells, g, ref)]
        best += head + _best_lr(lay, cells, g)
    return sections + (rel if ref is not None else []) + best


def _diagnostics(lay: Layout, cells: dict) -> list[Block]:
    header = list(lay.others) + [lay.row_axis, "runs", "layers", "mean ‖∇A‖", "mean ‖∇B‖", "mean Var(A)",
                                 "mean Var(B)", "max |Δ output|"]
    rows = []
    for g, combo in enumerate(lay.groups):
        for r, label in enumerate(lay.row_labels):
            stats = diagnostic_stats([run for c in range(len(lay.cols)) for run in cells[g, r, c].runs])
            if stats:
                values = [_num(stats[k], ".3e") for k in DIAG_KEYS + ("identity_max_abs",)]
                rows.append([fmt_value(v) for v in combo.values()] + [f"`{label}`", f"{stats['runs']:.0f}",
                                                                       f"{stats['layers']:.0f}"] + values)
    note = ("Step-0 quantities (Frobenius norms of the first gradients, variances of the initial factors), averaged "
            "over adapted layers, then over runs; |Δ output| is the largest change of the model's output caused by "
            "the adapter at init (0 = output preserved).")
    return [("h", 2, "Step-0 diagnostics"), ("p", note), ("table", header, rows) if rows else ("p", "No diagnostics.")]


def _problems(records: Sequence[RunRecord], out_dir: Path) -> list[Block]:
    failed = [r for r in records if r.status == "failed"]
    waiting = [r for r in records if r.status in ("unfinished", "pending")]
    blocks: list[Block] = []
    if failed:
        items = []
        for r in failed:
            res = r.result
            error = (res.error or "").strip().splitlines()[0] if res and res.error and res.error.strip() else \
                "no error message recorded"
            where = f"`{r.path.relative_to(out_dir) / 'result.json'}` (field `traceback`)" if res and res.traceback \
                else "no traceback recorded"
            items.append(f"`{r.run_id}` ({_axes_text(r)}): {error} — traceback: {where}")
        blocks += [("h", 2, f"Failed runs ({len(failed)})"), ("ul", items)]
    if waiting:
        items = [f"`{r.run_id}` ({_axes_text(r)}): {r.status}" + (f" — {r.problem}" if r.problem else "")
                 for r in waiting]
        blocks += [("h", 2, f"Unfinished and pending runs ({len(waiting)})"),
                   ("p", "Not counted in the tables; a sweep resumed on this directory redoes them."), ("ul", items)]
    return blocks


def _other_configs(manifest: dict, records: Sequence[RunRecord]) -> tuple[list[RunRecord], list[Block]]:
    """The runs made with this sweep's config, and a section naming those made with another one (left out).

    A run's config.json that differs from ``sweep.json``'s base outside the grid axes belongs to another experiment
    (e.g. runs of two configs that shared an out_dir whose sweep.json was lost): averaging it in would mix them.
    """
    base, axes = manifest.get("base", {}), list(manifest.get("grid", {}))
    configs = {r.run_id: (r.config or {}).get("config") for r in records}
    diffs = {k: config_diff(c, base, axes) for k, c in configs.items() if isinstance(c, dict)}
    others = [f"`{r.run_id}` ({_axes_text(r)}): {diffs[r.run_id]}" for r in records if diffs.get(r.run_id)]
    if not others:
        return list(records), []
    note = (f"{len(others)} run(s) in this store were made with another config than sweep.json's (the fields that "
            "differ are named below). They are left out of every table and plot; move them to their own out_dir.")
    return [r for r in records if not diffs.get(r.run_id)], [
        ("warn", note), ("h", 2, f"Runs of another config, left out ({len(others)})"), ("ul", others)]


def _axes_text(r: RunRecord) -> str:
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in r.axes.items()) or "axes unknown"


def _listing(records: Sequence[RunRecord], axes: Sequence[str]) -> list[Block]:
    header = ["run id"] + list(axes) + ["status", "final eval loss", "best eval loss", "steps", "tokens/s"]
    rows = []
    for r in records:
        res = r.result
        tps = res.tokens_per_s if res else None
        rows.append([f"`{r.run_id}`"] + [fmt_value(r.axes[a]) if a in r.axes else "?" for a in axes] + [
            r.status, _num(r.final_eval_loss), _num(res.best_eval_loss if res else None),
            _num(res.steps if res else None, ".0f"), _num(tps, ".1f" if tps is not None and tps < 100 else ".0f")])
    return [("h", 2, f"All runs ({len(records)})"), ("table", header, rows)]


def _loss_panel(lay: Layout, cells: dict, g: int, xs: Sequence[float]) -> dict:
    """init label -> [(x, ok final losses, diverged final losses)] for group ``g``."""
    def diverged(c: int, r: int) -> list:
        return [x.final_eval_loss for x in cells[g, r, c].runs if x.status == "diverged"]
    return {lay.row_labels[r]: [(xs[c], cells[g, r, c].ok, diverged(c, r)) for c in range(len(lay.cols))]
            for r in range(len(lay.rows))}


def _curve_panels(lay: Layout, cells: dict, g: int, title: str) -> list[tuple[str, dict]]:
    """One panel per column: init label -> (mean eval curve of ok runs, eval curves of diverged runs)."""
    panels = []
    for c, col in enumerate(lay.col_labels):
        name = ", ".join(t for t in (f"{lay.col_axis.split('.')[-1]} = {col}" if lay.cols != (None,) else col, title)
                         if t)
        panels.append((name, {lay.row_labels[r]: (
            mean_curve([x.eval_curve() for x in cells[g, r, c].runs if x.status == "ok"]),
            [x.eval_curve() for x in cells[g, r, c].runs if x.status == "diverged"]) for r in range(len(lay.rows))}))
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
        stats = {label: diagnostic_stats([x for c in range(len(lay.cols)) for x in cells[g, r, c].runs])
                 for r, label in enumerate(lay.row_labels)}
        diags.append((title, {k: v for k, v in stats.items() if v}))
    name = "learning rate" if lay.col_axis.split(".")[-1] == "lr" else lay.col_axis
    notes = [a for a in (lay.col_axis if name != lay.col_axis else "", "log scale" if numeric else "") if a]
    names = dict(zip(xs, lay.col_labels))
    xlabel = name + (f" ({', '.join(notes)})" if notes else "")

    def loss_plot(file: str, zoom: bool) -> Path:
        return plots.plot_loss_vs_lr(report_dir / file, loss, colors, zoom=zoom, xlabel=xlabel, log_x=numeric,
                                     what=name, tick_label=lambda x: names.get(x, str(x)))

    out = {"loss_vs_lr": loss_plot("loss_vs_lr.png", False), "loss_vs_lr_zoom": loss_plot("loss_vs_lr_zoom.png", True),
           "curves": plots.plot_curves(report_dir / "curves.png", curves, colors, what=name)}
    if any(stats for _, stats in diags):
        out["diagnostics"] = plots.plot_diagnostics(report_dir / "diagnostics.png", diags, colors)
    return out


def write_report(out_dir: str | Path, *, row_axis: str = "lora.init", col_axis: str = "train.lr",
                 rep_axis: str = "train.seed", out: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``<out_dir>/report/`` (or ``out``).

    Args:
        out_dir: a sweep's directory (holding ``sweep.json``).
        out: where to write the report instead of ``<out_dir>/report``.
        row_axis, col_axis, rep_axis: grid axes for table rows (the scientific variable), columns (the nuisance
            parameter tuned per row) and replicates (averaged over). A missing axis gives one row / column.

    Returns:
        ``{"md", "html", "loss_vs_lr", "loss_vs_lr_zoom", "curves", "diagnostics"}`` → file paths
        (``diagnostics`` only when some run has step-0 diagnostics).

    A run whose ``result.json`` cannot be read is listed as unfinished, with the reason. Runs made with another
    config (their config.json differs from ``sweep.json``'s outside the grid axes) are left out and named.

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``sweep.json``.
        CorruptFileError: ``sweep.json`` cannot be read (naming it).
    """
    out_dir = Path(out_dir).expanduser()
    store = SweepStore(out_dir)
    manifest = store.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{out_dir / 'sweep.json'} not found: {out_dir} is not a sweep directory")
    records, other_configs = _other_configs(manifest, store.records())
    lay = make_layout(manifest, row_axis, col_axis, rep_axis)
    cells = cell_grid(lay, records)
    report_dir = Path(out).expanduser() if out is not None else out_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = _plot_all(report_dir, lay, cells)
    name = manifest.get("name", out_dir.name)
    images = [("h", 2, "Plots")] + [("img", paths[k], cap) for k, cap in PNGS.items() if k in paths]
    blocks = (_header(name, manifest, records, out_dir) + other_configs
              + _tables(lay, cells) + images + _diagnostics(lay, cells)
              + _problems(records, out_dir) + _listing(records, list(manifest.get("grid", {}))))
    paths["md"] = report_dir / "report.md"
    paths["md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["html"] = report_dir / "report.html"
    paths["html"].write_text(to_html(blocks, f"Sweep report: {name}"), encoding="utf-8")
    return paths
