"""Trackers: a sweep's runs also logged to TensorBoard, Weights & Biases or MLflow (``[tracking]``, docs/tracking.md).

The store stays the source of truth; a tracker is a window onto it, and nothing is ever read back from one. The seam
is the store itself: :meth:`Tracking.watch` turns a run's :class:`~.store.RunStore` into a :class:`TrackedRunStore`,
whose writes also go to the tracker, so the training loop and the executors log through the one place where a run's
data is produced, and a tracker sees what the store holds:

* ``write_config`` -> the tracker run's hyperparameters: the resolved config flattened (``train.lr``), plus
  ``run_id`` and ``grid_axes`` (the axes this sweep varies, comma-separated), started when its first data comes;
* ``append_metric`` -> ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s`` per step and
  ``eval/loss`` per eval, at the store's step (non-finite values stay in the store only);
* ``write_diagnostics`` -> ``step0/identity_max_abs`` and ``step0/<layer>/grad_norm_a`` (``_b``, ``var_a``,
  ``var_b``) at step 0;
* ``write_result`` -> ``result/<field>`` (final, best and initial eval loss, steps, tokens, tokens/s, ...), the
  status (``ok`` / ``diverged`` / ``failed``, with a failed run's error) and the end of the tracker run.

A sweep is one W&B project and group, one MLflow experiment, one TensorBoard folder (``tracking.project``, default
the sweep's name), with one tracker run per run, named by the run's id, packs included.

Failures never reach a run: every backend call goes through :meth:`Tracking.call`, and the first exception (a
package that cannot load, a server that does not answer, a full disk) is one warning, saying where logging stopped,
and turns the tracker off for the rest of the sweep, because what breaks a tracker (its server, its disk) breaks it
for every later run too, and a dead server would cost each run its own retries. The store is written first.

Resume: a tracker run's identity is derived from the run's directory (its absolute path: the store and the run id,
:func:`tracker_key`), so a run redone after a crash or a failure logs into the same tracker run: W&B with the same
``id`` and ``resume="allow"`` (its x axis is our own ``step`` metric, so the redo's step 1 is not refused as going
back), MLflow by reusing the run tagged ``loralab.key`` (the crashed attempt's points stay in its history),
TensorBoard in the same log directory, written with ``purge_step=0`` so the redo's curves replace the old ones.
A missing package is an error before any training (:func:`check_tracking`, called by the plan and the dry run).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .config.schema import SweepConfig, TrackingConfig
from .store import CorruptFileError, RunResult, RunStore, flat, to_strict_json

__all__ = ["RunLogger", "Tracker", "TrackedRunStore", "Tracking", "check_tracking", "tracker_key"]

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # backend -> package it imports
TRAIN_METRICS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
}
EVAL_METRICS = {"eval_loss": "eval/loss"}
RESULT_FIELDS = (
    "final_eval_loss",
    "best_eval_loss",
    "initial_eval_loss",
    "steps",
    "tokens",
    "tokens_per_s",
    "wall_time_s",
    "diverged_at_step",
)
T = TypeVar("T")


def check_tracking(cfg: TrackingConfig) -> None:
    """Raise ``ValueError`` (one line, with the install command) when the backend's package cannot be imported."""
    if cfg.backend == "none":
        return
    try:
        importlib.import_module(MODULES[cfg.backend])
    except ImportError as e:
        raise ValueError(
            f"tracking.backend={cfg.backend!r} needs the {MODULES[cfg.backend]} package, which cannot be imported "
            f"({e}): pip install 'loralab[{cfg.backend}]', or set tracking.backend=none"
        ) from None


def tracker_key(run_dir: str | os.PathLike) -> str:
    """The tracker run's identity: 16 hex chars of the run directory's absolute path (store + run id), so a redone
    run gets its old tracker run back and the same run id in another store does not."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def _numbers(values: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, float]:
    """``{tracker name: value}`` of the finite numbers among ``values`` (a NaN loss stays in the store only)."""
    out = {}
    for key, name in names.items():
        v = to_strict_json(values.get(key))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


def hyperparams(run_id: str, axes: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's hyperparameters for a tracker: its id, the sweep's axes and the resolved config flattened."""
    return {"run_id": run_id, "grid_axes": ",".join(axes), **flat(config)}


