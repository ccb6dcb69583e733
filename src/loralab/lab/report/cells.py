"""Group a sweep's runs into the report's tables: rows (the init) × columns (the LR), replicated over seeds.

Each table cell holds the runs of one (row, column) pair of one *group* (one combination of the grid's other axes,
e.g. ``lora.rank``). A cell's mean and std are over the seeds that finished ``ok``; diverged runs are counted and
marked but never averaged in (a mean over blown-up losses measures nothing), failed and unfinished runs likewise.
Cells compared for "best" are the clean ones (some run ok, none diverged): a config that diverges on some seeds is
not a config to recommend, even if its surviving seeds look good. Used by ``report.py`` (tables) and, through plain
lists, by ``plots.py``.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.schema import RunConfig
from ..config.typecheck import ConfigError, field_type
from ..store import RunRecord

DIAG_KEYS = ("grad_norm_a", "grad_norm_b", "var_a", "var_b")


def dotted_get(d: Any, path: str) -> Any:
    """``d["a"]["b"]`` for ``path="a.b"``, ``None`` when any part is missing."""
    for part in path.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


def fmt_value(v: Any) -> str:
    """An axis value for humans: small floats as ``1e-4``/``2.5e-3``, other values as ``str``."""
    if isinstance(v, float) and v != 0 and abs(v) < 0.1:
        mant, exp = f"{v:.3e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


@dataclass(frozen=True)
class Cell:
    """The runs of one table cell. ``ok`` holds the final eval losses of runs that finished ok."""

    runs: tuple[RunRecord, ...] = ()

    def _with(self, status: str) -> list[RunRecord]:
        return [r for r in self.runs if r.status == status]

    @property
    def ok(self) -> tuple[float, ...]:
        return tuple(r.final_eval_loss for r in self._with("ok") if r.final_eval_loss is not None)

    @property
    def diverged(self) -> int:
        return len(self._with("diverged"))

    @property
    def failed(self) -> int:
        return len(self._with("failed"))

    @property
    def waiting(self) -> int:
        return sum(r.status in ("pending", "unfinished") for r in self.runs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.ok) if self.ok else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (n − 1), ``None`` with fewer than two."""
        return statistics.stdev(self.ok) if len(self.ok) >= 2 else None

    @property
    def clean(self) -> bool:
        return bool(self.ok) and not self.diverged

    def marks(self) -> str:
        """†k: k seeds diverged (excluded); ‡k: k failed (excluded); (k not run): pending or unfinished."""
        out = f" †{self.diverged}" if self.diverged and self.ok else ""
        out += f" ‡{self.failed}" if self.failed and (self.ok or self.diverged) else ""
        return out + (f" ({self.waiting} not run)" if self.waiting and len(self.runs) > self.waiting else "")

    def text(self) -> str:
        """E.g. ``2.2591 ± 0.0031``, ``2.3100 ± 0.0200 †1``, ``diverged (4/4)``, ``failed (1/1)``, ``pending``."""
        n = len(self.runs)
        if self.ok:
            core = f"{self.mean:.4f}" + (f" ± {self.std:.4f}" if self.std is not None else "")
        elif self.diverged:
            core = f"diverged ({self.diverged}/{n})"
        elif self.failed:
            core = f"failed ({self.failed}/{n})"
        else:
            return "pending" if n else "—"
        return core + self.marks()

    def relative_text(self, ref: Cell) -> str:
        """This cell's mean relative to ``ref``'s in %, e.g. ``+1.23%``; non-numeric cells keep their text."""
        if self.mean is None or ref.mean is None:
            return self.text() if self.mean is None else "n/a (no reference)"
        return f"{100.0 * (self.mean / ref.mean - 1.0):+.2f}%" + self.marks()


@dataclass(frozen=True)
class Layout:
    """Where each run goes: ``groups`` (combinations of the other axes) × ``rows`` × ``cols``."""

    row_axis: str
    col_axis: str
    others: tuple[str, ...]
    rows: tuple[Any, ...]
    cols: tuple[Any, ...]
    groups: tuple[Mapping[str, Any], ...]
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]

    def group_label(self, g: int) -> str:
        return ", ".join(f"{k} = {fmt_value(v)}" for k, v in self.groups[g].items())

    def place(self, rec: RunRecord) -> tuple[int, int, int] | None:
        """``(group, row, col)`` indices of a run, ``None`` if its axes are unknown or off the grid."""
        g = next((i for i, combo in enumerate(self.groups)
                  if all(a in rec.axes and _key(rec.axes[a]) == _key(v) for a, v in combo.items())), None)
        r = _index(self.rows, rec.axes, self.row_axis)
        c = _index(self.cols, rec.axes, self.col_axis)
        if g is None or r is None or c is None:
            return None
        return g, r, c


