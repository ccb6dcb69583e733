"""Compare a loralab init study's store with the published "A×0 ≠ 0×B" table (REFERENCE.md), point by point.

    python scripts/compare_study.py runs/study-smollm2 > docs/results/study-smollm2/comparison.md
    python scripts/compare_study.py runs/long-study --min-seeds 2 > docs/results/long-study/comparison.md

Reads only the store, through the report's own table (``loralab.lab.report.table``), so every interval here is the
one ``loralab report`` prints. On the learning rates both grids share it gives:

1. each init's mean final loss relative to ``standard``, ours / published, in %;
2. each init − ``standard`` at each learning rate, paired (same seed, same chunks) with its 95% interval, against the
   published difference of means, with a verdict: *holds* (our interval excludes zero on the published side),
   *opposite* (it excludes zero on the other side) or *cannot decide* (it contains zero); with fewer seeds than
   ``--min-seeds`` a direction is marked as not a finding, since its interval then covers chunk noise only;
3. each init's best learning rate (ours chosen on validation, reported on test), set against its runner-up and the
   published best (paired on test, the same init), and the first learning rate at which it diverges;
4. the tuned comparison: each init at its own best learning rate against ``standard`` at its own.

The published table gives means over 4 seeds without intervals, so its direction is the sign of a difference of
means. A published cell counts as diverged when its loss is above 4 nats/token (its diverged cells read 7.0–9.3, its
others 2.2–2.4); one of ours when any seed's status is ``diverged``. Paired differences follow the published study's
convention for diverged runs (included at their final loss) unless ``--convention excluded``. A store still
running is compared on what has finished, and the pending runs are counted.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loralab.lab.report.cells import Cell  # noqa: E402
from loralab.lab.report.stats import Estimate, choose  # noqa: E402
from loralab.lab.report.table import Table, open_table  # noqa: E402
from loralab.lab.report.write import delta_text  # noqa: E402

INITS = ["standard", "reversed", "orthogonal-eye", "orthogonal-qr-const", "orthogonal-qr-match"]
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2]
PUBLISHED = {  # mean eval loss, Qwen2.5-1.5B-Instruct on no_robots, 4 seeds (REFERENCE.md)
    1e-4: [2.2576, 2.2513, 2.2801, 2.2802, 2.2874],
    2e-4: [2.2391, 2.2440, 2.2633, 2.2667, 2.2809],
    5e-4: [2.2228, 2.2461, 2.2558, 2.2611, 2.2827],
    1e-3: [2.2178, 2.2607, 2.2592, 2.2700, 2.3014],
    2e-3: [2.2173, 2.2898, 2.2721, 2.2925, 7.0413],
    5e-3: [2.2348, 7.2726, 2.3011, 2.3891, 7.8028],
    1e-2: [9.3169, 7.7805, 7.4645, 7.1409, 7.8530],
}
PUBLISHED_DIVERGED = 4.0


def pub(init: str, lr: float) -> float:
    return PUBLISHED[lr][INITS.index(init)]


def pub_diverged(init: str, lr: float) -> bool:
    return pub(init, lr) > PUBLISHED_DIVERGED


def short(init: str) -> str:
    return init.replace("orthogonal-", "")


def nats(x: float) -> str:
    return f"{round(x, 4) + 0.0:+.4f}"  # + 0.0: no "-0.0000"


def ci(est: Estimate | None) -> str:
    """The report's own text for a paired difference (so the two can be matched), or why there is none."""
    return "no seed in common" if est is None else delta_text(est)


def verdict(published: float, est: Estimate | None, min_seeds: int, unrepeated: str = "") -> tuple[str, str]:
    """Whether our paired difference supports the published direction (the sign of ``published``): ``(kind, text)``,
    the kind without the text's qualifiers (for the tally). ``unrepeated``: an init the published table has diverged
    here and ours did not, so a matching sign holds in direction only."""
    if est is None:
        return "no paired runs yet", "no paired runs yet"
    if not est.finite:
        return "cannot decide", "cannot decide (a loss is not finite)"
    if not est.excludes_zero:
        return "cannot decide", "cannot decide"
    holds = (est.mean > 0) == (published > 0)
    kind = ("holds" if holds else "opposite") + ("?" if est.seeds < min_seeds else "")
    if holds and unrepeated:
        kind += " in direction only"
    text = kind + (f" ({est.seeds} seed{'s' * (est.seeds != 1)}: not a finding)" if est.seeds < min_seeds else "")
    return kind, text + (f"; `{short(unrepeated)}` did not diverge here" if holds and unrepeated else "")