def step0_metrics(diagnostics: Mapping[str, Any]) -> dict[str, float]:
    """The step-0 diagnostics (``diagnostics.json``) as flat metrics."""
    out = _numbers(diagnostics, {"identity_max_abs": "step0/identity_max_abs"})
    for layer, values in (diagnostics.get("layers") or {}).items():
        out |= _numbers(values, {k: f"step0/{layer}/{k}" for k in values})
    return out


def result_metrics(result: RunResult) -> dict[str, float]:
    return _numbers(result.to_json(), {k: f"result/{k}" for k in RESULT_FIELDS})


class RunLogger(Protocol):
    """One tracker run."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self, result: RunResult) -> None:
        """Log the result's numbers and status and end the tracker run (``failed`` ends it as failed)."""
        ...

    def abandon(self) -> None:
        """End the tracker run without a result (the sweep stopped first): the backend's "killed"."""
        ...


class Tracker(Protocol):
    """A backend: opens tracker runs in one project."""

    def start_run(self, key: str, run_id: str, params: Mapping[str, Any]) -> RunLogger: ...


def _plain(value: Any) -> bool | int | float | str:
    """A hyperparameter as a scalar: lists, tables and ``None`` as JSON text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


class TensorBoardTracker:
    """Event files in ``<dir>/<project>/<run id>/``: ``tensorboard --logdir <dir>`` shows the runs side by side."""

    def __init__(self, cfg: TrackingConfig, project: str, root: Path):
        self.root = root / project

    def start_run(self, key: str, run_id: str, params: Mapping[str, Any]) -> RunLogger:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step=0: a redone run's events hide those of the attempt before it (TensorBoard's restart rule)
        writer: Any = SummaryWriter(str(self.root / run_id), purge_step=0)
        exp, start, _ = hparams(
            {k: _plain(v) for k, v in params.items()}, {f"result/{k}": 0.0 for k in RESULT_FIELDS[:3]}
        )
        for summary in (exp, start):  # in the run's own directory (add_hparams would make a sub-run)
            writer.file_writer.add_summary(summary)
        return _TensorBoardRun(writer)


class _TensorBoardRun:
    def __init__(self, writer: Any):
        self.writer = writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, result: RunResult) -> None:
        self.log_metrics(result_metrics(result), result.steps)
        self.writer.add_text("result/status", result.status, result.steps)
        if result.error:
            self.writer.add_text("result/error", result.error, result.steps)
        self.writer.close()

    def abandon(self) -> None:
        self.writer.close()


class WandbTracker:
    """W&B runs in project ``project``, group the sweep; offline by default (files in ``<dir>/wandb/``)."""

    def __init__(self, cfg: TrackingConfig, project: str, root: Path, group: str):
        self.mode: Any = cfg.wandb_mode  # "offline" | "online", checked by TrackingConfig
        self.project, self.root, self.group = project, root, group

    def start_run(self, key: str, run_id: str, params: Mapping[str, Any]) -> RunLogger:
        import wandb

        self.root.mkdir(parents=True, exist_ok=True)  # W&B falls back to a temp dir for a missing one
        run = wandb.init(
            project=self.project,
            group=self.group,
            name=run_id,
            id=key,
            resume="allow",
            reinit="create_new",  # a pack's runs are open at once
            dir=str(self.root),
            mode=self.mode,
            config=dict(params),
            allow_val_change=True,  # a redo may change a field that leaves run ids alone (train.compile)
            settings=wandb.Settings(silent=True, console="off"),
        )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return _WandbRun(run)


class _WandbRun:
    def __init__(self, run: Any):
        self.run = run

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def finish(self, result: RunResult) -> None:
        self.run.summary.update({**result_metrics(result), "result/status": result.status})
        if result.error:
            self.run.summary["result/error"] = result.error
        self.run.tags = (result.status,)
        self.run.finish(exit_code=1 if result.status == "failed" else 0)

    def abandon(self) -> None:
        self.run.finish(exit_code=1)


class MlflowTracker:
    """MLflow runs in experiment ``project``; by default a file store in ``<dir>/mlruns`` (no server)."""

    def __init__(self, cfg: TrackingConfig, project: str, root: Path, sweep: str):
        from mlflow.tracking import MlflowClient

        if not cfg.uri:  # MLflow 3 keeps its file store only on request; here it is what "no server" means
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.sweep = sweep
        self.client = MlflowClient(tracking_uri=cfg.uri or (root / "mlruns").resolve().as_uri())
        found = self.client.get_experiment_by_name(project)
        self.experiment = found.experiment_id if found else self.client.create_experiment(project)

    def start_run(self, key: str, run_id: str, params: Mapping[str, Any]) -> RunLogger:
        from mlflow.entities import Param

        c = self.client
        old = c.search_runs([self.experiment], filter_string=f"tags.`loralab.key` = '{key}'", max_results=1)
        if old:  # a redone run: the same MLflow run
            run, logged = old[0].info.run_id, dict(old[0].data.params)
            c.update_run(run, status="RUNNING")
        else:
            tags = {"loralab.key": key, "loralab.run_id": run_id, "loralab.sweep": self.sweep}
            run, logged = c.create_run(self.experiment, run_name=run_id, tags=tags).info.run_id, {}
        values = {k: str(_plain(v)) for k, v in params.items()}
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow's limit per request
            c.log_batch(run, params=new[i : i + 100])
        for k, v in values.items():  # params are write-once: a field changed by the redo is a tag
            if k in logged and logged[k] != v:
                c.set_tag(run, f"changed.{k}", v)
        c.set_tag(run, "loralab.grid_axes", values["grid_axes"])
        return _MlflowRun(c, run)


class _MlflowRun:
    def __init__(self, client: Any, run: str):
        self.client, self.run = client, run

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per request
            self.client.log_batch(self.run, metrics=batch[i : i + 1000])

    def finish(self, result: RunResult) -> None:
        self.log_metrics(result_metrics(result), result.steps)
        self.client.set_tag(self.run, "loralab.status", result.status)
        if result.error:
            self.client.set_tag(self.run, "loralab.error", result.error)
        self.client.set_terminated(self.run, "FAILED" if result.status == "failed" else "FINISHED")

    def abandon(self) -> None:
        self.client.set_terminated(self.run, "KILLED")


class Tracking:
    """One sweep's tracker (``sweep.tracking``): hands out tracked run stores; the first failure turns it off.

    Args:
        sweep: the sweep (its ``tracking`` table, name and out_dir).
        log: where the one warning goes (the sweep's log).
    """

    def __init__(self, sweep: SweepConfig, log: Callable[[str], None] = print):
        self.cfg, self.sweep, self.log = sweep.tracking, sweep.name, log
        self.root = Path(self.cfg.dir or Path(sweep.out_dir) / "tracking").expanduser()
        self.project = self.cfg.project or sweep.name
        self.off = self.cfg.backend == "none"
        self._backend: Tracker | None = None
        self.open: dict[str, RunLogger] = {}  # run dir -> its tracker run, while it has no result

    def watch(self, run: RunStore) -> RunStore:
        """``run`` with its writes also logged (itself when tracking is off)."""
        return run if self.off else TrackedRunStore(run.root, self)

    def call(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()``, unless the tracker is off; its first exception is one warning and turns the tracker off."""
        if self.off:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a tracker never fails or loses a run
            self.off = True
            error = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]
            self.log(
                f"warning: tracking to {self.cfg.backend} failed at {what} ({error}); nothing more of sweep "
                f"{self.sweep!r} is logged to {self.cfg.backend}, the runs go on and the store has them in full"
            )
            return None

    def backend(self) -> Tracker:
        if self._backend is None:
            name, root = self.cfg.backend, self.root
            if name == "tensorboard":
                self._backend = TensorBoardTracker(self.cfg, self.project, root)
            elif name == "wandb":
                self._backend = WandbTracker(self.cfg, self.project, root, self.sweep)
            else:
                self._backend = MlflowTracker(self.cfg, self.project, root, self.sweep)
        return self._backend

    def replay(self, run: RunStore) -> None:
        """Log a run the store already holds, from its files (a Ray worker trained it: the driver logs it then)."""
        if self.off:
            return
        tracked = TrackedRunStore(run.root, self)
        try:
            config, metrics, diagnostics, result = run.config(), run.metrics(), run.diagnostics(), run.result()
        except CorruptFileError as e:  # the store's problem, reported by the sweep and the report; not a tracker's
            self.log(f"warning: run {run.run_id} is not logged to {self.cfg.backend}: {e}")
            return
        if config is not None:
            tracked.track_config(config["run_id"], config["axes"], config["config"])
        for record in metrics:
            tracked.track_metric(record)
        if diagnostics is not None:
            tracked.track_diagnostics(diagnostics)
        if result is not None:
            tracked.track_result(result)

    def close(self) -> None:
        """End the tracker runs still open (the sweep stopped before their results) as the backend's "killed"."""
        for key in list(self.open):
            logger = self.open.pop(key)
            self.call("closing an unfinished run", logger.abandon)


