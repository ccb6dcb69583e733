"""Trackers (loralab.lab.tracking): a tiny sweep logged to TensorBoard event files, a W&B offline directory and an
MLflow file store, each read back with the backend's own reader (tensorboard's event accumulator, the ``.wandb``
record files, ``mlflow.search_runs``) and checked against the store: the runs, their configs, their losses and
statuses; a failed run is logged as failed and its redo logs into the same tracker run; a tracker that breaks during
a run is one warning and the store stays complete. No network: W&B runs offline, MLflow on files."""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loralab.lab.config.toml import parse_sweep
from loralab.lab.store import SweepStore
from loralab.lab.sweep.local import LocalExecutor
from loralab.lab.sweep.plan import SweepPlan
from loralab.lab.sweep.run import run_sweep
from tiny_sweep import tiny_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


def needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} is not installed: pip install 'loralab[tracking]'"
    )


BACKENDS = [
    pytest.param("tensorboard", marks=needs("tensorboard")),
    pytest.param("wandb", marks=needs("wandb")),
    pytest.param("mlflow", marks=needs("mlflow")),
]


@pytest.fixture
def cfg(tiny_lm_dir, chat_jsonl, tmp_path) -> dict:
    """Two runs (standard, reversed) of three steps, evaluated at step 2 and at the end."""
    return tiny_sweep(tiny_lm_dir, chat_jsonl, tmp_path / "out", **{"train.max_steps": 3})


def sweep(cfg: dict, *overrides: str) -> tuple[SweepStore, list[str]]:
    """Run the sweep in this process; returns its store and its log lines."""
    lines: list[str] = []
    plan = SweepPlan.build(parse_sweep(cfg, overrides))
    store = run_sweep(plan, LocalExecutor(plan, progress=False, log=lines.append), log=lines.append)
    return store, lines


@pytest.fixture
def file_store_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # set by the tracker; restored after the test
    monkeypatch.setenv("WANDB_SILENT", "true")


# ---- the backends' own readers --------------------------------------------------------------------------------------

@dataclass
class Logged:
    """One tracker run as its backend reads it back."""

    ids: set = field(default_factory=set)       # the tracker's own run ids under this name (resume: exactly one)
    params: dict = field(default_factory=dict)
    train_loss: dict = field(default_factory=dict)   # step -> loss, the last attempt's
    metrics: dict = field(default_factory=dict)      # the latest value of every metric
    status: str = ""


