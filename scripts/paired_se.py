"""The standard error of a paired difference between two inits, as a function of the number of eval chunks.

Reads a sweep store whose runs have per-chunk eval losses (``eval_chunks.npz``), and for every run with the same
other axes as a run of the baseline init (same learning rate, same seed) prints the spread of the per-chunk
differences ``loss(init) − loss(baseline)`` on the same chunks, and the standard error of their mean for chunk counts
from 16 up, paired (``sd(diff) / √n``) and, for comparison, unpaired (``√((var_a + var_b) / n)``: two independent
means). It also prints what the final evals cost per chunk (wall clock, from metrics.jsonl). docs/evaluation.md
records its output for the SmolLM2 presets; rerun it on any store:

    python scripts/paired_se.py RUN_DIR [--baseline standard] [--split all|val|test]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loralab.lab.store import RunRecord, SweepStore  # noqa: E402

COUNTS = (16, 32, 64, 128, 256, 512, 1024)


def final_losses(rec: RunRecord, split: str) -> np.ndarray:
    assert rec.eval_chunks is not None
    splits = rec.eval_chunks.splits
    names = list(splits) if split == "all" else [split]
    return np.concatenate([splits[n].final for n in names]).astype(np.float64)


def eval_seconds_per_chunk(rec: RunRecord) -> float | None:
    """Wall clock of the final eval (after the last train step) over the number of chunks it covered."""
    if rec.eval_chunks is None or rec.result is None:
        return None
    steps = rec.result.steps
    train = [m for m in rec.metrics if m.get("kind") == "train" and m.get("step") == steps]
    evals = [m for m in rec.metrics if m.get("kind") == "eval" and m.get("step") == steps]
    if not train or not evals:
        return None
    n = sum(len(s.ids) for s in rec.eval_chunks.splits.values())
    return (evals[-1]["elapsed_s"] - train[-1]["elapsed_s"]) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--baseline", default="standard", help="the init the others are paired with")
    p.add_argument("--row-axis", default="lora.init")
    p.add_argument(
        "--split",
        default="all",
        choices=["all", "val", "test", "eval"],
        help="which chunks (all: val and test together)",
    )
    args = p.parse_args(argv)
    records = [r for r in SweepStore(args.run_dir).records() if r.status in ("ok", "diverged")]
    missing = [r.run_id for r in records if r.eval_chunks is None]
    if missing:
        print(f"error: {len(missing)} runs have no per-chunk losses (e.g. {missing[0]})", file=sys.stderr)
        return 2

    def others(r: RunRecord) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in r.axes.items() if k != args.row_axis))

    base = {others(r): r for r in records if r.axes.get(args.row_axis) == args.baseline}
    header = ["init", "other axes", "chunks", "status", "mean diff", "sd(diff)", "sd(loss)"]
    header += [f"paired SE @{n}" for n in COUNTS] + [f"unpaired SE @{n}" for n in (128, 512)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in records:
        b = base.get(others(r))
        if b is None or r is b:
            continue
        a_loss, b_loss = final_losses(r, args.split), final_losses(b, args.split)
        diff = a_loss - b_loss
        sd = float(diff.std(ddof=1))
        spread = math.sqrt((a_loss.var(ddof=1) + b_loss.var(ddof=1)) / 2)
        row = [
            f"`{r.axes.get(args.row_axis)}`",
            ", ".join(f"{k}={v}" for k, v in others(r)),
            str(len(diff)),
            r.status,
            f"{diff.mean():+.4f}",
            f"{sd:.4f}",
            f"{spread:.4f}",
        ]
        row += [f"{sd / math.sqrt(n):.4f}" for n in COUNTS]
        row += [f"{math.sqrt(2) * spread / math.sqrt(n):.4f}" for n in (128, 512)]
        print("| " + " | ".join(row) + " |")
    costs = [c for r in records if (c := eval_seconds_per_chunk(r)) is not None]
    if costs:
        print(
            f"\nfinal eval: {statistics.median(costs):.3f} s per chunk (median of {len(costs)} runs; "
            f"min {min(costs):.3f}, max {max(costs):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
