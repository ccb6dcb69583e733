"""scripts/publish_store.py: a sweep's finished runs copied into a store kept in git, records only, as it grows; a
conflict is refused before anything is copied."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import publish_store  # noqa: E402

from loralab.lab.report.write import write_report  # noqa: E402
from loralab.lab.store import RunResult, SweepStore  # noqa: E402
from synthetic_store import build_published_store, rewrite_result, run_id  # noqa: E402

LRS = (1e-4, 2e-3)
PENDING = (("reversed", 2e-3, 0), ("standard", 2e-3, 1))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep still running: two runs not finished, one of them training now (config and metrics, no result), one
    finished run with an adapter, and the sweep's lock."""
    src = tmp_path / "runs"
    build_published_store(src, lrs=LRS, seeds=(0, 1), shift=lambda init, lr: 0.0, pending=PENDING)
    store = SweepStore(src)
    training = store.run(run_id(*PENDING[0]))
    training.write_config(training.run_id, {}, {"lora": {"init": "reversed"}})
    training.append_metric({"step": 1, "train_loss": 3.0})
    adapter = store.run(run_id("standard", 1e-4, 0)).adapter_dir
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (src / "sweep.lock").write_text("123", encoding="utf-8")
    return src


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def publish(src: Path, dst: Path, capsys) -> tuple[int, str, str]:
    code = publish_store.main([str(src), str(dst)])
    out, err = capsys.readouterr()
    return code, out, err


def test_finished_runs_are_copied_with_their_records_only_and_report_the_same(sweep, tmp_path, capsys):
    dst = tmp_path / "docs" / "store"
    code, out, err = publish(sweep, dst, capsys)
    assert code == 0, err
    finished = [r for r in SweepStore(sweep).run_ids() if SweepStore(sweep).run(r).is_finished()]
    assert len(finished) == 5 * 2 * 2 - len(PENDING)
    assert out.splitlines()[0] == f"{dst}: {len(finished)} run(s) copied, 0 already there, 2 not finished in {sweep}"
    got = files(dst)
    assert sorted({k.split("/")[1] for k in got if k.startswith("runs/")}) == sorted(finished)
    assert not any("adapter" in k or "lock" in k for k in got)   # no adapter, no lock, no run in progress
    src_files = files(sweep)
    for name, data in got.items():
        assert data == src_files[name], name                        # byte for byte
    for rid in finished:   # every record the run has, and nothing else
        mine = {k.split("/")[-1] for k in got if k.startswith(f"runs/{rid}/")}
        assert mine == {k.split("/")[-1] for k in src_files if k.startswith(f"runs/{rid}/") and "adapter" not in k}
        assert {"config.json", "eval_chunks.npz", "result.json"} <= mine
    shutil.rmtree(sweep / "runs" / run_id(*PENDING[0]))   # the run in training: pending in the published store
    write_report(sweep, out=tmp_path / "r1")
    write_report(dst, out=tmp_path / "r2")
    def text(out: Path, store: Path) -> str:
        md = (out / "report.md").read_text().replace(str(store), "STORE")
        return re.sub(r"report generated \S+", "", md)

    t1, t2 = text(tmp_path / "r1", sweep), text(tmp_path / "r2", dst)
    assert t1 == t2   # but for the run in training, the published store is the sweep, as the report reads it


def test_a_second_call_copies_only_what_finished_since(sweep, tmp_path, capsys):
    dst = tmp_path / "store"
    assert publish(sweep, dst, capsys)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file()}
    code, out, _ = publish(sweep, dst, capsys)
    assert code == 0 and " 0 run(s) copied, 18 already there, 2 not finished" in out
    rid = run_id(*PENDING[0])
    SweepStore(sweep).run(rid).write_result(RunResult(rid, "ok", {}, final_eval_loss=3.0, steps=10))
    code, out, _ = publish(sweep, dst, capsys)
    assert code == 0 and " 1 run(s) copied, 18 already there, 1 not finished" in out and f"  + {rid}" in out
    assert SweepStore(dst).run(rid).is_finished()
    assert {p: p.stat().st_mtime_ns for p in before} == before   # what was there is not rewritten


def test_a_copy_cut_short_is_replaced(sweep, tmp_path, capsys):
    dst = tmp_path / "store"
    assert publish(sweep, dst, capsys)[0] == 0
    rid = run_id("reversed", 1e-4, 1)
    (dst / "runs" / rid / "result.json").unlink()       # the copy stopped before its last file
    (dst / "runs" / rid / "metrics.jsonl").write_text("cut", encoding="utf-8")
    code, out, _ = publish(sweep, dst, capsys)
    assert code == 0 and " 1 run(s) copied" in out
    assert files(dst / "runs" / rid) == files(sweep / "runs" / rid)


def test_another_sweeps_store_is_refused_and_left_as_it_was(sweep, tmp_path, capsys):
    dst = tmp_path / "store"
    build_published_store(dst, lrs=(1e-4,), seeds=(0,), shift=lambda init, lr: 0.0)
    before = files(dst)
    code, out, err = publish(sweep, dst, capsys)
    assert code == 2 and out == ""
    assert err.startswith("publish_store: error: ") and "sweep.json" in err and "new directory" in err
    assert len(err.strip().splitlines()) == 1
    assert files(dst) == before


def test_a_run_redone_on_one_side_is_refused_before_anything_is_copied(sweep, tmp_path, capsys):
    dst = tmp_path / "store"
    assert publish(sweep, dst, capsys)[0] == 0
    redone = run_id("standard", 1e-4, 0)
    rewrite_result(SweepStore(dst).run(redone), final_eval_loss=9.0)
    new = run_id(*PENDING[1])
    SweepStore(sweep).run(new).write_result(RunResult(new, "ok", {}, final_eval_loss=3.0, steps=10))
    code, _, err = publish(sweep, dst, capsys)
    assert code == 2 and redone in err and "move the other run's directory aside" in err
    assert not (dst / "runs" / new).exists()   # checked first, copied after: nothing half done
    assert json.loads((dst / "runs" / redone / "result.json").read_text())["final_eval_loss"] == 9.0


def test_runs_on_another_held_out_pool_are_refused(sweep, tmp_path, capsys):
    dst = tmp_path / "store"
    assert publish(sweep, dst, capsys)[0] == 0
    new = run_id(*PENDING[1])
    run = SweepStore(sweep).run(new)
    other = SweepStore(sweep).run(run_id("standard", 1e-4, 1)).eval_chunks()
    assert other is not None
    run.write_eval_chunks(type(other)("pool-other", other.splits, other.curve))
    run.write_result(RunResult(new, "ok", {}, final_eval_loss=3.0, steps=10, versions={"transformers": "9"}))
    code, _, err = publish(sweep, dst, capsys)
    assert code == 2 and "pool-other" in err and new in err
    assert not (dst / "runs" / new).exists()


def test_a_directory_that_is_no_sweep_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = publish(tmp_path / "empty", tmp_path / "store", capsys)
    assert code == 2 and "sweep.json" in err and "loralab sweep" in err
    assert not (tmp_path / "store").exists()