def read_tensorboard(root: Path) -> dict[str, Logged]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    out = {}
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        ea = EventAccumulator(str(run_dir))
        ea.Reload()
        logged = Logged(ids={run_dir.name})
        for content in ea.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                for k, v in data.session_start_info.hparams.items():
                    logged.params[k] = getattr(v, v.WhichOneof("kind"))
        for tag in ea.Tags()["scalars"]:
            events = ea.Scalars(tag)
            logged.metrics[tag] = events[-1].value
            if tag == "train/loss":
                logged.train_loss = {e.step: e.value for e in events}
        status = ea.Tensors("result/status/text_summary")[-1]   # the last attempt's (text is never purged)
        logged.status = tensor_util.make_ndarray(status.tensor_proto).item().decode()
        out[run_dir.name] = logged
    return out


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: W&B's 7-byte header, then LevelDB-log-style blocks of 32 KiB whose
    chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) hold the serialized records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", path
    pos, parts = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:   # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + header])
        parts += data[pos + header:pos + header + n]
        pos += header + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_wandb(root: Path) -> dict[str, Logged]:
    def items(updates):
        return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}

    import wandb

    wandb.teardown()   # W&B's service writes the files in the background; this waits for it, as a process's end does
    out: dict[str, Logged] = {}
    files = sorted(root.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    for path in files:   # attempts in time order: the last one's values win
        name, logged, history = None, None, {}
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                name = rec.run.display_name
                logged = out.setdefault(name, Logged())
                logged.ids.add(rec.run.run_id)
                logged.params |= {k: v for k, v in items(rec.run.config.update).items() if k != "_wandb"}
                assert rec.run.run_group == "tiny" and rec.run.project == "tiny"
            elif kind == "history":
                row = items(rec.history.item)
                if "train/loss" in row:
                    history[row["step"]] = row["train/loss"]
            elif kind == "summary" and logged is not None:
                logged.metrics |= {k: v for k, v in items(rec.summary.update).items() if k}
            elif kind == "exit" and logged is not None:
                logged.status = logged.metrics.get("result/status", "") if rec.exit.exit_code == 0 else "failed"
        if logged is not None and history:
            logged.train_loss = history
    return out


def read_mlflow(root: Path) -> dict[str, Logged]:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (root / "mlruns").resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    client, out = MlflowClient(tracking_uri=uri), {}
    for run in runs:
        logged = out.setdefault(run.info.run_name, Logged())
        logged.ids.add(run.info.run_id)
        logged.params = dict(run.data.params)
        logged.metrics = dict(run.data.metrics)
        logged.status = run.data.tags["loralab.status"]
        assert run.info.status == ("FAILED" if logged.status == "failed" else "FINISHED")
        logged.train_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    return out


def read(backend: str, root: Path) -> dict[str, Logged]:
    return {"tensorboard": lambda: read_tensorboard(root / "tiny"), "wandb": lambda: read_wandb(root),
            "mlflow": lambda: read_mlflow(root)}[backend]()


def as_param(value):
    """A config value as the trackers hold hyperparameters: scalars as they are, the rest as JSON text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def check_against_store(logged: dict[str, Logged], store: SweepStore, backend: str) -> None:
    records = {r.run_id: r for r in store.records()}
    assert set(logged) == set(records)   # one tracker run per run, named by its id
    for run_id, rec in records.items():
        t = logged[run_id]
        assert len(t.ids) == 1, t.ids   # a redone run logged into the same tracker run
        assert t.status == rec.status
        cfg = rec.config["config"]
        expected = {"lora.init": cfg["lora"]["init"], "train.max_steps": cfg["train"]["max_steps"],
                    "lora.targets": cfg["lora"]["targets"], "run_id": run_id, "grid_axes": "lora.init"}
        for key, value in expected.items():
            got = t.params[key]
            if backend == "mlflow":   # MLflow keeps params as text
                assert got == str(as_param(value)), key
            elif backend == "tensorboard":
                assert got == as_param(value), key
            else:
                assert got == value, key
        if rec.status == "failed":
            continue
        if rec.result.final_eval_loss is None:   # blown up: NaN or inf stays in the store
            assert "result/final_eval_loss" not in t.metrics
        else:
            assert t.metrics["result/final_eval_loss"] == pytest.approx(rec.result.final_eval_loss, rel=1e-6)
        assert t.metrics["result/steps"] == rec.result.steps > 0
        stored = {m["step"]: m["loss"] for m in rec.metrics if m["kind"] == "train" and m["loss"] is not None}
        assert t.train_loss.keys() == stored.keys()
        assert list(t.train_loss.values()) == pytest.approx(list(stored.values()), rel=1e-6)
        if backend != "wandb":   # W&B keeps only the last value of a metric in its summary
            assert t.metrics["step0/identity_max_abs"] == pytest.approx(rec.diagnostics["identity_max_abs"], abs=1e-7)


# ---- the tests -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_are_logged_and_a_redo_logs_into_the_same_tracker_run(backend, cfg, reversed_fails, file_store_env):
    """First sweep: ``reversed`` fails (logged as failed). Then its bug is fixed and ``standard``'s result lost (a
    crash after it): the rerun redoes both, each into its old tracker run, and every tracker matches the store."""
    store, lines = sweep(cfg, f"tracking.backend={backend}")
    root = store.root / "tracking"
    first = read(backend, root)
    assert {r.run_id: r.status for r in store.records()} == {k: v.status for k, v in first.items()}
    assert sorted(v.status for v in first.values()) == ["failed", "ok"]
    assert not any(line.startswith("warning") for line in lines), lines

    reversed_fails.undo()
    (standard,) = [r for r in store.records() if r.status == "ok"]
    (standard.path / "result.json").unlink()   # as if the sweep died right after training it
    store, lines = sweep(cfg, f"tracking.backend={backend}")
    assert "2 to run" in "\n".join(lines)
    assert [r.status for r in store.records()] == ["ok", "ok"]
    check_against_store(read(backend, root), store, backend)
    assert not any(line.startswith("warning") for line in lines), lines


def test_without_tracking_nothing_is_logged(cfg):
    store, lines = sweep(cfg)
    assert [r.status for r in store.records()] == ["ok", "ok"]
    assert not (store.root / "tracking").exists() and not any(line.startswith("warning") for line in lines)


def _raise_disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("backend,patch", [
    pytest.param("tensorboard", "torch.utils.tensorboard.SummaryWriter.add_scalar", marks=needs("tensorboard")),
    pytest.param("mlflow", "mlflow.tracking.MlflowClient.log_batch", marks=needs("mlflow")),
    pytest.param("wandb", "wandb.init", marks=needs("wandb")),
])
def test_a_tracker_that_breaks_is_one_warning_and_the_store_is_complete(backend, patch, cfg, monkeypatch,
                                                                         file_store_env):
    monkeypatch.setattr(patch, _raise_disk_full)   # the backend library's own write raises
    store, lines = sweep(cfg, f"tracking.backend={backend}")
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1, lines
    assert f"tracking to {backend} failed" in warnings[0] and "No space left on device" in warnings[0]
    records = store.records()
    assert [r.status for r in records] == ["ok", "ok"]   # the runs went on, and the store has them in full
    for r in records:
        assert [m["step"] for m in r.metrics if m["kind"] == "train"] == [1, 2, 3]
        assert r.diagnostics is not None and r.eval_chunks is not None and r.result.final_eval_loss is not None



@pytest.mark.parametrize("backend", BACKENDS)
def test_each_run_of_a_pack_gets_its_own_tracker_run(backend, cfg, file_store_env):
    store, lines = sweep(cfg, f"tracking.backend={backend}", "pack=2")   # both runs trained at once, on one base
    assert any("standard" in line and "reversed" in line for line in lines)   # one pack of two
    check_against_store(read(backend, store.root / "tracking"), store, backend)


@needs("tensorboard")
def test_replay_logs_a_finished_store_as_training_would(cfg, tmp_path):
    """What the Ray executor's driver does as each run ends: the run's files, logged from the store."""
    from loralab.lab.tracking import Tracking

    store, _ = sweep(cfg)   # trained without a tracker
    lines: list[str] = []
    tracking = Tracking(parse_sweep(cfg, ["tracking.backend=tensorboard"]), lines.append)
    for run_id in store.run_ids():
        tracking.replay(store.run(run_id))
    tracking.close()
    assert lines == []
    check_against_store(read("tensorboard", store.root / "tracking"), store, "tensorboard")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_diverged_run_is_logged_as_diverged(backend, cfg, file_store_env):
    store, lines = sweep(cfg, f"tracking.backend={backend}", "grid.lora.init=['standard']", "train.lr=1e3",
                        "train.warmup_ratio=0", "train.max_steps=12", "train.eval_every=3", "lora.alpha=8")
    assert [r.status for r in store.records()] == ["diverged"]
    assert not any(line.startswith("warning") for line in lines), lines
    check_against_store(read(backend, store.root / "tracking"), store, backend)
