"""Tests of the run store: atomic strict-JSON writes, crash-tolerant metrics, resumable runs, sweep manifests."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from loralab.lab import store as store_mod
from loralab.lab.runtime import check_out_dir
from loralab.lab.store import (
    CorruptFileError,
    CurveLosses,
    EvalChunks,
    ManifestMismatchError,
    RunResult,
    RunStore,
    SplitLosses,
    SweepStore,
    atomic_write_json,
    read_json,
    to_strict_json,
)


def _strict_load(path):
    """Parse as strict JSON: NaN/Infinity tokens are an error."""
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_atomic_write_round_trip_and_nan_to_null(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": (1, "s"), "d": None})
    assert _strict_load(path) == {"a": None, "b": [1.5, None, None], "c": [1, "s"], "d": None}
    assert read_json(path) == _strict_load(path)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})

    def boom(src, dst):
        raise OSError("disk vanished")
    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk vanished"):
        atomic_write_json(path, {"v": 2, "big": list(range(1000))})
    assert read_json(path) == {"v": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_write_fails_cleanly_on_unserializable(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_fails_cleanly_when_the_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, [1, 2])

    def dying_fsync(fd):
        raise KeyboardInterrupt  # e.g. the job is killed mid-write
    monkeypatch.setattr(store_mod.os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, [3, 4])
    assert read_json(path) == [1, 2]
    assert list(tmp_path.iterdir()) == [path]


def test_to_strict_json_converts_scalar_objects():
    np = pytest.importorskip("numpy")
    assert to_strict_json({"x": np.float32(np.nan), "y": np.int64(3)}) == {"x": None, "y": 3}


def test_run_result_validates_status_and_serializes_nan_as_null():
    with pytest.raises(ValueError, match="status"):
        RunResult("r", "crashed")
    res = RunResult("r", "diverged", {"train.lr": 1e-2}, final_eval_loss=float("nan"), best_eval_loss=2.5)
    d = res.to_json()
    assert d["final_eval_loss"] is None and d["best_eval_loss"] == 2.5 and d["axes"] == {"train.lr": 1e-2}
    assert RunResult.from_json(json.loads(json.dumps(d, allow_nan=False))) == RunResult(
        "r", "diverged", {"train.lr": 1e-2}, final_eval_loss=None, best_eval_loss=2.5)


def test_metrics_skip_truncated_last_line_and_appends_stay_readable(tmp_path):
    run = RunStore(tmp_path / "r")
    run.append_metric({"kind": "eval", "step": 0, "eval_loss": 2.0})
    run.append_metric({"kind": "train", "step": 1, "loss": math.inf})
    with open(run.root / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 2, "eval_lo')  # a crash mid-line
    assert [m["step"] for m in run.metrics()] == [0, 1]
    assert run.metrics()[1]["loss"] is None
    run.append_metric({"kind": "eval", "step": 3, "eval_loss": 1.5})  # starts on a fresh line
    with pytest.warns(UserWarning, match="corrupt"):
        assert [m["step"] for m in run.metrics()] == [0, 1, 3]


def test_missing_files_read_as_none(tmp_path):
    run = RunStore(tmp_path / "nothing")
    assert (run.result(), run.config(), run.diagnostics(), run.metrics(), run.is_finished()) == (
        None, None, None, [], False)


def test_result_is_written_once_and_marks_the_run_finished(tmp_path):
    run = RunStore(tmp_path / "r")
    run.write_config("r", {"lora.init": "standard"}, {"lora": {"rank": 8}})
    assert not run.is_finished()
    run.write_result(RunResult("r", "ok", final_eval_loss=2.2))
    assert run.is_finished() and run.result().final_eval_loss == 2.2
    with pytest.raises(FileExistsError):
        run.write_result(RunResult("r", "failed"))
    assert run.result().status == "ok"


def test_reset_removes_an_unfinished_run_and_refuses_a_finished_one(tmp_path):
    run = RunStore(tmp_path / "r")
    run.write_config("r", {}, {})
    run.write_diagnostics({"identity_max_abs": 0.0, "layers": {}})
    run.append_metric({"kind": "eval", "step": 0, "eval_loss": 2.0})
    (run.root / ".result.json.abc.tmp").write_text("{")  # a temp file left by a killed writer
    run.reset()
    assert list(run.root.iterdir()) == []
    run.write_result(RunResult("r", "ok"))
    with pytest.raises(RuntimeError, match="finished"):
        run.reset()
    assert run.is_finished()


def test_an_adapter_appears_whole_or_not_at_all_and_reset_removes_it(tmp_path):
    run = RunStore(tmp_path / "r")

    def half(tmp):   # a writer that fails midway, as a full disk would
        (tmp / "adapter_config.json").write_text("{}")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        run.write_adapter(half)
    assert not run.has_adapter() and list(run.root.iterdir()) == []   # no adapter/, no temp dir left
    run.write_adapter(lambda tmp: (tmp / "adapter_config.json").write_text('{"r": 4}'))
    assert run.adapter_files() == {"adapter_config.json": b'{"r": 4}'}
    (run.root / ".adapter.k1ll3d").mkdir()   # what a writer killed before its rename leaves
    (run.root / ".adapter.k1ll3d" / "adapter_model.safetensors").write_bytes(b"half")
    run.reset()   # an unfinished run: its adapter, whole or half, goes with the attempt
    assert list(run.root.iterdir()) == [] and run.adapter_files() is None
    run.write_result(RunResult("r", "ok"))
    with pytest.raises(FileExistsError, match="before its result"):
        run.write_adapter(lambda tmp: None)


def test_manifest_kept_when_identical_and_refused_when_the_runs_differ(tmp_path):
    sweep = SweepStore(tmp_path)
    grid = {"lora.init": ("standard", "reversed"), "train.lr": (1e-3,)}
    sweep.write_manifest("s", grid, ["a", "b"], {"train": {"epochs": 1}})
    created = sweep.manifest()["created"]
    (tmp_path / "sweep.json").write_text((tmp_path / "sweep.json").read_text().replace(created, "KEEP"))
    sweep.write_manifest("s", grid, ["a", "b"], {"train": {"epochs": 1}})
    assert sweep.manifest()["created"] == "KEEP" and sweep.manifest()["grid"]["lora.init"] == ["standard", "reversed"]
    with pytest.raises(ManifestMismatchError, match="new out_dir"):
        sweep.write_manifest("s", grid, ["a", "c"], {})
    assert sweep.manifest()["run_ids"] == ["a", "b"]


def test_run_ids_must_be_plain_names(tmp_path):
    for bad in ("", "..", "a/b", "../escape"):
        with pytest.raises(ValueError):
            SweepStore(tmp_path).run(bad)


def test_records_cover_every_run_in_manifest_order(tmp_path):
    sweep = SweepStore(tmp_path)
    ids = ["ok1", "div", "fail", "crashed", "never"]
    axes = [{"train.lr": float(i)} for i in range(len(ids))]
    sweep.write_manifest("s", {"train.lr": [a["train.lr"] for a in axes]}, ids, {}, run_axes=axes)
    sweep.run("ok1").write_result(RunResult("ok1", "ok", axes[0], final_eval_loss=2.0))
    sweep.run("div").write_result(RunResult("div", "diverged", axes[1], final_eval_loss=float("nan")))
    sweep.run("fail").write_result(RunResult("fail", "failed", axes[2], error="boom"))
    sweep.run("crashed").write_config("crashed", {"train.lr": 3.0}, {})
    sweep.run("crashed").append_metric({"kind": "eval", "step": 0, "eval_loss": 2.5})
    os.makedirs(tmp_path / "runs" / "stray")  # a directory the manifest does not list comes last
    recs = sweep.records()
    assert [r.run_id for r in recs] == ids + ["stray"]
    assert [r.status for r in recs] == ["ok", "diverged", "failed", "unfinished", "pending", "pending"]
    assert [r.axes for r in recs[:5]] == axes
    assert recs[1].final_eval_loss is None and recs[2].result.error == "boom"
    assert recs[3].eval_curve() == [(0, 2.5)] and recs[4].metrics == ()
    # a failed run is recorded, but a resumed sweep redoes it
    assert [r for r in sweep.run_ids() if sweep.run(r).is_finished()] == ["ok1", "div"]


# ---- failed and unreadable results: redone, the old file moved aside, never deleted --------------------------------

def test_failed_result_is_not_finished_and_reset_moves_it_aside(tmp_path):
    run = RunStore(tmp_path / "r")
    for attempt in (1, 2):
        run.write_config("r", {}, {})
        run.write_result(RunResult("r", "failed", error=f"boom {attempt}", traceback="Traceback ..."))
        assert run.status() == "failed" and not run.is_finished()
        moved = run.reset()
        assert moved.name == ("result.json.failed" if attempt == 1 else "result.json.failed-2")
        assert read_json(moved)["error"] == f"boom {attempt}"   # the error and traceback are kept
        assert run.status() is None and not (run.root / "config.json").exists()
    for status in ("ok", "diverged"):   # results: never redone, never reset
        other = RunStore(tmp_path / status)
        other.write_result(RunResult(status, status))
        assert other.is_finished()
        with pytest.raises(RuntimeError, match="finished"):
            other.reset()


@pytest.mark.parametrize("text,fragment", [('{"run_id": "r", "status": "ok", "fin', "not valid JSON"),
                                           ("[1, 2]", "not a JSON object"),
                                           ('{"run_id": "r", "status": "done"}', "status 'done'")],
                         ids=["truncated", "a list", "unknown status"])
def test_unreadable_result_names_the_file_and_is_moved_aside_by_reset(tmp_path, text, fragment):
    run = RunStore(tmp_path / "r")
    run.write_config("r", {"train.lr": 0.1}, {})
    (run.root / "result.json").write_text(text)
    with pytest.raises(CorruptFileError) as e:
        run.result()
    assert str(run.root / "result.json") in str(e.value) and fragment in str(e.value)
    assert "rerun the sweep" in str(e.value)
    assert run.status() == "corrupt" and not run.is_finished()
    moved = run.reset()
    assert moved == run.root / "result.json.corrupt" and moved.read_text() == text
    assert run.status() is None


def test_records_list_an_unreadable_result_as_unfinished(tmp_path):
    sweep = SweepStore(tmp_path)
    sweep.write_manifest("s", {"train.lr": [0.1, 0.2]}, ["a", "b"], {}, run_axes=[{"train.lr": 0.1},
                                                                                  {"train.lr": 0.2}])
    sweep.run("a").write_result(RunResult("a", "ok", {"train.lr": 0.1}))
    sweep.run("b").write_config("b", {"train.lr": 0.2}, {})
    (sweep.run("b").root / "result.json").write_text('{"status": "ok", "run_')
    a, b = sweep.records()
    assert (a.status, a.problem) == ("ok", None)
    assert b.status == "unfinished" and b.result is None and str(sweep.run("b").root / "result.json") in b.problem


def test_unreadable_manifest_names_the_file(tmp_path):
    (tmp_path / "sweep.json").write_text('{"name": "s", "run_ids": [')
    with pytest.raises(CorruptFileError, match=r"sweep\.json is not valid JSON.*new out_dir"):
        SweepStore(tmp_path).manifest()
    (tmp_path / "sweep.json").write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match=str(tmp_path / "sweep.json")):
        SweepStore(tmp_path).records()


def test_manifest_mismatch_names_the_fields_that_differ(tmp_path):
    sweep = SweepStore(tmp_path)
    base = {"train": {"max_steps": 3, "lr": 1e-3}, "lora": {"targets": ["q_proj"]}}
    sweep.write_manifest("s", {"lora.init": ["standard"]}, ["a"], base)
    new = {"train": {"max_steps": 4, "lr": 1e-3}, "lora": {"targets": ["q_proj", "v_proj"]}}
    with pytest.raises(ManifestMismatchError) as e:
        sweep.check_manifest("s", {"lora.init": ["standard", "reversed"]}, ["b", "c"], new)
    msg = str(e.value)
    assert "train.max_steps: 3 in the store, 4 now" in msg
    assert 'lora.targets: ["q_proj"] in the store, ["q_proj", "v_proj"] now' in msg
    assert 'grid.lora.init: ["standard"] in the store, ["standard", "reversed"] now' in msg
    assert "train.lr" not in msg and "new out_dir" in msg and "the config it was made with" in msg


def test_out_dir_expands_home_and_must_be_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert SweepStore("~/runs/x").root == tmp_path / "runs" / "x"
    assert check_out_dir("~/runs/x") == tmp_path / "runs" / "x"   # creatable: fine, and not created
    assert not (tmp_path / "runs").exists()
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ValueError, match=f"out_dir {bad} .*file"):
            check_out_dir(bad)


# ---- per-chunk eval losses ------------------------------------------------------------------------------------------

def _chunks(n: int = 5) -> EvalChunks:
    rng = np.random.default_rng(0)
    split = lambda ids: SplitLosses(ids=np.array(ids), pretrained=rng.random(len(ids)) + 3,  # noqa: E731
                                    step0=rng.random(len(ids)) + 3, final=rng.random(len(ids)) + 2)
    val = split(range(n))
    test = SplitLosses(ids=np.arange(n, 2 * n), pretrained=val.pretrained, step0=val.step0,
                       final=np.array([np.nan, np.inf, 2.0, 1.5, 9.0])[:n])
    return EvalChunks("abc123", {"val": val, "test": test})


def test_eval_chunks_round_trip_keeps_non_finite_losses(tmp_path):
    run = RunStore(tmp_path / "r")
    written = _chunks()
    run.write_eval_chunks(written)
    back = run.eval_chunks()
    assert back.pool_digest == "abc123" and list(back.splits) == ["val", "test"]
    for name, split in written.splits.items():
        for stage in ("ids", "pretrained", "step0", "final"):
            np.testing.assert_array_equal(getattr(back.splits[name], stage),
                                          np.asarray(getattr(split, stage), dtype=getattr(back.splits[name],
                                                                                          stage).dtype))
    assert back.splits["val"].final.dtype == np.float32 and (tmp_path / "r" / "eval_chunks.npz").stat().st_size < 4096


def test_curve_losses_round_trip_and_old_files_have_none(tmp_path):
    """The periodic evals' per-chunk losses come back typed, NaN kept; a file without them (written before loralab
    stored them) reads as before, with ``curve`` None."""
    old = _chunks()
    curve = CurveLosses(ids=np.arange(3), steps=np.array([0, 2, 4]),
                        losses=np.array([[3.0, 3.1, 3.2], [2.9, np.nan, 3.0], [2.5, 2.6, np.inf]], dtype=np.float32))
    run, legacy = RunStore(tmp_path / "r"), RunStore(tmp_path / "legacy")
    run.write_eval_chunks(EvalChunks(old.pool_digest, old.splits, curve))
    legacy.write_eval_chunks(old)
    back = run.eval_chunks()
    assert back.curve == curve and list(back.splits) == ["val", "test"]
    assert back.curve.losses.dtype == np.float32 and back.curve.steps.dtype == np.int64
    assert legacy.eval_chunks().curve is None and back.splits == run.eval_chunks().splits
    with pytest.raises(ValueError, match=r"curve losses must be \(steps, chunks\) = \(3, 3\); got \(2, 3\)"):
        CurveLosses(ids=np.arange(3), steps=np.array([0, 2, 4]), losses=np.zeros((2, 3)))


def test_a_misshapen_curve_makes_the_file_unreadable_by_name(tmp_path):
    run = RunStore(tmp_path / "r")
    arrays = _chunks().to_arrays() | {"curve.chunk_ids": np.arange(3), "curve.steps": np.arange(2),
                                      "curve.losses": np.zeros((3, 3), dtype=np.float32)}
    run.root.mkdir(parents=True)
    with open(run.root / "eval_chunks.npz", "wb") as f:
        np.savez_compressed(f, **arrays)
    with pytest.raises(CorruptFileError, match="eval_chunks.npz is not a per-chunk eval file.*curve losses"):
        run.eval_chunks()


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b"not a zip", None], ids=["truncated", "foreign", "keys"])
def test_an_unreadable_eval_chunks_file_costs_the_intervals_not_the_result(tmp_path, content):
    sweep = SweepStore(tmp_path)
    sweep.write_manifest("s", {}, ["r"], {})
    run = sweep.run("r")
    run.write_result(RunResult("r", "ok", final_eval_loss=2.0))
    path = run.root / "eval_chunks.npz"
    if content is None:   # a valid npz without the expected arrays
        np.savez(path, something=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(CorruptFileError, match="eval_chunks.npz is not a per-chunk eval file"):
        run.eval_chunks()
    (rec,) = sweep.records()
    assert rec.status == "ok" and rec.eval_chunks is None and "eval_chunks.npz" in rec.problem


def test_reset_removes_the_eval_chunks_of_an_unfinished_attempt(tmp_path):
    run = RunStore(tmp_path / "r")
    run.write_config("r", {}, {})
    run.write_eval_chunks(_chunks())
    run.reset()
    assert run.eval_chunks() is None


@pytest.mark.parametrize("status", ["failed", "corrupt"])
def test_redoing_a_run_keeps_each_attempts_metrics_beside_its_result(tmp_path, status):
    run = RunStore(tmp_path / "r")
    for attempt in (1, 2):
        run.write_config("r", {}, {})
        for step in range(3):
            run.append_metric({"kind": "train", "step": step, "loss": 10.0 * attempt + step})
        if status == "failed":
            run.write_result(RunResult("r", "failed", error=f"boom {attempt}"))
        else:
            (run.root / "result.json").write_text('{"run_id": "r", "status": "ok", "final_eval_loss": "abc"}')
        moved = run.reset()
        suffix = moved.name[len("result.json"):]
        assert suffix == (f".{status}" if attempt == 1 else f".{status}-2")
        kept = run.root / f"metrics.jsonl{suffix}"   # the full history, beside the result it belongs to
        assert [json.loads(x)["loss"] for x in kept.read_text().splitlines()] == [10.0 * attempt + s for s in range(3)]
        assert run.metrics() == []   # the redo starts a fresh history