def _index(values: tuple, axes: Mapping[str, Any], axis: str) -> int | None:
    if values == (None,):  # the axis is not in the grid: one row (or column) holds every run
        return 0
    keys = [_key(v) for v in values]
    k = _key(axes[axis]) if axis in axes else None
    return keys.index(k) if k in keys else None


def _axis(grid: Mapping[str, Sequence], base: Mapping, axis: str) -> tuple[tuple, tuple[str, ...]]:
    """Values and labels of one table axis; a missing axis is one value, labelled by the base config's value."""
    if axis in grid:
        values = tuple(grid[axis])
        return values, tuple(fmt_value(v) for v in values)
    fixed = dotted_get(base, axis)
    return (None,), ("all runs" if fixed is None else f"{axis} = {fmt_value(fixed)}",)


def make_layout(manifest: Mapping, row_axis: str, col_axis: str, rep_axis: str) -> Layout:
    """The table layout of a sweep, from its manifest's grid (in grid order).

    Raises:
        ValueError: an axis names no run field (a typo would silently give a one-row table), or two are the same.
    """
    grid, base = manifest.get("grid", {}), manifest.get("base", {})
    for flag, axis in (("row axis (--rows)", row_axis), ("column axis (--cols)", col_axis),
                       ("replicate axis (--reps)", rep_axis)):
        if axis not in grid:
            try:
                field_type(RunConfig, axis)
            except ConfigError as e:
                raise ValueError(f"{flag} {axis!r}: {e}; this sweep's grid axes: {', '.join(grid) or 'none'}") from None
    if len({row_axis, col_axis, rep_axis}) < 3:
        raise ValueError(f"the row, column and replicate axes (--rows, --cols, --reps) must differ; got {row_axis}, "
                         f"{col_axis}, {rep_axis}")
    rows, row_labels = _axis(grid, base, row_axis)
    cols, col_labels = _axis(grid, base, col_axis)
    others = tuple(a for a in grid if a not in (row_axis, col_axis, rep_axis))
    groups = tuple(dict(zip(others, combo)) for combo in itertools.product(*(grid[a] for a in others)))
    return Layout(row_axis, col_axis, others, rows, cols, groups, row_labels, col_labels)


def cell_grid(layout: Layout, records: Sequence[RunRecord]) -> dict[tuple[int, int, int], Cell]:
    """Every ``(group, row, col)`` of the layout mapped to its :class:`Cell` (empty cells included)."""
    shape = (range(len(layout.groups)), range(len(layout.rows)), range(len(layout.cols)))
    runs: dict[tuple[int, int, int], list[RunRecord]] = {key: [] for key in itertools.product(*shape)}
    for rec in records:
        where = layout.place(rec)
        if where is not None:
            runs[where].append(rec)
    return {k: Cell(tuple(v)) for k, v in runs.items()}


def best_in_column(cells: Mapping, layout: Layout, g: int, c: int) -> int | None:
    """Row index of the clean cell with the lowest mean in column ``c`` of group ``g``."""
    means = {r: cells[g, r, c].mean for r in range(len(layout.rows)) if cells[g, r, c].clean}
    return min(means, key=lambda k: means[k]) if means else None


def best_in_row(cells: Mapping, layout: Layout, g: int, r: int) -> int | None:
    """Column index of the clean cell with the lowest mean in row ``r`` of group ``g``."""
    means = {c: cells[g, r, c].mean for c in range(len(layout.cols)) if cells[g, r, c].clean}
    return min(means, key=lambda k: means[k]) if means else None


def diagnostic_stats(runs: Sequence[RunRecord]) -> dict[str, float] | None:
    """Step-0 diagnostics of runs: each quantity's mean over layers, then over runs; the max |Δ output|."""
    diags = [r.diagnostics for r in runs if r.diagnostics and r.diagnostics.get("layers")]
    if not diags:
        return None
    out = {}
    for k in DIAG_KEYS:
        per_run = [statistics.fmean(float(layer[k]) for layer in d["layers"].values() if layer.get(k) is not None)
                   for d in diags if any(layer.get(k) is not None for layer in d["layers"].values())]
        out[k] = statistics.fmean(per_run) if per_run else float("nan")
    ident = [float(d["identity_max_abs"]) for d in diags if d.get("identity_max_abs") is not None]
    out["identity_max_abs"] = max(ident) if ident else float("nan")
    out["layers"], out["runs"] = float(len(diags[0]["layers"])), float(len(diags))
    return out


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean over runs at each step all runs share (so the mean never mixes a changing set of seeds)."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    common = set.intersection(*(set(s for s, _ in c) for c in curves))
    by_step = {s: [loss for c in curves for t, loss in c if t == s] for s in common}
    return sorted((s, statistics.fmean(v)) for s, v in by_step.items())
