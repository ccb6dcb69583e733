"""Group a sweep's runs into the report's tables: rows (the init) × columns (the LR), replicated over seeds.

Each table cell holds the runs of one (row, column) pair of one *group* (one combination of the grid's other axes,
e.g. ``lora.rank``). Diverged runs enter a cell's numbers by one of two named conventions (:data:`CONVENTIONS`):
``excluded`` (the lab's: a mean over the seeds that finished ok, diverged ones counted and marked, since a mean over
blown-up losses says little about the config's loss) or ``included`` (the published study's: every finished seed at
its final loss, blown-up ones too). Failed and unfinished runs are never in a number. Cells compared for "best" are
the eligible ones: under ``excluded`` the clean cells (some run ok, none diverged: a config that diverges on some seeds
is not one to recommend, even if its surviving seeds look good), under ``included`` those whose mean is finite.

With per-chunk eval losses in the store (``eval_chunks.npz``), :func:`chunk_losses` gives a cell's losses as a
``(seeds, chunks)`` matrix for :mod:`.stats`; :func:`eval_splits` says which splits select and which report. Used by
``write.py`` (tables) and, through plain lists, by ``plots.py``.

Runs pair by seed whatever they computed on; a store whose runs computed on more than one device or dtype says so
(:func:`mixed_compute`). The same SmolLM2 runs on a GPU in bfloat16 and on a CPU in float32, on the same tokens,
end within the eval chunks' noise of each other (docs/evaluation.md), far closer than the seeds do.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config.schema import RunConfig
from ..config.typecheck import ConfigError, field_type
from ..store import RunRecord
from .stats import Losses

DIAG_KEYS = ("grad_norm_a", "grad_norm_b", "var_a", "var_b")
CONVENTIONS = ("excluded", "included")


def dotted_get(d: Any, path: str) -> Any:
    """``d["a"]["b"]`` for ``path="a.b"``, ``None`` when any part is missing."""
    for part in path.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


def fmt_value(v: Any) -> str:
    """An axis value for humans: small floats as ``1e-4``/``2.5e-3``, a table axis's value as its fields (a string
    field bare, others ``key=value``: ``random-both, dist=xavier``), other values as ``str``."""
    if isinstance(v, Mapping):
        return ", ".join(
            (x if isinstance(x, str) and not nested else f"{k}={fmt_value(x)}")
            for key, val in v.items()
            for nested in [isinstance(val, Mapping)]
            for k, x in (val.items() if nested else [(key, val)])
        )
    if isinstance(v, float) and v != 0 and abs(v) < 0.1:
        mant, exp = f"{v:.3e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def ended_worse(rec: RunRecord) -> bool:
    """Whether a finished run's final eval loss is above the pretrained model's on the same chunks (a blow-up's
    non-finite loss is). Per-chunk losses when the store has them, else the result's step-0 loss."""
    chunks = rec.eval_chunks
    if chunks is not None:
        split = chunks.splits["test" if "test" in chunks.splits else next(iter(chunks.splits))]
        final = float(np.mean(split.final, dtype=np.float64))
        return not math.isfinite(final) or final > float(np.mean(split.pretrained, dtype=np.float64))
    res = rec.result
    if res is None or res.initial_eval_loss is None:
        return False
    return res.final_eval_loss is None or res.final_eval_loss > res.initial_eval_loss


def compute_of(rec: RunRecord) -> str:
    """Where and in what precision a run computed, e.g. ``cuda bfloat16`` or ``cpu float32`` ("" when its result
    does not say: unfinished, or written before loralab recorded it)."""
    res = rec.result
    if res is None:
        return ""
    return " ".join(x for x in (res.device.split(":")[0], res.dtype) if x)


def mixed_compute(records: Sequence[RunRecord]) -> str | None:
    """A sentence when the finished runs computed on more than one device or dtype, else ``None``."""
    counts = Counter(compute_of(r) or "unknown" for r in records if r.status in ("ok", "diverged"))
    if len(counts) < 2:
        return None
    parts = ", ".join(f"{n} on {where}" for where, n in counts.most_common())
    return (
        f"The finished runs computed on more than one device or dtype ({parts}). They pair by seed all the same: "
        "the precision adds its own small noise to a difference (measure it on your model by running some runs on "
        "both, then scripts/same_runs.py; docs/evaluation.md)."
    )


