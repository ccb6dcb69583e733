"""Where do two inits' eval curves cross? The paired gap at every periodic eval, with its interval.

For each learning rate of a sweep whose runs stored per-chunk curves (``data.curve_chunks``, eval_chunks.npz): the
mean over seeds and curve chunks of (init's loss − the reference init's, same seed, same chunk) at each eval step,
its 95% bootstrap interval (the lab's ``paired_difference``), and the first step from which the interval stays on one
side of zero to the end ("ahead from"). Prints markdown; ``--plot`` also draws the gaps with their intervals.

    python scripts/curve_gap.py runs/long-pilot --ref standard --plot docs/results/long-pilot/gap.png
"""

from __future__ import annotations

import argparse
import sys

from loralab.lab.report.stats import Estimate
from loralab.lab.store import SweepStore
from loralab.lab.studies.cold_start import Arms, gap_curve, read_arms


def ahead_from(gaps: list[tuple[int, Estimate]]) -> tuple[str, int] | None:
    """``(who, step)``: the first eval step from which every later interval excludes 0 on the same side."""
    found = None
    for step, est in reversed(gaps):
        side = "ref" if est.lo > 0 else "arm" if est.hi < 0 else None
        if side is None or (found is not None and found[0] != side):
            break
        found = (side, step)
    return found


def tables(arms: Arms, ref: str) -> tuple[str, dict]:
    lines, series = [], {}
    for arm in arms.arms():
        if arm == ref:
            continue
        for lr in arms.lrs():
            gaps = gap_curve(arms, arm, ref, lr)
            if not gaps:
                continue
            series[(arm, lr)] = gaps
            seeds = {e.seeds for _, e in gaps}
            lead = ahead_from(gaps)
            who = "—" if lead is None else f"`{ref if lead[0] == 'ref' else arm}` from step {lead[1]}"
            lines += [
                f"### `{arm}` − `{ref}`, lr {lr:g} ({'/'.join(map(str, sorted(seeds)))} seeds, "
                f"{gaps[0][1].chunks} curve chunks): ahead to the end: {who}",
                "",
                "| step | gap [95% CI] |",
                "|---|---|",
            ]
            lines += [
                f"| {s} | {e.mean:+.4f} [{e.lo:+.4f}, {e.hi:+.4f}]{' ✱' if e.excludes_zero else ''} |" for s, e in gaps
            ]
            lines.append("")
    return "\n".join(lines), series


def plot(series: dict, ref: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (arm, lr), gaps in series.items():
        steps = [s for s, _ in gaps]
        line = ax.plot(steps, [e.mean for _, e in gaps], marker=".", label=f"{arm} − {ref}, lr {lr:g}")[0]
        ax.fill_between(steps, [e.lo for _, e in gaps], [e.hi for _, e in gaps], color=line.get_color(), alpha=0.2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss gap (nats, paired)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--ref", default="standard", help="the reference init (default: standard)")
    ap.add_argument("--plot", default=None, metavar="PNG")
    args = ap.parse_args()
    arms = read_arms(SweepStore(args.run_dir).records())
    if args.ref not in arms.arms():
        sys.exit(f"{args.run_dir}: no run of init {args.ref!r} with per-chunk curves; inits: {', '.join(arms.arms())}")
    text, series = tables(arms, args.ref)
    print(text)
    if arms.skipped:
        print(f"left out: {', '.join(arms.skipped)}")
    if arms.mixed:
        print(arms.mixed)
    if args.plot:
        plot(series, args.ref, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
