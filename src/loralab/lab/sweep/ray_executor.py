"""Spread a sweep over a Ray cluster: one Ray task per run, asking for the config's ``[resources]``.

Ray is the scheduler (placement, GPUs, retries of dead workers); this module only maps runs to tasks and keeps the
store's contract (see ``sweep.py``): a run is finished iff its ``result.json`` says ``ok`` or ``diverged``, and a
result is written once. The sweep moves aside the results of ``failed`` runs before submitting them, so any result
the driver sees belongs to this sweep. The driver holds the out_dir's lock (``lock.py``) while tasks run.

* **Idempotent tasks.** A task first looks for the run's finished result and returns it if present, so a retried or
  duplicated task never trains a finished run again. Otherwise it calls :func:`.local.run_pack` (a pack of one),
  which resets the run's directory first, so a retry after a worker died mid-run starts from a clean directory.
* **Aborts.** A task that raises :class:`.SweepAbort` (e.g. ``train.device=cuda`` on a worker without a GPU) stops
  the sweep as it does locally: the driver cancels the other tasks and raises it.
* **Retries are for dead workers only** (``retry_exceptions=False``): an exception in training is already a
  ``failed`` result written by ``run_pack``. When Ray gives up (a worker that keeps dying, a lost node, a cancelled
  task), the driver records the run as ``failed`` with Ray's error as the reason.
* **Store.** Workers write into the store at its absolute path, which should be shared storage (NFS, ...). Each
  task also returns the run's files (a few KB of JSON and per-chunk losses, and the trained adapter: a few MB for r = 8
  on SmolLM2), and
  the driver writes whichever it does not see, the adapter before the result as a worker does, so a driver without
  shared storage still gets every result and adapter ("gathered back to the driver").
* **Ctrl-C** cancels the outstanding tasks (killing their workers) and re-raises. Finished results stay; cut-short
  runs have no ``result.json`` and are redone by the next identical command.
* **Model cache.** Each worker process keeps the last loaded base model and data (``_WORKER_ASSETS``), so runs that
  land on the same worker load them once. Ray's default of one task per worker for GPU tasks would throw that away,
  hence ``max_calls=0`` (no limit).

Deviation from the local executor: no progress bars here (on workers they would only reach Ray's log files); the driver
prints one line per finished run instead. ``SweepConfig.pack`` is not used here: one task trains one run. A tracker
(``[tracking]``) is fed by the driver from the store as each run ends (:meth:`..tracking.Tracking.replay`), so workers
need neither the tracker's package nor its directory, and the runs show up whole rather than step by step.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from ..config.grid import RunSpec
from ..config.schema import ResourcesConfig
from ..config.typecheck import to_dict
from ..run.assets import Assets
from ..store import CorruptFileError, RunResult, RunStore, SweepStore
from ..tracking import Tracking
from .local import failed_result, run_pack, summarize
from .lock import SweepLock
from .plan import SweepAbort

_WORKER_ASSETS: Assets | None = None  # per worker process; unused on the driver


def _worker_assets() -> Assets:
    global _WORKER_ASSETS
    if _WORKER_ASSETS is None:
        _WORKER_ASSETS = Assets()
    return _WORKER_ASSETS


def _snapshot(run: RunStore) -> dict[str, Any]:
    """The run's files as plain data: what the driver needs to rebuild them without shared storage."""
    result = run.result()
    return {
        "config": run.config(),
        "metrics": run.metrics(),
        "diagnostics": run.diagnostics(),
        "eval_chunks": run.eval_chunks(),
        "adapter": run.adapter_files(),
        "result": None if result is None else result.to_json(),
    }


def _run_one(spec: RunSpec, store_root: str, progress: bool) -> dict[str, Any]:
    """Ray task body, on a worker: train ``spec`` into the store unless it is finished; returns its files."""
    run = SweepStore(store_root).run(spec.run_id)
    if not run.is_finished():  # a retry or a duplicate of a finished run: never train it twice
        run_pack([spec], [run], _worker_assets(), progress)
    return _snapshot(run)