@dataclass(frozen=True)
class Cell:
    """The runs of one table cell; its numbers under either divergence convention (module docstring)."""

    runs: tuple[RunRecord, ...] = ()

    def _with(self, status: str) -> list[RunRecord]:
        return [r for r in self.runs if r.status == status]

    def finished(self, convention: str = "excluded") -> list[RunRecord]:
        """The runs a number of this cell is over: ok ones, and under ``included`` diverged ones too."""
        keep = ("ok",) if convention == "excluded" else ("ok", "diverged")
        return [r for r in self.runs if r.status in keep]

    def values(self, convention: str = "excluded") -> tuple[float, ...]:
        """Final eval losses of :meth:`finished` runs (a diverged run's non-finite loss as NaN under ``included``)."""
        if convention == "excluded":
            return tuple(r.final_eval_loss for r in self._with("ok") if r.final_eval_loss is not None)
        return tuple(math.nan if r.final_eval_loss is None else r.final_eval_loss for r in self.finished(convention))

    @property
    def ok(self) -> tuple[float, ...]:
        return self.values("excluded")

    @property
    def diverged(self) -> int:
        return len(self._with("diverged"))

    @property
    def failed(self) -> int:
        return len(self._with("failed"))

    @property
    def waiting(self) -> int:
        return sum(r.status in ("pending", "unfinished") for r in self.runs)

    def worse(self, convention: str = "excluded") -> int:
        """How many of the cell's runs ended worse than the pretrained model (▲)."""
        return sum(ended_worse(r) for r in self.finished(convention))

    def mean(self, convention: str = "excluded") -> float | None:
        v = self.values(convention)
        return statistics.fmean(v) if v else None

    def std(self, convention: str = "excluded") -> float | None:
        """Sample standard deviation over seeds (n − 1), ``None`` with fewer than two or a non-finite loss."""
        v = self.values(convention)
        return statistics.stdev(v) if len(v) >= 2 and all(map(math.isfinite, v)) else None

    @property
    def clean(self) -> bool:
        return bool(self.ok) and not self.diverged

    def eligible(self, convention: str = "excluded") -> bool:
        """Whether the cell may be called best or chosen as a tuned value (module docstring)."""
        if convention == "excluded":
            return self.clean
        m = self.mean(convention)
        return m is not None and math.isfinite(m)

    def marks(self, convention: str = "excluded") -> str:
        """n=k: seeds in the number; †k: k seeds diverged (excluded, or included by the convention); ‡k: k failed
        (excluded); ▲k: k runs ended worse than the pretrained model; (k not run): pending or unfinished."""
        n = len(self.values(convention))
        out = f" n={n}" if n else ""
        out += f" †{self.diverged}" if self.diverged and n else ""
        out += f" ‡{self.failed}" if self.failed and (n or self.diverged) else ""
        out += f" ▲{self.worse(convention)}" if n and self.worse(convention) else ""
        return out + (f" ({self.waiting} not run)" if self.waiting and len(self.runs) > self.waiting else "")

    def text(self, convention: str = "excluded") -> str:
        """E.g. ``2.2591 ± 0.0031 n=2``, ``2.3100 n=1 †1``, ``diverged (4/4)``, ``failed (1/1)``, ``pending``."""
        n, mean, std = len(self.runs), self.mean(convention), self.std(convention)
        if mean is not None:
            core = f"{mean:.4f}" if math.isfinite(mean) else "not finite"
            core += f" ± {std:.4f}" if std is not None else ""
        elif self.diverged:
            core = f"diverged ({self.diverged}/{n})"
        elif self.failed:
            core = f"failed ({self.failed}/{n})"
        else:
            return "pending" if n else "—"
        return core + self.marks(convention)

    def relative_text(self, ref: Cell, convention: str = "excluded") -> str:
        """This cell's mean relative to ``ref``'s in %, e.g. ``+1.23% n=2``; non-numeric cells keep their text."""
        mean, ref_mean = self.mean(convention), ref.mean(convention)
        if mean is None or ref_mean is None:
            return self.text(convention) if mean is None else "n/a (no reference)"
        if not (math.isfinite(mean) and math.isfinite(ref_mean)):
            return "not finite" + self.marks(convention)
        return f"{100.0 * (mean / ref_mean - 1.0):+.2f}%" + self.marks(convention)


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
        g = next(
            (
                i
                for i, combo in enumerate(self.groups)
                if all(a in rec.axes and _key(rec.axes[a]) == _key(v) for a, v in combo.items())
            ),
            None,
        )
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
    for flag, axis in (
        ("row axis (--rows)", row_axis),
        ("column axis (--cols)", col_axis),
        ("replicate axis (--reps)", rep_axis),
    ):
        if axis not in grid:
            try:
                field_type(RunConfig, axis)
            except ConfigError as e:
                raise ValueError(f"{flag} {axis!r}: {e}; this sweep's grid axes: {', '.join(grid) or 'none'}") from None
    if len({row_axis, col_axis, rep_axis}) < 3:
        raise ValueError(
            f"the row, column and replicate axes (--rows, --cols, --reps) must differ; got {row_axis}, "
            f"{col_axis}, {rep_axis}"
        )
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


