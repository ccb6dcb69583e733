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
from tiny_sweep import sweep, tiny_sweep, with_, write_toml


@pytest.fixture
def cfg(tiny_lm_dir, chat_jsonl, tmp_path) -> dict:
    """Two runs (standard, reversed) of two steps each."""
    return tiny_sweep(tiny_lm_dir, chat_jsonl, tmp_path / "out", name="s")


def results(out: Path) -> dict[str, dict]:
    """``lora.init -> result.json`` of every run that has one."""
    found = [json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")]
    return {r["axes"]["lora.init"]: r for r in found}


def run_dir(out: Path, init: str) -> Path:
    (d,) = [d for d in (out / "runs").iterdir() if d.name.startswith(init)]
    return d


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


def test_a_store_evaluated_on_another_held_out_pool_is_not_trained_into(cfg, tmp_path, capsys, one_thread):
    """Another transformers can tokenize the same data config into other ids: a resume there would mix datasets."""
    import numpy as np

    out = tmp_path / "out"
    assert sweep(capsys, tmp_path, cfg)[0] == 0
    chunks = run_dir(out, "standard") / "eval_chunks.npz"
    with np.load(chunks) as npz:
        arrays = {k: npz[k] for k in npz.files}
    np.savez(chunks, **{**arrays, "pool_digest": np.array("0123456789abcdef")})   # as if made elsewhere
    (run_dir(out, "reversed") / "result.json").unlink()   # reversed is left to do
    rc, _, err = sweep(capsys, tmp_path, cfg)
    assert rc == 2 and err.count("\n") == 1, err
    assert "1 finished run(s), e.g. standard" in err and "held-out pool 0123456789abcdef" in err
    assert "same package versions" in err and "--set out_dir=" in err
    assert not (run_dir(out, "reversed") / "result.json").exists()   # nothing trained, no failure recorded
    assert sweep(capsys, tmp_path, cfg, "--set", f"out_dir={tmp_path / 'fresh'}")[0] == 0   # the fix named works


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


# ---- errors that fail every run alike stop the sweep once, in the dry run too (issue 22, items 3, 4, 15) -------------

def bad_byte_copy(src: Path, dst: Path) -> Path:
    lines = src.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][:40] + b"\xff" + lines[3][40:]
    dst.write_bytes(b"".join(lines))
    return dst


ALIKE = {   # change -> fragments of the one line
    "bad model path": (lambda t: {"model.name": str(t / "no-such-model")}, ["no-such-model", "model.name"]),
    "unreadable data": (lambda t: {"data.source": str(t / "bad.jsonl")}, ["bad.jsonl:4: not UTF-8 text"]),
    "rank larger than a layer": (lambda t: {"lora.rank": 64}, ["rank 64 exceeds", "= 32"]),
    "targets typo": (lambda t: {"lora.targets": ["q_proj", "v_porj"]}, ["'v_porj' (did you mean 'v_proj'?)"]),
    "seq_len beyond the context": (lambda t: {"data.seq_len": 2048, "data.max_train_chunks": 0},
                                   ["data.seq_len=2048 is longer than the context", "1024 tokens",
                                    "data.seq_len=1024 or less"]),
}


@pytest.mark.parametrize("dry", [False, True], ids=["sweep", "dry run"])
@pytest.mark.parametrize("change,fragments", ALIKE.values(), ids=ALIKE.keys())
def test_what_fails_every_run_alike_stops_the_sweep_once(cfg, tmp_path, capsys, chat_jsonl, change, fragments, dry):
    bad_byte_copy(chat_jsonl, tmp_path / "bad.jsonl")
    rc, stdout, err = sweep(capsys, tmp_path, with_(cfg, **change(tmp_path)), *(["--dry-run"] if dry else []))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("loralab sweep: error: "), stdout + err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "out" / "sweep.json").exists() and no_result_files(tmp_path / "out")


def without_tokenizer(src: Path, dst: Path) -> Path:
    """Config and weights fine, tokenizer gone: passes every check, fails only when loaded."""
    import shutil

    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).unlink()
    return dst


def test_a_model_that_fails_to_load_stops_the_sweep_and_the_fix_starts_afresh(cfg, tmp_path, capsys, tiny_lm_dir,
                                                                                one_thread):
    bad = without_tokenizer(tiny_lm_dir, tmp_path / "no-tokenizer")
    rc, stdout, err = sweep(capsys, tmp_path, with_(cfg, **{"model.name": str(bad)}))
    assert rc == 2 and err.count("\n") == 1 and str(bad) in err and "tokenizer" in err, stdout + err
    assert no_result_files(tmp_path / "out")   # no run recorded failed: the model is at fault, not the runs
    rc, stdout, _ = sweep(capsys, tmp_path, cfg)   # the fixed config (other run ids) starts in the same out_dir
    assert rc == 0 and "done: 2 ok" in stdout, stdout