def _gather(run: RunStore, snapshot: dict[str, Any]) -> RunResult:
    """Write the files a worker returned, unless this machine already sees them (shared storage)."""
    try:
        seen = run.result() == RunResult.from_json(snapshot["result"])
    except CorruptFileError:
        seen = False
    if not seen and not run.is_finished():
        run.reset()
        cfg = snapshot["config"]
        if cfg is not None:
            run.write_config(cfg["run_id"], cfg["axes"], cfg["config"])
        for record in snapshot["metrics"]:
            run.append_metric(record)
        if snapshot["diagnostics"] is not None:
            run.write_diagnostics(snapshot["diagnostics"])
        if snapshot.get("eval_chunks") is not None:  # before the result, as on the worker
            run.write_eval_chunks(snapshot["eval_chunks"])
        try:
            if snapshot.get("adapter"):  # before the result, as on the worker: a run is finished only with both
                run.write_adapter(lambda tmp: _write_files(tmp, snapshot["adapter"]))
            run.write_result(RunResult.from_json(snapshot["result"]))
        except FileExistsError:  # shared storage whose metadata showed up late: the worker's file is the same
            pass
    return _read(run)


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _read(run: RunStore) -> RunResult:
    result = run.result()
    if result is None:
        raise RuntimeError(f"{run.root}: the run has no result.json after its task ended")
    return result


def _failure_text(err: RayError, max_retries: int) -> tuple[str, str]:
    """``(error, traceback)`` for a task Ray gave up on: the first line names the cause."""
    if isinstance(err, RayTaskError):  # an exception outside run_pack's own catch, e.g. an unwritable store
        cause = err.cause if isinstance(err.cause, BaseException) else err
        return f"{type(cause).__name__}: {cause}".splitlines()[0], str(err)
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__} (Ray gave up, max_retries={max_retries}): {first}", str(err)


def _record_failure(run: RunStore, spec: RunSpec, err: RayError, max_retries: int) -> RunResult:
    """Record ``spec`` as failed with Ray's reason, unless a result exists (the worker died after writing it)."""
    if run.status() is None:  # the worker may have died after writing a result: that one stands
        if run.config() is None:  # keep a partial run's files as they are: they show how far it got
            run.write_config(spec.run_id, spec.axes, to_dict(spec.run))
        run.write_result(failed_result(spec, *_failure_text(err, max_retries)))
    return _read(run)


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on: Ray itself retries such an address for minutes."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # None, "auto", "local": Ray resolves those itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(
            f"no Ray cluster answers at {address!r} ({e}); on the head node run `ray start --head` "
            "and pass the address it prints (--address HEAD:6379), or omit --address for a local Ray"
        ) from e


