"""Compare a loralab init study's store with the published "A×0 ≠ 0×B" table (REFERENCE.md), point by point.

    python scripts/compare_study.py runs/study-smollm2 > docs/results/study-smollm2/comparison.md

Reads only the store (like ``loralab report``). For each learning rate of the published grid it shows both studies'
mean final eval loss relative to ``standard`` and the best init; then, per init, its best learning rate and the first
learning rate at which it diverges; then the best cell overall. A published cell counts as diverged when its loss is
above 4 nats/token (its diverged cells read 7.0–9.3, its others 2.2–2.4); a loralab cell when any seed's status is
``diverged``.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

sys.path.insert(0, "src")

from loralab.lab.store import SweepStore  # noqa: E402

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


def ours(out_dir: str) -> dict[tuple[str, float], dict]:
    """``(init, lr) -> {"mean": mean final loss over ok seeds or None, "diverged": k, "ok": k}``."""
    cells: dict[tuple[str, float], dict] = defaultdict(lambda: {"losses": [], "diverged": 0, "ok": 0})
    for rec in SweepStore(out_dir).records():
        if rec.result is None:
            continue
        cell = cells[(rec.axes["lora.init"], float(rec.axes["train.lr"]))]
        if rec.result.status == "diverged":
            cell["diverged"] += 1
        elif rec.result.status == "ok":
            cell["ok"] += 1
            cell["losses"].append(rec.result.final_eval_loss)
    return {k: {**v, "mean": statistics.fmean(v["losses"]) if v["losses"] else None} for k, v in cells.items()}


def rel(x: float | None, ref: float | None) -> str:
    return "—" if x is None or ref is None else f"{100 * (x / ref - 1):+.1f}%"


def short(init: str) -> str:
    return init.replace("orthogonal-", "")


def per_lr(cells: dict) -> list[str]:
    lines = [
        "| lr | " + " | ".join(f"{short(i)} ours / pub." for i in INITS[1:]) + " | best ours | best pub. |",
        "|---|" + "---|" * (len(INITS) + 1),
    ]
    for lr in LRS:
        mine = {i: cells.get((i, lr), {}) for i in INITS}
        ref = mine["standard"].get("mean")
        pub = dict(zip(INITS, PUBLISHED[lr]))
        row = [
            f"{rel(mine[i].get('mean'), ref)}{'†' * mine[i].get('diverged', 0)} / {rel(pub[i], pub['standard'])}"
            for i in INITS[1:]
        ]
        ok_mine = {i: c["mean"] for i, c in mine.items() if c.get("mean") is not None and not c.get("diverged")}
        ok_pub = {i: v for i, v in pub.items() if v < PUBLISHED_DIVERGED}
        best_mine = short(min(ok_mine, key=ok_mine.get)) if ok_mine else "none (all diverged)"
        best_pub = short(min(ok_pub, key=ok_pub.get)) if ok_pub else "none (all diverged)"
        lines.append(f"| {lr:g} | " + " | ".join(row) + f" | {best_mine} | {best_pub} |")
    return lines


def per_init(cells: dict) -> list[str]:
    """Each init's best learning rate (lowest mean final loss among cells where nothing diverged) and the first
    learning rate at which it diverges, in both studies."""
    lines = [
        "| init | best lr, ours | best lr, published | first diverging lr, ours | first diverging lr, published |",
        "|---|---|---|---|---|",
    ]
    for k, init in enumerate(INITS):
        ok = {
            lr: c["mean"]
            for lr in LRS
            if (c := cells.get((init, lr), {})).get("mean") is not None and not c.get("diverged")
        }
        pub_ok = {lr: PUBLISHED[lr][k] for lr in LRS if PUBLISHED[lr][k] <= PUBLISHED_DIVERGED}
        mine = next((lr for lr in LRS if cells.get((init, lr), {}).get("diverged")), None)
        pub = next((lr for lr in LRS if PUBLISHED[lr][k] > PUBLISHED_DIVERGED), None)
        lines.append(
            f"| {init} | {min(ok, key=ok.get):g} | {min(pub_ok, key=pub_ok.get):g} | "
            f"{'none ≤ 1e-2' if mine is None else f'{mine:g}'} | {'none ≤ 1e-2' if pub is None else f'{pub:g}'} |"
        )
    return lines


def best_overall(cells: dict) -> str:
    ok = {k: c["mean"] for k, c in cells.items() if c["mean"] is not None and not c["diverged"]}
    (init, lr), loss = min(ok.items(), key=lambda kv: kv[1])
    pub = min(((i, lr_) for lr_ in LRS for i in INITS), key=lambda k: PUBLISHED[k[1]][INITS.index(k[0])])
    return (
        f"Best cell overall: ours `{init}` at lr {lr:g} ({loss:.4f}); published `{pub[0]}` at lr {pub[1]:g} "
        f"({PUBLISHED[pub[1]][INITS.index(pub[0])]:.4f})."
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    cells = ours(argv[0])
    missing = [(i, lr) for i in INITS for lr in LRS if (i, lr) not in cells]
    if missing:
        print(
            f"error: {len(missing)} cells of the published grid have no finished run in {argv[0]}, e.g. "
            f"{missing[0]}; finish the sweep first (rerun its `loralab sweep` command)",
            file=sys.stderr,
        )
        return 2
    print(
        "Mean final eval loss relative to `standard` at the same lr, ours / published (†: a seed of ours "
        "diverged; that cell's mean is over the seeds that did not).\n"
    )
    print("\n".join(per_lr(cells)) + "\n")
    print("\n".join(per_init(cells)) + "\n")
    print(best_overall(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