def test_a_failed_load_does_not_poison_the_next_model_of_the_grid(cfg, tmp_path, tiny_lm_dir, one_thread):
    """A grid over model.name, the bad model first: its runs stop as never started, the good one trains ok on the
    same assets (issue 22, item 3)."""
    from loralab.lab.config.grid import plan_runs
    from loralab.lab.config.toml import load_sweep
    from loralab.lab.run.assets import Assets
    from loralab.lab.store import SweepStore
    from loralab.lab.sweep.local import run_pack
    from loralab.lab.sweep.plan import SweepAbort

    bad = without_tokenizer(tiny_lm_dir, tmp_path / "no-tokenizer")
    path = write_toml(tmp_path / "sweep.toml", with_(cfg, grid={"model.name": [str(bad), str(tiny_lm_dir)]}))
    (first, second), store, assets = plan_runs(load_sweep(path)), SweepStore(tmp_path / "out"), Assets()
    with pytest.raises(SweepAbort, match="tokenizer"):
        run_pack([first], [store.run(first.run_id)], assets, progress=False)
    assert store.run(first.run_id).status() is None and store.run(first.run_id).config() is None
    (result,) = run_pack([second], [store.run(second.run_id)], assets, progress=False)
    assert result.status == "ok" and result.final_eval_loss is not None


def tiny_gpt2_dir(tiny_lm_dir: Path, path: Path, n_positions: int) -> Path:
    """A tiny GPT-2 (learned positions: a row per position, n_positions of them) with the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                                   eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("dry", [False, True], ids=["sweep", "dry run"])
def test_seq_len_beyond_learned_positions_stops_the_sweep(cfg, tmp_path, capsys, tiny_lm_dir, dry):
    """GPT-2 with 64 positions and seq_len 128: every run used to fail with IndexError, and --dry-run passed."""
    gpt2 = tiny_gpt2_dir(tiny_lm_dir, tmp_path / "gpt2", n_positions=64)
    capsys.readouterr()   # save_pretrained's progress bar
    change = {"model.name": str(gpt2), "lora.targets": ["c_attn"], "data.seq_len": 128, "data.max_train_chunks": 0}
    rc, stdout, err = sweep(capsys, tmp_path, with_(cfg, **change), *(["--dry-run"] if dry else []))
    assert rc == 2 and err.count("\n") == 1, stdout + err
    assert "data.seq_len=128 is longer than the context" in err and "64 tokens" in err
    assert no_result_files(tmp_path / "out")


def test_a_4bit_sweep_trains_packed_runs_to_ok_beside_the_float_ones(cfg, tmp_path, capsys, one_thread):
    """model.quantize as a grid axis: the nf4 runs pack together (pack = 2) on their own base, train to ok with
    periodic and per-chunk evals, and get other ids; the float runs keep the ids they had without the field."""
    pytest.importorskip("bitsandbytes")
    from loralab.lab.config.grid import plan_runs
    from loralab.lab.config.toml import parse_sweep

    cfg = {**cfg, "pack": 2, "grid": {"model.quantize": ["none", "nf4"], "lora.init": ["standard", "reversed"]}}
    rc, stdout, _ = sweep(capsys, tmp_path, cfg)
    assert rc == 0, stdout
    found = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*/result.json")]
    by = {(r["axes"]["model.quantize"], r["axes"]["lora.init"]): r for r in found}
    assert len(by) == 4 and {r["status"] for r in found} == {"ok"}
    assert {r["pack_size"] for r in found} == {2}  # a 4-bit pack and a float pack, never mixed
    for init in ("standard", "reversed"):
        four_bit, dense = by[("nf4", init)], by[("none", init)]
        assert four_bit["final_eval_loss"] != dense["final_eval_loss"]  # another base...
        assert abs(four_bit["final_eval_loss"] - dense["final_eval_loss"]) < 0.5  # ... of the same model
        store = tmp_path / "out" / "runs" / four_bit["run_id"]
        evals = [m for m in map(json.loads, (store / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "eval"]
        assert [m["step"] for m in evals] == [0, 2]
        assert (store / "eval_chunks.npz").is_file()
    float_only = parse_sweep({**cfg, "grid": {"lora.init": ["standard", "reversed"]}})
    hashes = {r.run_id.rsplit("-", 1)[1] for r in plan_runs(float_only)}
    assert {r["run_id"].rsplit("-", 1)[1] for k, r in by.items() if k[0] == "none"} == hashes
    assert not hashes & {r["run_id"].rsplit("-", 1)[1] for k, r in by.items() if k[0] == "nf4"}