class RayExecutor:
    """Runs each run as a Ray task on a cluster (or on a local Ray started for the sweep).

    Args:
        address: a Ray cluster address (``HEAD:6379``, ``ray://HEAD:10001``, ``auto``); ``None`` connects to the
            cluster in ``$RAY_ADDRESS`` or started on this machine by ``ray start``, else starts a local Ray that
            lives as long as the sweep. If this process is already connected (``ray.init`` was called), that
            connection is used and left open.
        resources: CPUs and GPUs each task asks for, and how often a task whose worker died is retried
            (default: ``ResourcesConfig()``, 1 CPU, no GPU, 2 retries).
        progress: draw progress bars on the workers (they go to Ray's worker logs, not to this terminal).
        log: where the one-line-per-run messages go.
        tracking: the sweep's tracker; each run is logged to it from the store as it ends (default: none).
    """

    def __init__(
        self,
        address: str | None = None,
        resources: ResourcesConfig | None = None,
        progress: bool = False,
        log: Callable[[str], None] = print,
        tracking: Tracking | None = None,
    ):
        self.address, self.progress, self.log, self.tracking = address, progress, log, tracking
        self.resources = resources or ResourcesConfig()

    def run(self, runs: Sequence[RunSpec], store: SweepStore) -> None:
        """Train every run on the cluster and record each result in ``store`` (see the module docstring)."""
        if not runs:
            return
        with SweepLock(store.root, self.log):  # re-entrant: run_sweep holds it already
            self._run(runs, store)

    def check(self, runs: Sequence[RunSpec]) -> None:
        """Before any run (and in a dry run): a cluster address must answer. Devices are the workers' to check."""
        if not ray.is_initialized():
            _check_reachable(self.address)

    def _run(self, runs: Sequence[RunSpec], store: SweepStore) -> None:
        started = self._connect()
        try:
            # A Ray started here cannot grow; a cluster may (autoscaler), so there it is only a warning.
            self._check_fits(local=started and not self.address and "RAY_ADDRESS" not in os.environ)
            r = self.resources
            task = ray.remote(
                num_cpus=r.cpus, num_gpus=r.gpus, max_retries=r.max_retries, retry_exceptions=False, max_calls=0
            )(_run_one)
            root = str(Path(store.root).resolve())  # workers may run elsewhere: never a relative path
            pending = {task.remote(spec, root, self.progress): spec for spec in runs}
            have = ray.cluster_resources()
            self.log(
                f"ray: {len(runs)} runs submitted to {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs; "
                f"each run asks for {r.cpus:g} CPU, {r.gpus:g} GPU"
            )
            self._collect(pending, store, cancel=not started)
        finally:
            if started:
                ray.shutdown()

    def _connect(self) -> bool:
        """Connect to (or start) Ray unless already connected; True if this call did it, so it must shut it down."""
        if ray.is_initialized():
            return False
        _check_reachable(self.address)
        try:
            # log_to_driver=False: the workers' logs (HF warnings, bars) stay in Ray's log files; failures reach
            # the store with their traceback anyway.
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError) as e:
            where = f"at {self.address!r}" if self.address else "on this machine"
            raise ValueError(
                f"cannot connect to a Ray cluster {where}: {e}. Start one with `ray start --head` "
                "and pass its address with --address HEAD:6379 (or omit --address for a local Ray)"
            ) from e
        return True

    def _check_fits(self, local: bool) -> None:
        """Fail (local Ray) or warn (a cluster may still grow) when no node can ever take one task."""
        r = self.resources
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(n.get("CPU", 0) >= r.cpus and n.get("GPU", 0) >= r.gpus for n in nodes):
            return
        have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "no nodes"
        msg = (
            f"each run asks for resources.cpus={r.cpus:g} and resources.gpus={r.gpus:g}, but no Ray node has "
            f"that ({have}); lower them, e.g. --set resources.gpus=0, or add a node that has them"
        )
        if local:
            raise ValueError(msg)
        self.log(f"warning: {msg}; runs wait until such a node joins")

    def _collect(self, pending: dict, store: SweepStore, cancel: bool = True) -> None:
        """Log and record each run as its task ends; on Ctrl-C stop the rest and re-raise.

        On a cluster the outstanding tasks are cancelled; a Ray started here is instead shut down by the caller,
        which kills its workers: cancelling tasks while they finish can abort Ray's core worker ("Tried to
        complete task that was not pending", seen with Ray 2.60), and shutting down stops them as surely.
        """
        total, done = len(pending), 0
        try:
            while pending:
                # A timeout, so that Ctrl-C is seen within a second even while no task ends.
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    spec = pending.pop(ref)
                    result = self._finish(spec, ref, store)
                    if self.tracking is not None:
                        self.tracking.replay(store.run(spec.run_id))
                    done += 1
                    self.log(f"[{done}/{total}] {spec.run_id}\n    {summarize(result)}")
        except (KeyboardInterrupt, SweepAbort):
            for ref in pending if cancel else ():
                ray.cancel(ref, force=True)  # force: kill the worker mid-run; its run stays unfinished
            raise
        finally:
            if self.tracking is not None:
                self.tracking.close()

    def _finish(self, spec: RunSpec, ref: Any, store: SweepStore) -> RunResult:
        run = store.run(spec.run_id)
        try:
            snapshot = ray.get(ref)
        except RayError as e:
            if isinstance(e, RayTaskError) and isinstance(e.cause, SweepAbort):
                raise SweepAbort(f"{e.cause} (on a Ray worker, run {spec.run_id})") from None
            return _record_failure(run, spec, e, self.resources.max_retries)
        return _gather(run, snapshot)
