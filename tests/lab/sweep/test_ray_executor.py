"""The Ray executor (``loralab sweep CFG --executor ray``) on a small CPU-only Ray started inside the tests.

Worker deaths are real: a ``worker_process_setup_hook`` (:func:`_worker_hook`) wraps ``train_pack`` in every Ray
worker so that it logs each start of a run to a file and, for the runs that ``kill.json`` names, SIGKILLs its own
worker process right after the first training step. The start log is how "none trained twice" is checked. The
Ctrl-C test runs the CLI in a subprocess that starts its own local Ray (no ``--address``), as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_e2e import HUGE_LR, MAX_STEPS, SMALL_LR, env, loralab, midway, read_jsonl, run_dirs, write_config

from loralab.cli import main
from loralab.lab.config.grid import RunSpec, plan_runs
from loralab.lab.config.schema import SweepConfig
from loralab.lab.config.toml import load_sweep
from loralab.lab.store import RunResult, RunStore, SweepStore
from loralab.lab.sweep.plan import SweepPlan
from loralab.lab.sweep.run import make_executor

HERE = Path(__file__).resolve().parent
CONTROL = "LORALAB_TEST_RAY_CONTROL"   # env var, in the workers: the directory with kill.json and starts.log


def _worker_hook() -> None:
    """Runs in each Ray worker before its first task: instrument ``train_pack`` (see the module docstring)."""
    from loralab.lab.run import train

    control, original = Path(os.environ[CONTROL]), train.train_pack

    class DyingStore(RunStore):
        def append_metric(self, record):
            super().append_metric(record)
            if record.get("kind") == "train":   # mid-run: config, step-0 eval and one step are on disk
                os.kill(os.getpid(), signal.SIGKILL)

    def train_pack(specs, stores, **kwargs):
        (spec,), (store,) = specs, stores   # Ray trains one run per task
        with open(control / "starts.log", "a") as f:
            f.write(spec.run_id + "\n")
        rule = json.loads((control / "kill.json").read_text())
        attempt = (control / "starts.log").read_text().split().count(spec.run_id)
        if rule["match"] and rule["match"] in spec.run_id and attempt <= rule["times"]:
            store = DyingStore(store.root)
        return original([spec], [store], **kwargs)

    train.train_pack = train_pack


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A 2-CPU Ray in this process whose workers run :func:`_worker_hook` (importing this module and the tests'
    helpers: both directories on their path); the CLI reuses the connection."""
    ray = pytest.importorskip("ray")
    control = tmp_path_factory.mktemp("ray-control")
    path = os.pathsep.join(map(str, (HERE, HERE.parents[1])))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {CONTROL: str(control), "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
                                       "TOKENIZERS_PARALLELISM": "false"},
                          "worker_process_setup_hook": f"{Path(__file__).stem}._worker_hook"})
    yield control
    ray.shutdown()


def kill_rule(control: Path, match: str, times: int) -> None:
    """Workers kill themselves in runs whose id contains ``match``, on their first ``times`` attempts."""
    (control / "kill.json").write_text(json.dumps({"match": match, "times": times}))
    (control / "starts.log").write_text("")


def starts(control: Path) -> Counter:
    return Counter((control / "starts.log").read_text().split())


def check_run(d: Path) -> dict:
    """``d`` finished with one clean metrics stream (one attempt's lines only); returns its result."""
    result = json.loads((d / "result.json").read_text())
    assert result["run_id"] == d.name and (d / "config.json").exists()
    if result["status"] == "failed":
        assert result["error"] and result["traceback"], result
        return result
    metrics = read_jsonl(d / "metrics.jsonl")
    train = [m["step"] for m in metrics if m["kind"] == "train"]
    evals = [m["step"] for m in metrics if m["kind"] == "eval"]
    assert train == list(range(1, result["steps"] + 1)), d.name   # each step once: no second attempt appended
    assert evals.count(0) == 1 and evals == sorted(set(evals)), d.name
    return result


def sweep_cmd(cfg: Path, *extra: str) -> list[str]:
    return ["sweep", str(cfg), "--executor", "ray", "--no-progress", *extra]