def best_in_column(cells: Mapping, layout: Layout, g: int, c: int, convention: str = "excluded") -> int | None:
    """Row index of the eligible cell with the lowest mean in column ``c`` of group ``g``."""
    means = {r: cells[g, r, c].mean(convention) for r in range(len(layout.rows)) if cells[g, r, c].eligible(convention)}
    return min(means, key=lambda k: means[k]) if means else None


def best_in_row(cells: Mapping, layout: Layout, g: int, r: int, convention: str = "excluded") -> int | None:
    """Column index of the eligible cell with the lowest mean in row ``r`` of group ``g``."""
    means = {c: cells[g, r, c].mean(convention) for c in range(len(layout.cols)) if cells[g, r, c].eligible(convention)}
    return min(means, key=lambda k: means[k]) if means else None


def eval_splits(records: Sequence[RunRecord]) -> tuple[str, str] | str:
    """``(selection split, reported split)`` when every finished run has per-chunk losses on the same chunks:
    ``("val", "test")``, or ``("eval", "eval")`` for the old single eval set. Otherwise why not, as a sentence."""
    done = [r for r in records if r.status in ("ok", "diverged")]
    lacking = [r for r in done if r.eval_chunks is None]
    if not done or lacking:
        return (
            (
                f"{len(lacking)} of the {len(done)} finished runs have no per-chunk eval losses (eval_chunks.npz; "
                "stores written before loralab recorded them have none)"
            )
            if done
            else "no finished runs"
        )
    first = done[0].eval_chunks
    assert first is not None
    for r in done:
        chunks = r.eval_chunks
        assert chunks is not None
        same = (
            chunks.pool_digest == first.pool_digest
            and list(chunks.splits) == list(first.splits)
            and all(np.array_equal(chunks.splits[k].ids, first.splits[k].ids) for k in first.splits)
        )
        if not same:
            return (
                f"runs `{done[0].run_id}` and `{r.run_id}` were evaluated on different chunks (held-out pools "
                f"{first.pool_digest} and {chunks.pool_digest}), so their losses do not pair"
            )
    return ("val", "test") if {"val", "test"} <= set(first.splits) else ("eval", "eval")


def chunk_losses(cell: Cell, convention: str, split: str, rep_axis: str) -> Losses | None:
    """The cell's per-chunk final losses on ``split`` as ``(seeds, chunks)``, rows labelled by the replicate axis's
    value; ``None`` when no run counts under ``convention`` or one lacks per-chunk losses."""
    runs = cell.finished(convention)
    if not runs or any(r.eval_chunks is None or split not in r.eval_chunks.splits for r in runs):
        return None
    seeds = tuple(r.axes.get(rep_axis, i) for i, r in enumerate(runs))
    values = np.stack([r.eval_chunks.splits[split].final for r in runs if r.eval_chunks is not None])
    return Losses(seeds, values.astype(np.float64))


def diagnostic_stats(runs: Sequence[RunRecord]) -> dict[str, float] | None:
    """Step-0 diagnostics of runs: each quantity's mean over layers, then over runs; the max |Δ output|."""
    diags = [r.diagnostics for r in runs if r.diagnostics and r.diagnostics.get("layers")]
    if not diags:
        return None
    out = {}
    for k in DIAG_KEYS:
        per_run = [
            statistics.fmean(float(layer[k]) for layer in d["layers"].values() if layer.get(k) is not None)
            for d in diags
            if any(layer.get(k) is not None for layer in d["layers"].values())
        ]
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
