"""Sweep wall time: a grid trained one run after another vs in packs on one shared base, side by side.

Both modes run the same grid (the quick preset by default) through the lab's local executor into separate stores;
the model and data are loaded once, before timing, so the figure is training time. Packed runs draw other dropout
masks than solo runs, so their losses agree in distribution, not bit for bit: the table shows the largest gap.

    python bench/bench_sweep.py                                   # quick preset, packs as large as its grid allows
    python bench/bench_sweep.py --set train.max_steps=4 --pack 3  # shorter, packs of 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def run_mode(sweep, out_dir: Path, pack: int) -> tuple[float, dict]:
    from loralab.lab.store import SweepStore
    from loralab.lab.sweep.local import LocalExecutor
    from loralab.lab.sweep.plan import SweepPlan
    from loralab.lab.sweep.run import run_sweep

    t0 = time.perf_counter()
    plan = SweepPlan.build(replace(sweep, out_dir=str(out_dir), pack=pack))
    run_sweep(plan, LocalExecutor(plan, progress=False, log=lambda s: None), log=lambda s: None)
    wall = time.perf_counter() - t0
    results = {r.run_id: r.result for r in SweepStore(out_dir).records()}
    return wall, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/quick.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pack", type=int, default=0, help="runs per pack in packed mode; 0 = the whole grid")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    from loralab.lab.config.grid import plan_runs
    from loralab.lab.config.toml import load_sweep
    from loralab.lab.run.assets import Assets

    sweep = load_sweep(args.config, args.set)
    jobs = plan_runs(sweep)
    pack = args.pack or len(jobs)
    Assets().get(jobs[0].run)   # converts/caches model and data, so neither mode pays for it
    with tempfile.TemporaryDirectory() as tmp:
        solo_s, solo = run_mode(sweep, Path(tmp) / "solo", 1)
        pack_s, packed = run_mode(sweep, Path(tmp) / "packed", pack)
    gaps = [abs(solo[k].final_eval_loss - packed[k].final_eval_loss) for k in solo
            if solo[k].status == packed[k].status == "ok"]
    statuses = {k: (solo[k].status, packed[k].status) for k in solo}
    losses = {k: (solo[k].final_eval_loss, packed[k].final_eval_loss) for k in solo}
    row = {"runs": len(jobs), "pack": pack, "one_by_one_s": solo_s, "packed_s": pack_s, "speedup": solo_s / pack_s,
           "max_final_loss_gap": max(gaps, default=None),
           "same_status": all(a == b for a, b in statuses.values()),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "overrides": args.set}
    print(f"# {args.config} {' '.join(args.set)}: {len(jobs)} runs on {row['device']}")
    print("| mode | wall (s) | × one by one |\n|---|---|---|")
    print(f"| one by one | {solo_s:.1f} | 1.00 |\n| packs of {pack} | {pack_s:.1f} | {solo_s / pack_s:.2f} |")
    print(f"largest |final eval loss, packed − solo| over runs ok in both: {row['max_final_loss_gap']}; "
          f"same status in both modes: {row['same_status']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"row": row, "statuses": statuses, "final_eval_loss": losses},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
