"""Copy a sweep's finished runs into a store kept in git: each run's records, without its adapter.

    python scripts/publish_store.py runs/long-study docs/results/long-study/store

A long sweep's store is committed as it grows: run this after each finished run, then commit. Each finished (ok or
diverged) run is copied with its config, metrics, diagnostics, per-chunk eval losses and result; ``result.json`` is
written last, so a copy cut short is an unfinished run that the next call replaces. Adapters (megabytes a run), the
sweep's lock, runs still training and failed attempts stay in the sweep's own directory. The destination keeps the
sweep's manifest, so ``loralab report``, ``scripts/compare_study.py`` and a resumed ``loralab sweep`` read it as the
sweep itself.

Everything is checked before anything is copied: the destination must be this sweep's (same ``sweep.json``), hold
no other result for a run, and its runs must have been evaluated on the same held-out pool.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from loralab.lab.store import (
    CONFIG,
    DIAGNOSTICS,
    EVAL_CHUNKS,
    MANIFEST,
    METRICS,
    RESULT,
    CorruptFileError,
    SweepStore,
    atomic_write_json,
)

RECORDS = (CONFIG, METRICS, DIAGNOSTICS, EVAL_CHUNKS, RESULT)  # result last: its presence means the copy is whole


class PublishError(ValueError):
    pass


def plan(src: Path, dst: Path) -> tuple[dict | None, list[str], list[str], int]:
    """``(the manifest to write, None when dst has it; runs to copy; runs already there; runs not finished)``;
    raises PublishError on a conflict."""
    source, target = SweepStore(src), SweepStore(dst)
    manifest = source.manifest()
    if manifest is None:
        raise PublishError(f"{src} has no {MANIFEST}: give the out_dir that `loralab sweep` wrote")
    theirs = target.manifest()
    if theirs is not None and theirs != manifest:
        raise PublishError(
            f"{dst / MANIFEST} is not {src / MANIFEST} (another sweep, or another version of its config): "
            "publish into a new directory, or into the store this sweep was copied from"
        )
    todo, there, unfinished = [], [], 0
    other_pool: dict[str, str | None] = {}  # per held-out pool: reading the store's pools once, not once a run
    for rid in source.run_ids():
        run, dest = source.run(rid), target.run(rid)
        if not run.is_finished():
            unfinished += 1
        elif dest.is_finished():
            if (dest.root / RESULT).read_bytes() != (run.root / RESULT).read_bytes():
                raise PublishError(
                    f"{dest.root / RESULT} differs from {run.root / RESULT}: the run was redone on one side. "
                    "Keep one: move the other run's directory aside, then publish again"
                )
            there.append(rid)
        else:
            result, digest = run.result(), run.pool_digest()
            if result is not None and digest is not None:
                if digest not in other_pool:
                    other_pool[digest] = target.other_pool(digest, result.versions)
                if other_pool[digest]:
                    raise PublishError(f"{rid}: {other_pool[digest]}")
            todo.append(rid)
    return (manifest if theirs is None else None), todo, there, unfinished


def publish(src: Path, dst: Path) -> tuple[list[str], list[str], int]:
    """Copy the finished runs of the sweep in ``src`` that ``dst`` lacks: ``(copied, already there, not finished)``."""
    manifest, todo, there, unfinished = plan(src, dst)
    source, target = SweepStore(src), SweepStore(dst)
    if manifest is not None:
        atomic_write_json(dst / MANIFEST, manifest)
    for rid in todo:
        here, dest = source.run(rid).root, target.run(rid)
        dest.reset()  # an earlier copy cut short (a failed result there is kept aside)
        dest.root.mkdir(parents=True, exist_ok=True)
        for name in RECORDS:
            if (here / name).exists():
                tmp = dest.root / f".{name}.tmp"
                shutil.copyfile(here / name, tmp)
                tmp.replace(dest.root / name)
    return todo, there, unfinished


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="the sweep's out_dir (where `loralab sweep` trains)")
    ap.add_argument("dst", type=Path, help="the store to commit (created if missing)")
    args = ap.parse_args(argv)
    try:
        copied, there, unfinished = publish(args.src, args.dst)
    except (PublishError, CorruptFileError, OSError) as e:
        print(f"publish_store: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dst}: {len(copied)} run(s) copied, {len(there)} already there, ", end="")
    print(f"{unfinished} not finished in {args.src}")
    for rid in copied:
        print(f"  + {rid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
