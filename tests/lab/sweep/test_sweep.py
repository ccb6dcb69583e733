"""``loralab sweep`` in this process on the tiny model (2 steps per run): failed runs make the command exit 1 and are
redone on resume; unreadable results are moved aside and redone; errors that are no run's fault stop the sweep with
exit 2 and one line, leaving no ``failed`` results; one sweep at a time per out_dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loralab.cli import main
from loralab.lab.run import train as train_mod

from test_dry_run import toml_text, with_


@pytest.fixture
def cfg(tiny_lm_dir, chat_jsonl, tmp_path) -> dict:
    """Two runs (standard, reversed) of two steps each."""
    return {"name": "s", "out_dir": str(tmp_path / "out"), "model": {"name": str(tiny_lm_dir)},
            "data": {"source": str(chat_jsonl), "seq_len": 32, "max_train_chunks": 8, "max_eval_chunks": 2},
            "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]},
            "train": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "device": "cpu"},
            "grid": {"lora.init": ["standard", "reversed"]}}


def sweep(capsys, tmp_path: Path, cfg: dict, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "sweep.toml"
    path.write_text(toml_text(cfg), encoding="utf-8")
    rc = main(["sweep", str(path), "--no-progress", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def results(out: Path) -> dict[str, dict]:
    """``lora.init -> result.json`` of every run that has one."""
    found = [json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")]
    return {r["axes"]["lora.init"]: r for r in found}


def run_dir(out: Path, init: str) -> Path:
    (d,) = [d for d in (out / "runs").iterdir() if d.name.startswith(init)]
    return d


@pytest.fixture
def reversed_fails(monkeypatch):
    """``reversed`` runs raise in training, as a run with a bug would."""
    original = train_mod.train_pack

    def train_pack(specs, stores, **kwargs):
        if any(s.run.lora.init == "reversed" for s in specs):
            raise RuntimeError("boom in reversed")
        return original(specs, stores, **kwargs)

    monkeypatch.setattr(train_mod, "train_pack", train_pack)
    return monkeypatch


def test_a_failed_run_exits_1_and_is_redone_on_resume(cfg, tmp_path, capsys, reversed_fails, one_thread):
    out = tmp_path / "out"
    rc, stdout, _ = sweep(capsys, tmp_path, cfg)
    assert rc == 1, stdout
    assert "FAILED: 1 of 2 runs failed" in stdout.strip().splitlines()[-1]   # said in the last line
    assert {k: r["status"] for k, r in results(out).items()} == {"standard": "ok", "reversed": "failed"}
    standard = (run_dir(out, "standard") / "result.json").read_bytes()

    reversed_fails.undo()   # the bug is fixed: rerun the same command
    rc, stdout, _ = sweep(capsys, tmp_path, cfg)
    assert rc == 0, stdout
    assert "2 runs, 1 already finished, 1 to run (1 of them failed before: redoing them)" in stdout
    assert "done: 2 ok" in stdout.strip().splitlines()[-1]
    assert {k: r["status"] for k, r in results(out).items()} == {"standard": "ok", "reversed": "ok"}
    assert (run_dir(out, "standard") / "result.json").read_bytes() == standard   # a result is never redone
    old = json.loads((run_dir(out, "reversed") / "result.json.failed").read_text())   # moved aside, not deleted
    assert old["status"] == "failed" and old["error"] == "RuntimeError: boom in reversed"

    rc, stdout, _ = sweep(capsys, tmp_path, cfg)   # diverged and ok runs are results: nothing left to do
    assert rc == 0 and "2 runs, 2 already finished, 0 to run" in stdout


def test_an_unreadable_result_is_reported_as_unfinished_then_redone(cfg, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    assert sweep(capsys, tmp_path, cfg)[0] == 0
    bad = {"standard": '{"run_id": "x", "status": "ok", "final_eval_loss": 2.\x01', "reversed": "[1, 2]"}
    for init, text in bad.items():
        (run_dir(out, init) / "result.json").write_text(text)

    assert main(["report", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    md = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "**2 runs**: 2 unfinished" in md
    for init in bad:
        assert str(run_dir(out, init) / "result.json") in md

    rc, stdout, _ = sweep(capsys, tmp_path, cfg)
    assert rc == 0, stdout
    assert "2 runs, 0 already finished, 2 to run" in stdout
    for init, text in bad.items():
        d = run_dir(out, init)
        assert f"warning: {d / 'result.json'} could not be read; moved aside to result.json.corrupt" in stdout
        assert (d / "result.json.corrupt").read_text() == text
    assert {k: r["status"] for k, r in results(out).items()} == {"standard": "ok", "reversed": "ok"}


def test_an_unreadable_manifest_is_named(cfg, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sweep.json").write_text('{"name": "s", "run_')
    rc, _, err = sweep(capsys, tmp_path, cfg)
    assert rc == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'out' / 'sweep.json'} is not valid JSON" in err


def no_result_files(out: Path) -> bool:
    return not list(out.rglob("result.json*")) and not list(out.rglob("config.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_stops_the_sweep(cfg, tmp_path, capsys):
    rc, stdout, err = sweep(capsys, tmp_path, with_(cfg, **{"train.device": "cuda"}))
    assert rc == 2 and err.count("\n") == 1, err
    assert "train.device='cuda'" in err and "no CUDA device" in err
    assert no_result_files(tmp_path / "out")   # no run recorded failed: the runs are not at fault


@pytest.mark.parametrize("change,fragment", [
    ({"data.max_train_chunks": 1, "train.batch_size": 4}, "data.max_train_chunks keeps 1 chunks"),   # before loading
    ({"data.max_train_chunks": 0, "train.batch_size": 2000}, "the training data has")],   # once tokenized
    ids=["capped", "all"])
def test_data_too_small_for_one_batch_stops_the_sweep(cfg, tmp_path, capsys, one_thread, change, fragment):
    rc, stdout, err = sweep(capsys, tmp_path, with_(cfg, **change))
    assert rc == 2 and err.count("\n") == 1, err
    assert fragment in err and "raise data.max_train_chunks" in err
    assert no_result_files(tmp_path / "out")   # no run recorded failed


def test_more_eval_chunks_than_held_out_stops_the_sweep(cfg, tmp_path, capsys, one_thread):
    change = {"data.max_eval_chunks": 0, "data.val_chunks": 400, "data.test_chunks": 400}
    rc, stdout, err = sweep(capsys, tmp_path, with_(cfg, **change))
    assert rc == 2 and err.count("\n") == 1, err
    assert "data.val_chunks=400 + data.test_chunks=400 is more than the" in err
    assert no_result_files(tmp_path / "out")   # no run recorded failed


def test_an_out_dir_that_is_a_file_stops_the_sweep(cfg, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    rc, _, err = sweep(capsys, tmp_path, cfg, "--set", f"out_dir={tmp_path / 'taken'}")
    assert rc == 2 and err.count("\n") == 1 and f"out_dir {tmp_path / 'taken'} is an existing file" in err


def test_a_second_sweep_on_the_same_out_dir_is_refused(cfg, tmp_path, capsys):
    from loralab.lab.sweep.lock import LOCK

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])   # a live sweep's pid
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / LOCK).write_text(f"{other.pid}\n")
        rc, _, err = sweep(capsys, tmp_path, cfg)
    finally:
        other.kill()
        other.wait()
    assert rc == 2 and err.count("\n") == 1, err
    assert f"another sweep (pid {other.pid}) is writing to {tmp_path / 'out'}" in err
    assert not (tmp_path / "out" / "sweep.json").exists() and not (tmp_path / "out" / "runs").exists()


def test_without_sweep_json_another_config_is_refused_and_the_same_one_resumes(cfg, tmp_path, capsys, one_thread):
    """sweep.json deleted by hand or lost in a copy: the run directories still tell which config made the store
    (issue 22, item 1)."""
    out = tmp_path / "out"
    assert sweep(capsys, tmp_path, cfg)[0] == 0
    before = sorted(p.name for p in (out / "runs").iterdir())
    (out / "sweep.json").unlink()
    for extra in ((), ("--dry-run",)):
        rc, _, err = sweep(capsys, tmp_path, cfg, "--set", "train.max_steps=3", *extra)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{out / 'sweep.json'} is missing" in err and "train.max_steps: 2 in the run, 3 in the sweep" in err
        assert "use a new out_dir" in err
    assert sorted(p.name for p in (out / "runs").iterdir()) == before and not (out / "sweep.json").exists()
    rc, stdout, _ = sweep(capsys, tmp_path, cfg)   # the config the runs were made with: resumes, nothing redone
    assert rc == 0 and "2 runs, 2 already finished, 0 to run" in stdout
    assert (out / "sweep.json").exists()
