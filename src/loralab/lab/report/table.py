"""A store's runs laid out for comparison, with the statistics every reader of a sweep shares.

:func:`open_table` reads a sweep's store once (the runs of its own config only) and returns a :class:`Table`: the
cells (rows × columns per group, :mod:`.cells`), the baseline row, the eval splits, and the three numbers a
comparison of inits rests on: a cell's loss with its interval (:meth:`Table.estimate`), a paired difference between
two cells (:meth:`Table.paired`) and each row's own best column chosen on validation (:meth:`Table.tuned`). The
report (``write.py``) and scripts that read a study (``scripts/compare_study.py``) both go through it, so a number
is the same wherever it is printed: the bootstrap is seeded by the cells' labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..store import RunRecord, SweepStore, config_diff
from .cells import CONVENTIONS, Cell, Layout, cell_grid, chunk_losses, eval_splits, make_layout
from .stats import Estimate, choose, interval, paired_difference, seed_for

BASELINE = "standard"


@dataclass(frozen=True)
class Table:
    """What every table of one report needs."""

    lay: Layout
    cells: dict[tuple[int, int, int], Cell]
    rep_axis: str
    conventions: tuple[str, ...]  # both, or only "excluded" when no run diverged (they then agree)
    baseline: str
    base: int | None  # the baseline's row, None when it is not a row
    splits: tuple[str, str] | None  # (selection split, reported split) with per-chunk losses, else None
    why_not: str  # why there are no per-chunk statistics ("" when there are)

    def estimate(self, g: int, r: int, c: int, convention: str, split: str) -> Estimate | None:
        losses = chunk_losses(self.cells[g, r, c], convention, split, self.rep_axis)
        if losses is None:
            return None
        # seeded by the cell, not the convention: the same runs give the same interval under either
        return interval(
            losses.values, seed=seed_for(self.lay.groups[g], self.lay.row_labels[r], self.lay.col_labels[c], split)
        )

    def paired(self, g: int, r: int, c: int, rb: int, cb: int, convention: str) -> Estimate | None:
        """``(r, c) − (rb, cb)`` of group ``g`` on the reported split, same seeds and chunks."""
        assert self.splits is not None
        split = self.splits[1]
        a, b = (chunk_losses(self.cells[g, i, j], convention, split, self.rep_axis) for i, j in ((r, c), (rb, cb)))
        if a is None or b is None:
            return None
        return paired_difference(
            a,
            b,
            seed=seed_for(
                self.lay.groups[g],
                self.lay.row_labels[r],
                self.lay.col_labels[c],
                self.lay.row_labels[rb],
                self.lay.col_labels[cb],
            ),
        )

    def tuned(self, g: int, convention: str) -> tuple[dict[tuple[int, int], float], dict[int, int]]:
        """Each row's own best column, chosen on the selection split only: ``(validation mean per eligible
        (row, column), row -> chosen column)``; a row with no eligible cell is not in the second."""
        assert self.splits is not None
        val: dict[tuple[int, int], float] = {}
        for r in range(len(self.lay.rows)):
            for c in range(len(self.lay.cols)):
                losses = chunk_losses(self.cells[g, r, c], convention, self.splits[0], self.rep_axis)
                if losses is not None and self.cells[g, r, c].eligible(convention):
                    val[r, c] = float(losses.values.mean())
        chosen = {
            r: c
            for r in range(len(self.lay.rows))
            if (c := choose({c: v for (i, c), v in val.items() if i == r})) is not None
        }
        return val, chosen


def other_configs(manifest: dict, records: Sequence[RunRecord]) -> tuple[list[RunRecord], dict[str, str]]:
    """The runs made with this sweep's config, and ``run id -> the fields that differ`` for the others.

    A run's config.json that differs from ``sweep.json``'s base outside the grid axes belongs to another experiment
    (e.g. runs of two configs that shared an out_dir whose sweep.json was lost): averaging it in would mix them.
    """
    base, axes = manifest.get("base", {}), list(manifest.get("grid", {}))
    configs = {r.run_id: (r.config or {}).get("config") for r in records}
    diffs = {k: d for k, c in configs.items() if isinstance(c, dict) and (d := config_diff(c, base, axes))}
    return [r for r in records if r.run_id not in diffs], diffs


def grid_slice(
    manifest: dict, records: Sequence[RunRecord], only: Mapping[str, Sequence]
) -> tuple[dict, list[RunRecord]]:
    """The manifest and the runs restricted to ``{axis: values kept}``, in grid order."""
    grid = dict(manifest.get("grid", {}))
    for axis, keep in only.items():
        if axis not in grid:
            raise ValueError(
                f"{axis} is not an axis of this sweep's grid ({', '.join(grid) or 'none'}): keep values of one of those"
            )
        if missing := [v for v in keep if v not in grid[axis]]:
            raise ValueError(
                f"{axis} = {', '.join(map(str, missing))} is not in this sweep's grid "
                f"({', '.join(map(str, grid[axis]))})"
            )
        grid[axis] = [v for v in grid[axis] if v in keep]
    kept = [r for r in records if all(r.axes.get(a) in grid[a] for a in only)]
    return {**manifest, "grid": grid}, kept


@dataclass(frozen=True)
class Opened:
    """A store read for comparison: its manifest, the runs of its config, the others (by id), and the table."""

    manifest: dict
    records: list[RunRecord]
    others: list[tuple[RunRecord, str]]
    table: Table


def open_table(
    out_dir: str | Path,
    *,
    row_axis: str = "lora.init",
    col_axis: str = "train.lr",
    rep_axis: str = "train.seed",
    baseline: str | None = None,
    only: Mapping[str, Sequence] | None = None,
) -> Opened:
    """Read a sweep's store into a :class:`Table` (arguments as :func:`.write.write_report`'s); ``only`` keeps a
    slice of the grid, ``{axis: values}`` (e.g. the seeds a finished comparison rests on while more are running).

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``sweep.json``.
        CorruptFileError: ``sweep.json`` cannot be read (naming it).
        ValueError: ``baseline`` is not one of the rows (naming them), or ``only`` names an axis or a value the grid
            does not have.
    """
    out_dir = Path(out_dir).expanduser()
    store = SweepStore(out_dir)
    manifest = store.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{out_dir / 'sweep.json'} not found: {out_dir} is not a sweep directory")
    every = store.records()
    if only:
        manifest, every = grid_slice(manifest, every, only)
    records, diffs = other_configs(manifest, every)
    lay = make_layout(manifest, row_axis, col_axis, rep_axis)
    if baseline is not None and baseline not in lay.row_labels:
        raise ValueError(
            f"--baseline {baseline!r} is not a row of this report; the rows ({row_axis}) are "
            f"{', '.join(lay.row_labels)}"
        )
    name_of_base = baseline or BASELINE
    splits = eval_splits(records)
    table = Table(
        lay,
        cell_grid(lay, records),
        rep_axis,
        CONVENTIONS if any(r.status == "diverged" for r in records) else CONVENTIONS[:1],
        name_of_base,
        lay.row_labels.index(name_of_base) if name_of_base in lay.row_labels else None,
        splits if isinstance(splits, tuple) else None,
        splits if isinstance(splits, str) else "",
    )
    return Opened(manifest, records, [(r, diffs[r.run_id]) for r in every if r.run_id in diffs], table)