class Study:
    """The store's table restricted to the published inits and the learning rates both grids share."""

    def __init__(self, out_dir: str, convention: str, min_seeds: int, seeds: list[int] | None = None) -> None:
        opened = open_table(out_dir, only={"train.seed": seeds} if seeds else None)
        self.seeds = seeds
        self.t: Table = opened.table
        self.records, self.convention, self.min_seeds = opened.records, convention, min_seeds
        lay = self.t.lay
        if len(lay.groups) != 1:
            raise ValueError(
                f"{out_dir} varies {', '.join(lay.others)} besides the init and the learning rate; the published "
                "table has one value of each other setting: compare one value at a time (a store per value)"
            )
        if self.t.splits is None:
            raise ValueError(
                f"{out_dir} has no per-chunk eval losses ({self.t.why_not}); rerun the sweep with "
                "data.val_chunks and data.test_chunks set (docs/evaluation.md)"
            )
        self.rows = {label: r for r, label in enumerate(lay.row_labels) if label in INITS}
        if not all(isinstance(v, (int, float)) for v in lay.cols):
            raise ValueError(
                f"{out_dir}'s learning rates ({', '.join(lay.col_labels)}) are not all numbers: is train.lr an axis "
                "of its grid? The published table varies it; sweep it as a list of numbers"
            )
        self.cols = {float(v): c for c, v in enumerate(lay.cols) if float(v) in LRS}
        if "standard" not in self.rows or not self.cols:
            raise ValueError(
                f"{out_dir} must have `standard` among its inits ({', '.join(lay.row_labels)}) and a learning rate "
                f"of the published grid ({', '.join(f'{lr:g}' for lr in LRS)}) among its own "
                f"({', '.join(lay.col_labels)})"
            )
        self.inits = [i for i in INITS if i in self.rows]
        self.lrs = sorted(self.cols)
        self.edges = (min(map(float, lay.cols)), max(map(float, lay.cols)))  # the store's own grid
        self.sel, self.rep = self.t.splits

    def cell(self, init: str, lr: float) -> Cell:
        return self.t.cells[0, self.rows[init], self.cols[lr]]

    def paired(self, init: str, lr: float, std_lr: float | None = None) -> Estimate | None:
        assert self.t.base is not None
        std_c = self.cols[lr if std_lr is None else std_lr]
        return self.t.paired(0, self.rows[init], self.cols[lr], self.t.base, std_c, self.convention)

    def header(self, out_dir: str) -> list[str]:
        status = Counter(r.status for r in self.records)
        waiting = status["pending"] + status["unfinished"]
        seeds = sorted({len(c.finished(self.convention)) for c in self.t.cells.values()})
        missing = [f"{lr:g}" for lr in LRS if lr not in self.cols]
        return [
            f"Store `{out_dir}`: {len(self.records)} runs, "
            + ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
            + (f" ({waiting} not finished: every number below is over the runs that are)" if waiting else "")
            + f". Finished seeds per cell: {', '.join(map(str, seeds))}."
            + (f" Compared on seeds {', '.join(map(str, self.seeds))} only (--seeds)." if self.seeds else ""),
            "",
            "Learning rates compared: "
            + ", ".join(f"{lr:g}" for lr in self.lrs)
            + (f" (the published grid's {', '.join(missing)} is not in this store)" if missing else "")
            + ".",
            "",
        ]

    def relative(self) -> list[str]:
        """Mean final loss relative to ``standard``, ours / published (diverged seeds left out of our means)."""
        lines = [
            "Mean final eval loss relative to `standard` at the same lr, ours / published (†: a seed of ours "
            "diverged; that cell's mean is over the seeds that did not).",
            "",
            "| lr | " + " | ".join(f"{short(i)} ours / pub." for i in self.inits[1:]) + " | best ours | best pub. |",
            "|---|" + "---|" * (len(self.inits) + 1),
        ]
        for lr in self.lrs:
            ref = self.cell("standard", lr).mean()
            row = []
            for init in self.inits[1:]:
                c = self.cell(init, lr)
                m = c.mean()
                if not c.runs or c.waiting == len(c.runs):
                    mine = "pending"
                else:
                    mine = "—" if m is None or ref is None else f"{100 * (m / ref - 1):+.1f}%"
                theirs = f"{100 * (pub(init, lr) / pub('standard', lr) - 1):+.1f}%"
                row.append(f"{mine}{'†' * c.diverged} / {theirs}")
            ok = {i: m for i in self.inits if self.cell(i, lr).clean and (m := self.cell(i, lr).mean()) is not None}
            ok_pub = {i: pub(i, lr) for i in self.inits if not pub_diverged(i, lr)}
            best = short(min(ok, key=ok.__getitem__)) if ok else "none (all diverged or pending)"
            best_pub = short(min(ok_pub, key=ok_pub.__getitem__)) if ok_pub else "none (all diverged)"
            lines.append(f"| {lr:g} | " + " | ".join(row) + f" | {best} | {best_pub} |")
        return lines

    def point_by_point(self) -> tuple[list[str], Counter]:
        tally: Counter = Counter()
        lines = [
            f"Each init − `standard` at the same lr (nats; ours: paired over seeds and {self.rep} chunks, "
            f"mean [95% interval], ✱ excludes zero, n = seeds; diverged runs {self.convention}; published: the "
            "difference of 4-seed means).",
            "",
            "| lr | init | published | ours | verdict |",
            "|---|---|---|---|---|",
        ]
        for lr in self.lrs:
            for init in self.inits[1:]:
                d = pub(init, lr) - pub("standard", lr)
                both = pub_diverged(init, lr) and pub_diverged("standard", lr)
                gone = [who for who in (init, "standard") if pub_diverged(who, lr)]
                label = nats(d) + (f" ({' and '.join(short(g) for g in gone)} diverged)" if gone else "")
                est = self.paired(init, lr)
                if both:
                    kind, v = "both diverged in the published table", "— (both diverged in the published table)"
                else:
                    unrepeated = gone[0] if gone and not self.cell(gone[0], lr).diverged else ""
                    kind, v = verdict(d, est, self.min_seeds, unrepeated)
                tally[kind] += 1
                lines.append(f"| {lr:g} | `{init}` | {label} | {ci(est)} | {v} |")
        return lines, tally

    def ranked(self) -> dict[str, list[float]]:
        """Each init's eligible learning rates, lowest validation loss first: the report's choice, then the same
        choice over what is left (an init with no eligible cell is left out)."""
        val, _ = self.t.tuned(0, self.convention)
        out = {}
        for init, r in self.rows.items():  # over the shared learning rates only, as the published best is
            left = {lr: val[r, c] for lr, c in self.cols.items() if (r, c) in val}
            order = []
            while (lr := choose(left)) is not None:
                order.append(lr)
                del left[lr]
            if order:
                out[init] = order
        return out

    def best(self) -> dict[str, float]:
        """Each init's learning rate with the lowest validation loss among its eligible cells (the report's)."""
        return {init: order[0] for init, order in self.ranked().items()}

    def pub_best(self) -> dict[str, float]:
        """Each init's published learning rate with the lowest mean among its cells that did not diverge, over the
        shared learning rates (an init that diverged at all of them has none)."""
        out = {}
        for init in self.inits:
            ok = [lr for lr in self.lrs if not pub_diverged(init, lr)]
            if ok:
                out[init] = min(ok, key=lambda lr: pub(init, lr))
        return out

    def against(self, init: str, lr: float, best_lr: float) -> str:
        """Ours at ``lr`` − ours at ``best_lr``, the same init, paired."""
        r = self.rows[init]
        return ci(self.t.paired(0, r, self.cols[lr], r, self.cols[best_lr], self.convention))

    def per_init(self) -> list[str]:
        lines = [
            "Each init's best learning rate (ours: the lowest validation loss among its eligible cells, as the "
            f"report's tuned comparison with diverged runs {self.convention}; published: the lowest mean) and the "
            "first learning rate at which it diverges (ours: any seed; published: the 4-seed mean above 4 nats, which "
            "one blow-up in four need not reach, so *earlier here* may come from that difference alone). Paired on "
            f"{self.rep}, against ours at our best: ours at the runner-up (the second-lowest {self.sel} loss), which "
            "says whether our best is more than noise, and ours at the published best, where the two differ.",
            "",
            "| init | best lr, ours | runner-up − best | best lr, published | ours at published best − at ours | "
            "first diverging lr, ours | first diverging lr, published | divergence |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ranked, pub_best = self.ranked(), self.pub_best()
        best = {init: order[0] for init, order in ranked.items()}
        second = {init: order[1] for init, order in ranked.items() if len(order) > 1}
        top = f"{self.lrs[-1]:g}"
        for init in self.inits:
            edge = " (grid edge)" if best.get(init) in self.edges else ""
            mine_best = (
                f"{best[init]:g}{edge} n={len(self.cell(init, best[init]).finished(self.convention))}"
                if init in best
                else "none eligible"
            )
            first = next((lr for lr in self.lrs if self.cell(init, lr).diverged), None)
            first_pub = next((lr for lr in self.lrs if pub_diverged(init, lr)), None)
            # a run still to finish below our first divergence could move it earlier
            wait = sum(self.cell(init, lr).waiting for lr in self.lrs if first is None or lr < first)
            so_far = f" so far ({wait} run{'s' * (wait != 1)} below not finished)" if wait else ""
            if first is None:
                mine_first = f"none ≤ {top}{so_far}"
            else:
                c = self.cell(init, first)
                n = len(c.finished("included"))
                mine_first = f"{first:g} ({c.diverged} of {n} seed{'s' * (n != 1)}){so_far}"
            theirs = f"none ≤ {top}" if first_pub is None else f"{first_pub:g}"
            best_pub = f"{pub_best[init]:g}" if init in pub_best else "none (all diverged)"
            runner_up = f"{second[init]:g}: {self.against(init, second[init], best[init])}" if init in second else "—"
            if init not in best or init not in pub_best:
                cost = "—"
            elif best[init] == pub_best[init]:
                cost = "same lr"
            else:
                cost = self.against(init, pub_best[init], best[init])
            if wait:
                same = "not yet known"
            elif first == first_pub:
                same = "same"
            elif first is None:
                same = "later here (or never)"
            elif first_pub is None or first < first_pub:
                same = "earlier here"
            else:
                same = "later here"
            lines.append(
                f"| `{init}` | {mine_best} | {runner_up} | {best_pub} | {cost} | {mine_first} | {theirs} | {same} |"
            )
        return lines

    def tuned(self) -> tuple[list[str], Counter]:
        tally: Counter = Counter()
        best, pub_best = self.best(), self.pub_best()
        lines = [
            "Tuned comparison: each init at its own best learning rate against `standard` at its own (ours: chosen "
            f"on {self.sel}, paired on {self.rep}, diverged runs {self.convention}; published: best means over the "
            "same learning rates).",
            "",
            "| init | lr ours / published | published | ours | verdict |",
            "|---|---|---|---|---|",
        ]
        for init in self.inits[1:]:
            if init not in pub_best or "standard" not in pub_best:
                lines.append(f"| `{init}` | — | every published cell of it or of `standard` diverged | — | — |")
                continue
            d = pub(init, pub_best[init]) - pub("standard", pub_best["standard"])
            if init not in best or "standard" not in best:
                lines.append(f"| `{init}` | — / {pub_best[init]:g} | {nats(d)} | no eligible cell | — |")
                continue
            est = self.paired(init, best[init], best["standard"])
            kind, v = verdict(d, est, self.min_seeds)
            tally[kind] += 1
            lines.append(f"| `{init}` | {best[init]:g} / {pub_best[init]:g} | {nats(d)} | {ci(est)} | {v} |")
        return lines, tally


def summary(name: str, tally: Counter) -> str:
    return f"{name}: " + ", ".join(f"{n} {k}" for k, n in sorted(tally.items(), key=lambda kv: -kv[1])) + "."


def seed_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the seeds as comma-separated integers, e.g. 0,1") from None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a sweep's directory (holding sweep.json)")
    parser.add_argument("--min-seeds", type=int, default=2, help="seeds a direction needs to count (default 2)")
    parser.add_argument(
        "--convention",
        choices=("included", "excluded"),
        default="included",
        help="diverged runs in the paired differences (default: the published study's, included)",
    )
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help="compare on these seeds only, e.g. 0,1 (the runs of other seeds, finished or not, are left out)",
    )
    args = parser.parse_args(argv)
    try:
        study = Study(args.store, args.convention, args.min_seeds, args.seeds)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    points, tally = study.point_by_point()
    tuned, tuned_tally = study.tuned()
    blocks = [study.header(args.store), study.relative(), points, study.per_init(), tuned]
    print("\n\n".join("\n".join(b).rstrip("\n") for b in blocks))
    print()
    print(summary("Point by point", tally))
    print(summary("Tuned", tuned_tally))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
