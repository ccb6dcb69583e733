"""Run sweeps as many small sweeps at once on one machine, then gather each into its own store.

For a machine that one run leaves mostly idle: a 135M model on a large GPU is bound by Python launching kernels, so
N processes side by side train about N times as many steps per second until the GPU is busy. Each shard is the same
sweep with some grid axes pinned to one value and its own directory under ``<out_dir>/shards/``. A run's id is its
axes' values and its config's hash, so a shard's runs have the ids of the whole sweep: finished runs are moved into
``<out_dir>/runs/`` under the sweep's own manifest (``sweep.json``, written first), and ``loralab sweep CONFIG``
resumes whatever is left, here or on another machine (each run records the device it ran on). Shards start in the
order of the configs given, each in its grid's order (put first the axis that a deadline should leave whole, e.g. the
seed). At the deadline the running shards get SIGINT (the lab keeps every finished run); what they had not finished
is left for a resume.

    python scripts/shard_sweep.py configs/long-pilot.toml configs/alpha-lr.toml:train.lr configs/long-study.toml \\
        --workers 12 --deadline 450 --set train.save_adapter=false --set pack=1

``CONFIG:AXIS,...`` keeps those axes whole inside each shard (fewer, longer shards for short runs); by default every
axis is pinned, so a shard is one run. ``--set`` applies to every config, as for ``loralab sweep``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.lab.config.toml import load_sweep
from loralab.lab.store import RunStore, SweepStore, move_aside
from loralab.lab.sweep.plan import SweepPlan


@dataclass
class Shard:
    config: str
    out_dir: Path
    name: str
    pins: dict[str, Any]
    run_ids: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log: Any = field(default=None, repr=False)
    moved: int = 0


def toml_value(v: Any) -> str:
    """A TOML literal for an override value (scalars, lists, inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v).replace("\x7f", "\\u007f")  # JSON's escapes are TOML's; TOML also refuses a raw DEL
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML literal for {type(v).__name__}: {v!r}")


def shards_of(spec: str, sets: list[str]) -> list[Shard]:
    config, _, kept = spec.partition(":")
    keep = [a for a in kept.split(",") if a]
    sweep = load_sweep(config, sets)
    unknown = [a for a in keep if a not in sweep.grid]
    if unknown:
        sys.exit(f"{spec}: {', '.join(unknown)} is not a grid axis of {config}; axes: {', '.join(sweep.grid)}")
    out = Path(sweep.out_dir)
    plan = SweepPlan.build(sweep)
    store = SweepStore(out)
    store.write_manifest(**plan.manifest(), run_axes=[s.axes for s in plan.runs])
    done = {s.run_id for s in plan.runs if store.run(s.run_id).is_finished()}  # a failed run is done again
    pinned = [a for a in sweep.grid if a not in keep]
    groups: dict[tuple, list] = {}
    for spec_ in plan.runs:
        if spec_.run_id not in done:
            key = tuple(repr(spec_.axes[a]) for a in pinned)
            groups.setdefault(key, []).append(spec_)
    shards = []
    for k, specs in enumerate(groups.values()):
        pins = {a: specs[0].axes[a] for a in pinned}
        runs = [s.run_id for s in specs]
        name = runs[0] if len(runs) == 1 else f"shard{k:03d}-{runs[0]}"
        shards.append(Shard(config, out, name, pins, runs))
    return shards


def command(shard: Shard, sets: list[str]) -> list[str]:
    overrides = [*sets, f"out_dir={toml_value(str(shard.out_dir / 'shards' / shard.name))}"]
    overrides += [f"grid.{a}={toml_value([v])}" for a, v in shard.pins.items()]
    return [sys.executable, "-m", "loralab", "sweep", shard.config, "--no-progress"] + list(
        itertools.chain.from_iterable(("--set", o) for o in overrides)
    )


