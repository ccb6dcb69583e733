"""The same runs computed twice (e.g. on a GPU in bf16, then on a CPU in float32): how far apart are their losses?

For every run id finished in both stores: B − A per chunk of the reported split (``test``, else ``eval``) at each
stage the store keeps (the pretrained model, the run at step 0, its final weights), with its mean and 95% bootstrap
interval over the chunks, and where each computed. Then each stage over all runs both have (pigeonhole over runs and
chunks, the lab's ``interval``). Runs unfinished in either store are named, those in one store only counted; neither
is compared. Prints markdown.

    python scripts/same_runs.py docs/results/long-study/store runs/long-study-cpu
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np

from loralab.lab.report.cells import compute_of, eval_splits
from loralab.lab.report.stats import Estimate, interval, seed_for
from loralab.lab.store import FINISHED, STAGES, RunRecord, SweepStore


@dataclass
class Comparison:
    split: str
    runs: list[tuple[str, str, str]] = field(default_factory=list)  # (run id, where A computed, where B did)
    diffs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # stage -> per run, B − A per chunk
    left_out: list[str] = field(default_factory=list)  # in both, not finished in both
    only: tuple[list[str], list[str]] = ([], [])  # run ids in A only, in B only

    def per_run(self, stage: str) -> list[Estimate]:
        return [
            interval(d[None, :], seed=seed_for("same-runs", rid, stage))
            for (rid, _, _), d in zip(self.runs, self.diffs[stage])
        ]

    def overall(self, stage: str) -> Estimate:
        return interval(np.stack(self.diffs[stage]), seed=seed_for("same-runs", stage))


def _records(store: SweepStore) -> dict[str, RunRecord]:
    return {r.run_id: r for r in store.records()}


def compare(a: SweepStore, b: SweepStore) -> Comparison:
    """B − A for the runs finished in both.

    Raises:
        ValueError: no run is finished in both, or some were evaluated on other chunks (the report's
            :func:`eval_splits` says which): their losses do not pair.
    """
    ra, rb = _records(a), _records(b)
    both = [rid for rid in ra if rid in rb]
    only = ([rid for rid in ra if rid not in rb], [rid for rid in rb if rid not in ra])
    left_out: list[str] = []
    pairs = []
    for rid in both:
        x, y = ra[rid], rb[rid]
        if x.status not in FINISHED or y.status not in FINISHED:
            left_out.append(f"{rid} ({x.status} in A, {y.status} in B)")
            continue
        if x.eval_chunks is None or y.eval_chunks is None:
            left_out.append(f"{rid} (no per-chunk losses)")
            continue
        pairs.append((rid, x, y))
    if not pairs:
        raise ValueError(f"no run is finished, with per-chunk losses, in both {a.root} and {b.root}")
    splits = eval_splits([r for _, x, y in pairs for r in (x, y)])  # the report's own check that losses pair
    if isinstance(splits, str):
        raise ValueError(f"{a.root} against {b.root}: {splits}")
    split = splits[1]
    out = Comparison(split, left_out=left_out, only=only)
    for rid, x, y in pairs:
        cx, cy = x.eval_chunks, y.eval_chunks
        assert cx is not None and cy is not None
        out.runs.append((rid, compute_of(x) or "unknown", compute_of(y) or "unknown"))
        for stage in STAGES:
            d = getattr(cy.splits[split], stage).astype(np.float64) - getattr(cx.splits[split], stage)
            out.diffs.setdefault(stage, []).append(d)
    return out


def _e(e: Estimate) -> str:
    if not e.finite:
        return "not finite"
    return f"{e.mean:+.4f} [{e.lo:+.4f}, {e.hi:+.4f}]{' ✱' if e.excludes_zero else ''}"


def markdown(c: Comparison, a: str, b: str) -> str:
    lines = [
        f"B − A on the {c.split} chunks (nats; 95% interval over chunks, ✱: excludes 0). A: `{a}`, B: `{b}`.",
        "",
        "| run | A computed on | B computed on | " + " | ".join(STAGES) + " |",
        "|---|---|---|" + "---|" * len(STAGES),
    ]
    per_run = {s: c.per_run(s) for s in STAGES}
    for i, (rid, wa, wb) in enumerate(c.runs):
        lines.append(f"| `{rid}` | {wa} | {wb} | " + " | ".join(_e(per_run[s][i]) for s in STAGES) + " |")
    lines.append(f"| all {len(c.runs)} runs | | | " + " | ".join(_e(c.overall(s)) for s in STAGES) + " |")
    if c.left_out:
        lines += ["", "Not compared: " + ", ".join(c.left_out) + "."]
    lines += ["", f"Run ids in one store only: {len(c.only[0])} in A, {len(c.only[1])} in B."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store_a", help="a sweep's out_dir (A)")
    ap.add_argument("store_b", help="a sweep's out_dir holding some of the same run ids (B)")
    args = ap.parse_args()
    try:
        comparison = compare(SweepStore(args.store_a), SweepStore(args.store_b))
    except ValueError as e:
        sys.exit(f"same_runs: {e}")
    print(markdown(comparison, args.store_a, args.store_b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