class TrackedRunStore(RunStore):
    """A run's store whose writes also go to the sweep's tracker (module docstring); the store is written first."""

    def __init__(self, root: str | os.PathLike, tracking: Tracking):
        super().__init__(root)
        self.tracking = tracking
        self.params: dict[str, Any] | None = None

    def logger(self, what: str) -> RunLogger | None:
        """The run's tracker run, started with its hyperparameters when its first data comes."""
        t, key = self.tracking, str(self.root)
        if key not in t.open and self.params is not None:
            params = self.params
            started = t.call(
                f"the start of run {self.run_id} (with {what})",
                lambda: t.backend().start_run(tracker_key(self.root), self.run_id, params),
            )
            if started is not None:
                t.open[key] = started
        return t.open.get(key)

    def write_config(self, run_id: str, axes: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        super().write_config(run_id, axes, config)
        self.track_config(run_id, axes, config)

    def append_metric(self, record: Mapping[str, Any]) -> None:
        super().append_metric(record)
        self.track_metric(record)

    def write_diagnostics(self, diagnostics: Mapping[str, Any]) -> None:
        super().write_diagnostics(diagnostics)
        self.track_diagnostics(diagnostics)

    def write_result(self, result: RunResult) -> None:
        super().write_result(result)
        self.track_result(result)

    # What each write sends to the tracker (also used by Tracking.replay).

    def track_config(self, run_id: str, axes: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        self.params = hyperparams(run_id, axes, config)

    def track_metric(self, record: Mapping[str, Any]) -> None:
        names = TRAIN_METRICS if record.get("kind") == "train" else EVAL_METRICS
        self._log(_numbers(record, names), int(record.get("step", 0)), f"step {record.get('step')}")

    def track_diagnostics(self, diagnostics: Mapping[str, Any]) -> None:
        self._log(step0_metrics(diagnostics), 0, "the step-0 diagnostics")

    def track_result(self, result: RunResult) -> None:
        what = f"the {result.status} result"
        logger = self.logger(what)
        if logger is not None:
            self.tracking.open.pop(str(self.root), None)
            self.tracking.call(f"{what} of run {self.run_id}", lambda: logger.finish(result))

    def _log(self, metrics: dict[str, float], step: int, what: str) -> None:
        logger = self.logger(what)
        if logger is not None and metrics:
            self.tracking.call(f"{what} of run {self.run_id}", lambda: logger.log_metrics(metrics, step))