# ---- without Ray ---------------------------------------------------------------------------------------------------

def test_without_ray_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # what `import ray` sees when Ray is not installed
    with pytest.raises(ValueError, match=r"pip install 'loralab\[ray\]'"):
        make_executor(SweepPlan(SweepConfig(name="r", out_dir="unused"), ()), "ray")


# ---- the store without shared storage, and Ray giving up: no cluster needed ---------------------------------------

def test_results_are_gathered_to_a_driver_without_shared_storage(tiny_lm_dir, chat_jsonl, tmp_path):
    pytest.importorskip("ray")
    from loralab.lab.sweep.ray_executor import _gather, _run_one

    cfg = write_config(tmp_path / "sweep.toml", tmp_path / "out", tiny_lm_dir, chat_jsonl)
    job = plan_runs(load_sweep(cfg, ["grid.train.lr=[0.001]", "grid.lora.init=['standard']"]))[0]
    worker_disk, driver_disk = tmp_path / "worker", tmp_path / "driver"
    snapshot = _run_one(job, str(worker_disk), False)   # the task body, as a worker with its own disk runs it
    result = _gather(SweepStore(driver_disk).run(job.run_id), snapshot)
    assert result.status == "ok" and result.steps == MAX_STEPS
    worker_run, driver_run = RunStore(worker_disk / "runs" / job.run_id), RunStore(driver_disk / "runs" / job.run_id)
    for read in (RunStore.config, RunStore.metrics, RunStore.diagnostics, RunStore.eval_chunks, RunStore.adapter_files,
                 RunStore.result):
        assert read(driver_run) == read(worker_run) and read(driver_run), read.__name__
    assert result.adapter and "adapter_model.safetensors" in driver_run.adapter_files()   # the trained adapter too
    assert _run_one(job, str(worker_disk), False) == snapshot   # a finished run is returned, not trained again


def test_a_task_ray_gave_up_on_is_recorded_failed_once(tmp_path):
    ray = pytest.importorskip("ray")
    from loralab.lab.config.schema import RunConfig
    from loralab.lab.sweep.ray_executor import _record_failure

    job = RunSpec("run-1", {"train.lr": 0.1}, RunConfig())
    run = SweepStore(tmp_path).run(job.run_id)
    result = _record_failure(run, job, ray.exceptions.WorkerCrashedError(), max_retries=2)
    assert result.status == "failed" and result.error.startswith("WorkerCrashedError (Ray gave up, max_retries=2)")
    assert "died" in result.error and run.config()["run_id"] == "run-1" and run.result().status == "failed"
    before = (run.root / "result.json").read_bytes()
    _record_failure(run, job, ray.exceptions.TaskCancelledError(), max_retries=2)   # a result is written once
    assert (run.root / "result.json").read_bytes() == before


def test_a_task_redoes_a_failed_run_and_the_driver_keeps_one_result(tiny_lm_dir, chat_jsonl, tmp_path):
    """The same finished-ness rule as the local executor: a failed result is no reason to skip a run."""
    pytest.importorskip("ray")
    from loralab.lab.sweep.ray_executor import _gather, _run_one

    cfg = write_config(tmp_path / "sweep.toml", tmp_path / "out", tiny_lm_dir, chat_jsonl)
    job = plan_runs(load_sweep(cfg, ["grid.train.lr=[0.001]", "grid.lora.init=['standard']",
                                     "train.max_steps=2"]))[0]
    run = SweepStore(tmp_path / "shared").run(job.run_id)
    run.write_result(RunResult(job.run_id, "failed", error="an old failure"))
    snapshot = _run_one(job, str(tmp_path / "shared"), False)   # a worker: trains it, the old result moved aside
    assert snapshot["result"]["status"] == "ok"
    assert json.loads((run.root / "result.json.failed").read_text())["error"] == "an old failure"
    assert _gather(run, snapshot).status == "ok"   # the driver on the same (shared) storage: nothing to rewrite
    assert sorted(p.name for p in run.root.glob("result.json*")) == ["result.json", "result.json.failed"]


