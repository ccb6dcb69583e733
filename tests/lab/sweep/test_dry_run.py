"""``loralab sweep CFG --dry-run``: bad input fails in seconds, before any weight is loaded, with exit code 2 and a
message that names the problem (no traceback); a valid dry run lists every run id and trains nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab.cli import main
from loralab.lab.config.grid import plan_runs
from loralab.lab.config.toml import load_sweep
from loralab.lab.config.typecheck import to_dict
from loralab.lab.run import assets as assets_mod
from loralab.lab.run import data as data_mod
from loralab.lab.run import models as models_mod
from loralab.lab.run import train as train_mod
from loralab.lab.store import RunResult, SweepStore
from tiny_sweep import tiny_sweep, with_, write_toml

FAST_S = 10.0   # a dry run reads configs, not weights; a hub lookup with retries would take ~25 s


@pytest.fixture
def valid(tiny_lm_dir, chat_jsonl, tmp_path) -> dict:
    """A valid 2 × 2 sweep of the tiny model, as the dict its TOML file holds."""
    return tiny_sweep(tiny_lm_dir, chat_jsonl, tmp_path / "out", name="dry",
                      grid={"lora.init": ["standard", "reversed"], "train.lr": [1e-4, 1e-3]})


def write(tmp_path: Path, cfg: dict) -> Path:
    return write_toml(tmp_path / "sweep.toml", cfg)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Make loading weights or data, or training, an error: a dry run must do none of them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a dry run loaded weights or data, or trained")

    for module in (models_mod, assets_mod):
        monkeypatch.setattr(module, "load_model", forbidden)
    for module in (data_mod, assets_mod):
        monkeypatch.setattr(module, "load_data", forbidden)
    monkeypatch.setattr(train_mod, "train_pack", forbidden)


def dry(capsys, path: Path) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    rc = main(["sweep", str(path), "--dry-run"])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return rc, out, err, elapsed


def results_under(root: Path) -> list[Path]:
    return list(root.rglob("result.json")) + list(root.rglob("metrics.jsonl"))


# ---- a valid dry run -----------------------------------------------------------------------------------------------

def test_valid_dry_run_lists_every_run_and_trains_nothing(valid, tmp_path, capsys, nothing_loads):
    path = write(tmp_path, valid)
    rc, out, err, elapsed = dry(capsys, path)
    assert rc == 0, err
    ids = [job.run_id for job in plan_runs(load_sweep(path))]
    assert len(ids) == 4
    listed = [line.split()[1] for line in out.splitlines() if line.startswith("  todo ")]
    assert listed == ids
    assert "ok: 4 runs to train, 0 already finished" in out
    assert "4 modules match" in out   # 2 layers × (q_proj, v_proj), checked on the meta-device skeleton
    assert results_under(tmp_path) == []
    assert not (tmp_path / "out" / "sweep.json").exists()   # nothing written to the store either
    assert elapsed < FAST_S


def test_dry_run_marks_finished_runs(valid, tmp_path, capsys, nothing_loads):
    path = write(tmp_path, valid)
    sweep = load_sweep(path)
    jobs = plan_runs(sweep)
    store = SweepStore(sweep.out_dir)
    store.write_manifest(sweep.name, sweep.grid, [j.run_id for j in jobs], {})
    store.run(jobs[1].run_id).write_result(RunResult(run_id=jobs[1].run_id, status="diverged", axes=jobs[1].axes))
    rc, out, _, _ = dry(capsys, path)
    assert rc == 0
    marks = {line.split()[1]: line.split()[0] for line in out.splitlines() if line.startswith("  ")
             and line.split()[0] in ("todo", "done")}
    assert marks == {j.run_id: "done" if i == 1 else "todo" for i, j in enumerate(jobs)}
    assert "ok: 3 runs to train, 1 already finished" in out


# ---- bad input: exit code 2, a message naming the problem, in seconds ------------------------------------------------

BAD = {
    "unknown key": ({"train.lrr": 1e-3}, ["'train.lrr'", "did you mean 'lr'"]),
    "zero lr": ({"train.lr": 0.0, "grid": {"lora.init": ["standard", "reversed"]}}, ["lr", "positive"]),
    "negative lr": ({"train.lr": -1e-3, "grid": {"lora.init": ["standard", "reversed"]}}, ["lr", "positive"]),
    "zero lr in the grid": ({"grid": {"train.lr": [1e-3, 0.0]}}, ["lr", "positive"]),
    "unknown init": ({"grid": {"lora.init": ["standard", "kaiming-he"]}}, ["'kaiming-he'", "valid schemes",
                                                                            "reversed"]),
    "odd rank, orthogonal init": ({"lora.rank": 3, "grid": {"lora.init": ["standard", "orthogonal-qr-match"]}},
                                  ["orthogonal-qr-match", "even rank", "rank 3"]),
    "rank too big": ({"lora.rank": 64, "lora.targets": ["q_proj"]}, ["rank 64", "q_proj", "32"]),
    "unknown executor": ({"executor": "slurm"}, ["executor", "'slurm'", "local"]),
    "catastrophic targets regex": ({"lora.targets": "(.*.*)*z"}, ["lora: ", "'(.*.*)*z'", "exponential time"]),
    "1 MB targets regex": ({"lora.targets": "q" * 1_000_000}, ["lora: ", "is 1,000,000 characters long"]),
    "1 MB string for a number": ({"train.lr": "1" * 1_000_000}, ["train.lr: expected float", "more characters"]),
    "1 MB init name": ({"grid": {"lora.init": ["standard", "i" * 1_000_000]}}, ["unknown init", "valid schemes"]),
}


@pytest.mark.parametrize("change,fragments", BAD.values(), ids=BAD.keys())
def test_bad_input_fails_fast_naming_the_problem(valid, tmp_path, capsys, nothing_loads, change, fragments, deadline):
    path = write(tmp_path, with_(valid, **change))
    deadline(2 * FAST_S)   # a regex that backtracks for ever must fail, not hang
    rc, out, err, elapsed = dry(capsys, path)
    assert rc == 2, out + err
    assert err.startswith("loralab sweep: error: ") and err.count("\n") == 1   # one line, no traceback
    for fragment in fragments:
        assert fragment in err
    assert len(err) < 4100   # user input is quoted clipped, never whole
    assert elapsed < FAST_S
    assert results_under(tmp_path) == []


def test_missing_model_directory(valid, tmp_path, capsys, nothing_loads):
    missing = tmp_path / "models" / "no-such-model"
    rc, _, err, elapsed = dry(capsys, write(tmp_path, with_(valid, **{"model.name": str(missing)})))
    assert rc == 2
    assert str(missing) in err and "model.name" in err
    assert elapsed < FAST_S


def test_model_directory_without_a_model(valid, tmp_path, capsys, nothing_loads):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    rc, _, err, _ = dry(capsys, write(tmp_path, with_(valid, **{"model.name": str(empty)})))
    assert rc == 2
    assert str(empty) in err and "config.json" in err


def test_missing_dataset_file(valid, tmp_path, capsys, nothing_loads):
    missing = tmp_path / "data" / "nope.jsonl"
    rc, out, err, elapsed = dry(capsys, write(tmp_path, with_(valid, **{"data.source": str(missing)})))
    assert rc == 2
    assert str(missing) in err and "no such file" in err
    assert elapsed < FAST_S


def test_missing_config_file(tmp_path, capsys):
    rc, _, err, _ = dry(capsys, tmp_path / "nope.toml")
    assert rc == 2 and "nope.toml" in err


@pytest.fixture
def no_ray(monkeypatch):
    """Make ``import ray`` fail as it does where Ray is not installed."""
    monkeypatch.setitem(sys.modules, "ray", None)


@pytest.mark.parametrize("where", ["flag", "config"])
def test_ray_executor_without_ray_fails_the_dry_run(valid, tmp_path, capsys, nothing_loads, no_ray, where):
    """Without Ray, ``--executor ray`` (or ``executor = "ray"``) must fail the dry run naming the install, not
    answer "ok" and leave the real run to fail."""
    path = write(tmp_path, with_(valid, executor="ray") if where == "config" else valid)
    rc, out, err, _ = dry(capsys, path) if where == "config" else \
        (main(["sweep", str(path), "--dry-run", "--executor", "ray"]), *capsys.readouterr(), 0.0)
    assert rc == 2, out
    assert "pip install 'loralab[ray]'" in err and "--executor local" in err
    assert "ok:" not in out


@pytest.mark.parametrize("where", ["flag", "config"])
def test_dry_run_accepts_the_ray_executor_when_ray_is_installed(valid, tmp_path, capsys, nothing_loads, where):
    ray = pytest.importorskip("ray")
    was_running = ray.is_initialized()
    path = write(tmp_path, with_(valid, executor="ray") if where == "config" else valid)
    rc = main(["sweep", str(path), "--dry-run", *(["--executor", "ray"] if where == "flag" else [])])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "ok: 4 runs to train" in out
    assert ray.is_initialized() == was_running   # a dry run starts no Ray
    assert results_under(tmp_path) == []


def test_executor_flags(valid, tmp_path, capsys, nothing_loads, no_ray):
    path = write(tmp_path, valid)
    assert main(["sweep", str(path), "--executor", "ray"]) == 2   # Ray missing: said, not a crash mid-sweep
    assert "pip install 'loralab[ray]'" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run", "--executor", "local"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(path), "--dry-run", "--executor", "slurm"])
    assert e.value.code == 2 and "invalid choice: 'slurm'" in capsys.readouterr().err
    assert results_under(tmp_path) == []


@pytest.mark.parametrize("backend,module", [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_tracker_whose_package_is_missing_fails_before_training(valid, tmp_path, capsys, monkeypatch, nothing_loads,
                                                                   backend, module):
    """``tracking.backend=wandb`` without wandb: one line with the install command, in the dry run and before the
    real sweep trains or writes anything (exit 2)."""
    monkeypatch.setitem(sys.modules, module, None)   # ``import wandb`` fails as it does where it is not installed
    path = write(tmp_path, valid)
    for extra in (["--dry-run"], []):
        rc = main(["sweep", str(path), "--set", f"tracking.backend={backend}", *extra])
        out, err = capsys.readouterr()
        assert rc == 2, out
        assert f"pip install 'loralab[{backend}]'" in err and "tracking.backend=none" in err
        assert len(err.strip().splitlines()) == 1 and "ok:" not in out
    assert results_under(tmp_path) == [] and not (tmp_path / "out" / "sweep.json").exists()


# ---- through the real entry point --------------------------------------------------------------------------------

@pytest.mark.parametrize("change,fragment", [({"train.lrr": 1e-3}, "train.lrr"),
                                             ({"lora.rank": 64, "lora.targets": ["q_proj"]}, "rank 64")],
                         ids=["config error", "model check error"])
def test_subprocess_exit_code_and_no_traceback(valid, tmp_path, change, fragment):
    path = write(tmp_path, with_(valid, **change))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "loralab", "sweep", str(path), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert fragment in proc.stderr
    assert results_under(tmp_path) == []


# ---- what is no run's fault: caught by the dry run, before any training --------------------------------------------

def one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("loralab sweep: error: ") and err.count("\n") == 1, err   # one line, no traceback
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_dry_run_catches_a_missing_cuda_device(valid, tmp_path, capsys, nothing_loads):
    rc, out, err, _ = dry(capsys, write(tmp_path, with_(valid, **{"train.device": "cuda"})))
    assert rc == 2 and "ok:" not in out
    one_line_error(err, "train.device='cuda'", "no CUDA device", "train.device=auto")


def test_dry_run_catches_data_too_small_for_one_micro_batch(valid, tmp_path, capsys, nothing_loads):
    cfg = with_(valid, **{"data.max_train_chunks": 3, "train.batch_size": 4})
    rc, out, err, _ = dry(capsys, write(tmp_path, cfg))
    assert rc == 2 and "ok:" not in out
    one_line_error(err, "data.max_train_chunks keeps 3 chunks", "= 4", "raise data.max_train_chunks")
    # accumulation cycles through the data: 3 chunks can feed steps of 2 micro-batches of 2
    cfg = with_(valid, **{"data.max_train_chunks": 3, "train.batch_size": 2, "train.grad_accum": 2})
    rc, out, err, _ = dry(capsys, write(tmp_path, cfg))
    assert rc == 0 and "ok:" in out


def test_dry_run_catches_an_out_dir_that_is_a_file(valid, tmp_path, capsys, nothing_loads):
    (tmp_path / "taken").write_text("")
    for out_dir in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        rc, out, err, _ = dry(capsys, write(tmp_path, with_(valid, out_dir=str(out_dir))))
        assert rc == 2 and "ok:" not in out
        one_line_error(err, f"out_dir {out_dir}", "file")


def test_dry_run_expands_home_in_out_dir(valid, tmp_path, capsys, nothing_loads, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rc, out, err, _ = dry(capsys, write(tmp_path, with_(valid, out_dir="~/runs/x")))
    assert rc == 0, err
    assert f"-> {tmp_path / 'home' / 'runs' / 'x'}:" in out
    assert not list(tmp_path.rglob("~"))


def test_dry_run_checks_the_store_manifest_like_the_real_run(valid, tmp_path, capsys, nothing_loads):
    """A store made by another config: the dry run fails as the real run would, naming the field that differs."""
    path = write(tmp_path, valid)
    sweep = load_sweep(path)
    jobs = plan_runs(sweep)
    SweepStore(sweep.out_dir).write_manifest(sweep.name, sweep.grid, [j.run_id for j in jobs], to_dict(sweep.base))
    assert dry(capsys, path)[0] == 0   # the same config: resumable
    rc, out, err, _ = dry(capsys, write(tmp_path, with_(valid, **{"train.max_steps": 3})))
    assert rc == 2 and "ok:" not in out
    one_line_error(err, "train.max_steps: 2 in the store, 3 now", "new out_dir", "the config it was made with")


def test_dry_run_marks_failed_runs_to_redo(valid, tmp_path, capsys, nothing_loads):
    path = write(tmp_path, valid)
    jobs = plan_runs(load_sweep(path))
    store = SweepStore(load_sweep(path).out_dir)
    store.run(jobs[0].run_id).write_result(RunResult(run_id=jobs[0].run_id, status="failed", error="boom"))
    store.run(jobs[1].run_id).write_result(RunResult(run_id=jobs[1].run_id, status="ok"))
    rc, out, _, _ = dry(capsys, path)
    assert rc == 0
    assert f"  redo {jobs[0].run_id}" in out and f"  done {jobs[1].run_id}" in out
    assert "ok: 3 runs to train, 1 already finished; 1 failed before" in out


def test_address_needs_the_ray_executor(valid, tmp_path, capsys, nothing_loads):
    rc = main(["sweep", str(write(tmp_path, valid)), "--dry-run", "--address", "127.0.0.1:6379"])
    out, err = capsys.readouterr()
    assert rc == 2 and "ok:" not in out
    one_line_error(err, "--address needs --executor ray")


def test_ray_dry_run_checks_the_address(valid, tmp_path, capsys, nothing_loads):
    pytest.importorskip("ray")
    with socket.socket() as s:   # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        rc = main(["sweep", str(write(tmp_path, valid)), "--dry-run", "--executor", "ray",
                   "--address", f"127.0.0.1:{port}"])
    out, err = capsys.readouterr()
    assert rc == 2 and "ok:" not in out
    one_line_error(err, f"no Ray cluster answers at '127.0.0.1:{port}'", "ray start --head")


# ---- a 4-bit base (model.quantize) ---------------------------------------------------------------------------------

def test_dry_run_checks_a_4bit_base_and_names_a_missing_bitsandbytes(valid, tmp_path, capsys, nothing_loads,
                                                                    monkeypatch):
    pytest.importorskip("bitsandbytes")
    cfg = with_(valid, **{"model.quantize": "nf4"})
    rc, out, err, _ = dry(capsys, write(tmp_path, cfg))
    assert rc == 0, err
    assert "nf4 4-bit base (bitsandbytes" in out and "on cpu" in out  # probed on the runs' device
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    rc, out, err, _ = dry(capsys, write(tmp_path, cfg))
    assert rc == 2 and "ok:" not in out
    one_line_error(err, "model.quantize='nf4' needs bitsandbytes", "pip install 'loralab[bnb]'",
                   'model.quantize = "none"')


def test_dry_run_refuses_a_base_rewriting_init_on_a_4bit_base(valid, tmp_path, capsys, nothing_loads):
    cfg = with_(valid, **{"model.quantize": "fp4", "grid": {"lora.init": ["standard", "pissa"]}})
    rc, out, err, _ = dry(capsys, write(tmp_path, cfg))
    assert rc == 2 and "ok:" not in out
    one_line_error(err, "pissa, which rewrites the base weight", "model.quantize = 'fp4'", 'model.quantize = "none"')