def move_in(run: RunStore, dest: RunStore) -> None:
    """Put a finished ``run`` at ``dest`` in one rename, so that a gather cut short at any point and called again
    loses nothing: an earlier unfinished attempt at ``dest`` is cleared as a sweep clears it, what it keeps aside (a
    failure) joins ``run`` first, and ``dest`` holds the run only once it holds all of it."""
    dest.reset()
    if dest.root.exists():
        for f in dest.root.iterdir():
            move_aside(f, "", into=run.root)
        dest.root.rmdir()
    dest.root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run.root, dest.root)


def gather(shard: Shard) -> tuple[int, int]:
    """Move the shard's finished runs (ok or diverged) into its sweep's store; ``(moved, left)``. A failed run stays
    in the shard with its log, and the next call of this script trains it again. A run evaluated on another held-out
    pool than the store's finished runs (the same data config tokenized otherwise) stays too, and says why."""
    store, own = SweepStore(shard.out_dir), SweepStore(shard.out_dir / "shards" / shard.name)
    moved = 0
    for rid in shard.run_ids:
        run = own.run(rid)
        digest, result = run.pool_digest(), run.result() if run.is_finished() else None
        if result and digest and (problem := store.other_pool(digest, result.versions)):
            print(f"{shard.name}: {rid} left in its shard: {problem}", flush=True)
            continue
        if result:
            move_in(run, store.run(rid))
            moved += 1
    if moved == len(shard.run_ids):
        shutil.rmtree(shard.out_dir / "shards" / shard.name, ignore_errors=True)
        (shard.out_dir / "shards" / f"{shard.name}.log").unlink(missing_ok=True)
    return moved, len(shard.run_ids) - moved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", metavar="CONFIG[:AXIS,...]")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--deadline", type=float, default=0.0, help="seconds from now; 0 = none")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds between SIGINT and SIGKILL at the deadline")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for loralab sweep")
    args = ap.parse_args()
    t0 = time.monotonic()
    queue = [s for spec in args.configs for s in shards_of(spec, args.set)]
    total = sum(len(s.run_ids) for s in queue)
    print(f"{len(queue)} shards, {total} runs, {args.workers} at a time", flush=True)
    running: list[Shard] = []
    finished: list[Shard] = []
    stopping = False
    while queue or running:
        late = args.deadline and time.monotonic() - t0 > args.deadline
        if late and not stopping:
            stopping = True
            print(f"deadline: stopping {len(running)} shards, {len(queue)} not started", flush=True)
            for s in running:
                s.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
            stop_at = time.monotonic() + args.grace
        if stopping:
            queue.clear()
            if time.monotonic() > stop_at:
                for s in running:
                    s.proc.kill()  # type: ignore[union-attr]
        while queue and len(running) < args.workers:
            s = queue.pop(0)
            log_path = s.out_dir / "shards" / f"{s.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            s.log = log_path.open("w")
            s.proc = subprocess.Popen(command(s, args.set), stdout=s.log, stderr=subprocess.STDOUT)
            s.started = time.monotonic()
            running.append(s)
        for s in list(running):
            if s.proc.poll() is not None:  # type: ignore[union-attr]
                running.remove(s)
                s.log.close()
                moved, left = gather(s)
                s.moved = moved
                finished.append(s)
                print(
                    f"[{time.monotonic() - t0:6.0f}s] {s.name}: rc {s.proc.returncode}, {moved} runs in "  # type: ignore[union-attr]
                    f"{time.monotonic() - s.started:.0f}s" + (f", {left} not finished" if left else ""),
                    flush=True,
                )
        time.sleep(0.5)
    for out in {s.out_dir for s in finished}:
        if (out / "shards").is_dir() and not any((out / "shards").iterdir()):
            (out / "shards").rmdir()
    done = sum(s.moved for s in finished)
    print(f"done in {time.monotonic() - t0:.0f}s: {done} of {total} runs gathered", flush=True)
    return 0 if done == total else 1


if __name__ == "__main__":
    sys.exit(main())