def test_the_driver_takes_the_sweep_lock(tmp_path):
    pytest.importorskip("ray")
    from loralab.lab.config.schema import RunConfig
    from loralab.lab.sweep.lock import LOCK, SweepLockedError
    from loralab.lab.sweep.ray_executor import RayExecutor

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(f"{other.pid}\n")
        with pytest.raises(SweepLockedError, match=f"another sweep \\(pid {other.pid}\\)"):
            RayExecutor(address="127.0.0.1:1").run([RunSpec("r", {}, RunConfig())], SweepStore(tmp_path))
    finally:
        other.kill()
        other.wait()


def test_ray_gave_up_after_the_worker_wrote_a_failed_result(tmp_path):
    ray = pytest.importorskip("ray")
    from loralab.lab.config.schema import RunConfig
    from loralab.lab.sweep.ray_executor import _record_failure

    job = RunSpec("run-1", {}, RunConfig())
    run = SweepStore(tmp_path).run(job.run_id)
    run.write_result(RunResult("run-1", "failed", error="ValueError: the worker's own"))
    result = _record_failure(run, job, ray.exceptions.WorkerCrashedError(), max_retries=2)
    assert result.error == "ValueError: the worker's own"   # written once: the worker's result stands


# ---- on a local Ray cluster ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs workers without CUDA")
def test_a_missing_device_on_a_worker_stops_the_sweep(ray_cluster, tiny_lm_dir, chat_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "sweep.toml", out, tiny_lm_dir, chat_jsonl)
    kill_rule(ray_cluster, "", times=0)
    assert main(sweep_cmd(cfg, "--set", "train.device=cuda")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.device='cuda'" in err and "on a Ray worker" in err, err
    assert not list(out.rglob("result.json"))   # no run recorded failed: none was at fault

@pytest.mark.slow
def test_ctrl_c_leaves_the_store_consistent_and_a_rerun_resumes(tiny_lm_dir, chat_jsonl, tmp_path):
    """Through ``python -m loralab`` with no address (it starts, then stops, its own local Ray). Two short runs go
    first and two long ones after, so SIGINT lands with runs finished and runs in progress."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "sweep.toml", out, tiny_lm_dir, chat_jsonl)
    cmd = loralab(*sweep_cmd(cfg, "--set", "grid.train.lr=[0.001]", "--set", "grid.train.max_steps=[6, 400]",
                             "--set", "train.eval_every=200"))
    quiet = {k: v for k, v in env().items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=quiet)
    try:
        deadline = time.monotonic() + 600  # a bound on the wait, not a timing: a loaded machine is slow to get there
        while not midway(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the sweep ended before Ctrl-C:\n" + (tmp_path / "first.log").read_text()
        assert midway(out), "no run finished in 600 s:\n" + (tmp_path / "first.log").read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, (tmp_path / "first.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (tmp_path / "first.log").read_text()
    assert "interrupted" in first and "Traceback" not in first
    finished = {d.name: (d / "result.json").read_bytes() for d in run_dirs(out) if (d / "result.json").exists()}
    assert 0 < len(finished) < 4, first
    # Atomic writes: every JSON file parses. A worker force-killed mid-write may leave its temp file beside an untouched
    # target; only an unfinished run can have one, and the rerun's reset removes it (checked below).
    assert all(json.loads(p.read_text()) is not None for p in out.rglob("*.json"))
    assert not [p for p in out.rglob("*.tmp") if p.parent.name in finished]
    for d in run_dirs(out):
        if d.name in finished:
            check_run(d)

    second = subprocess.run(cmd, check=False, capture_output=True, text=True, env=quiet, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"4 runs, {len(finished)} already finished, {4 - len(finished)} to run" in second.stdout
    assert all(name not in second.stdout for name in finished)   # not even submitted
    assert len(run_dirs(out)) == 4 and not list(out.rglob("*.tmp"))
    for d in run_dirs(out):
        assert check_run(d)["status"] == "ok"
        if d.name in finished:
            assert (d / "result.json").read_bytes() == finished[d.name]


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_no_run_is_lost_or_redone(ray_cluster, tiny_lm_dir, chat_jsonl, tmp_path,
                                                                  capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "sweep.toml", out, tiny_lm_dir, chat_jsonl)
    victim = f"lr{SMALL_LR:g}_reversed"
    kill_rule(ray_cluster, victim, times=1)
    assert main(sweep_cmd(cfg)) == 0, capsys.readouterr()
    assert "Traceback" not in capsys.readouterr().err

    ids = json.loads((out / "sweep.json").read_text())["run_ids"]
    assert [d.name for d in run_dirs(out)] == sorted(ids) and len(ids) == 4   # none lost, none extra
    for d in run_dirs(out):
        result = check_run(d)
        assert result["status"] == ("ok" if result["axes"]["train.lr"] == SMALL_LR else "diverged"), result
        assert result["axes"]["train.lr"] in (SMALL_LR, HUGE_LR)
    (killed,) = [i for i in ids if i.startswith(victim)]
    assert starts(ray_cluster) == {i: 2 if i == killed else 1 for i in ids}   # retried once; nothing else redone
    assert json.loads((out / "runs" / killed / "result.json").read_text())["steps"] == MAX_STEPS

    results = {d.name: (d / "result.json").read_bytes() for d in run_dirs(out)}
    kill_rule(ray_cluster, "", times=0)
    assert main(sweep_cmd(cfg)) == 0
    assert "4 runs, 4 already finished, 0 to run" in capsys.readouterr().out
    assert starts(ray_cluster) == {}   # the rerun trained nothing
    assert {d.name: (d / "result.json").read_bytes() for d in run_dirs(out)} == results


@pytest.mark.slow
def test_a_run_that_keeps_dying_is_recorded_failed_with_the_reason(ray_cluster, tiny_lm_dir, chat_jsonl, tmp_path,
                                                                   capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "sweep.toml", out, tiny_lm_dir, chat_jsonl)
    kill_rule(ray_cluster, "reversed", times=99)
    rc = main(sweep_cmd(cfg, "--set", "grid.train.lr=[0.001]", "--set", "resources.max_retries=1"))
    assert rc == 1, capsys.readouterr()   # a failed run: the command says so
    ids = json.loads((out / "sweep.json").read_text())["run_ids"]
    assert len(ids) == 2 and [d.name for d in run_dirs(out)] == sorted(ids)
    by_init = {check_run(d)["axes"]["lora.init"]: check_run(d) for d in run_dirs(out)}
    assert by_init["standard"]["status"] == "ok"
    failed = by_init["reversed"]
    assert failed["status"] == "failed" and "max_retries=1" in failed["error"], failed
    assert "WorkerCrashedError" in failed["error"] and "died" in failed["error"]
    assert starts(ray_cluster)[failed["run_id"]] == 2   # the first attempt and one retry, then given up
    assert f"{failed['run_id']}\n    failed: " in capsys.readouterr().out


@pytest.mark.slow
def test_the_driver_logs_each_run_to_the_tracker_from_the_store(ray_cluster, tiny_lm_dir, chat_jsonl, tmp_path,
                                                                capsys):
    """``[tracking]`` with Ray: the driver logs every run as it ends, from the store (tensorboard's own reader)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "sweep.toml", out, tiny_lm_dir, chat_jsonl)
    kill_rule(ray_cluster, "", times=0)
    assert main(sweep_cmd(cfg, "--set", "tracking.backend=tensorboard")) == 0
    assert "warning" not in capsys.readouterr().out
    name = load_sweep(cfg).name
    logged = sorted(p.name for p in (out / "tracking" / name).iterdir())
    assert logged == [d.name for d in run_dirs(out)] and len(logged) == 4
    for d in run_dirs(out):
        result = json.loads((d / "result.json").read_text())
        ea = EventAccumulator(str(out / "tracking" / name / d.name))
        ea.Reload()
        train = [m for m in read_jsonl(d / "metrics.jsonl") if m["kind"] == "train" and m["loss"] is not None]
        assert [e.step for e in ea.Scalars("train/loss")] == [m["step"] for m in train]
        if result["final_eval_loss"] is not None:
            (final,) = ea.Scalars("result/final_eval_loss")
            assert final.value == pytest.approx(result["final_eval_loss"], rel=1e-6)
