"""A sweep's plan, built once and used by the sweep and by its dry run: the runs, their packs, the manifest, and the
checks of what no single run can get past.

Errors that are not one run's fault (the configured device is missing, a 4-bit base without bitsandbytes or on a
device it cannot serve, the data cannot fill one step's batches, the out_dir is a file, another config's store, a
tracker whose package is missing, a model or dataset that cannot be read, targets that match nothing, a rank above a
layer's, a sequence longer than the model's context) would fail every run alike: they raise :class:`SweepAbort` (or a
``ValueError`` naming the problem) and stop the sweep once, and ``--dry-run`` runs the same checks before any training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from loralab.inject import validate

from ..config.grid import RunSpec, plan_runs
from ..config.schema import RunConfig, SweepConfig
from ..config.typecheck import to_dict
from ..run.data import check_data
from ..run.models import check_model, check_quantize, model_skeleton
from ..run.pack import pack_key
from ..runtime import DeviceUnavailable, check_out_dir, pick_device
from ..store import SweepStore
from ..tracking import check_tracking

__all__ = ["AUTO_PACK_TOKENS", "Executor", "SweepAbort", "SweepPlan", "check_batches", "check_context", "check_device"]

AUTO_PACK_TOKENS = 16384  # tokens per packed micro-batch on CUDA (a pack that does not fit is split)


class SweepAbort(ValueError):
    """An error that is not one run's fault and would fail every run alike: the sweep stops, naming the fix."""


class Executor(Protocol):
    """Trains runs and writes each one's result into ``store``; finished runs are never passed in.

    ``check(runs)`` raises :class:`SweepAbort` or ``ValueError`` for what can be known before training (devices, a
    cluster's address); the sweep and its dry run call it first.
    """

    def check(self, runs: Sequence[RunSpec]) -> None: ...

    def run(self, runs: Sequence[RunSpec], store: SweepStore) -> None: ...


def check_device(name: str) -> None:
    """Raise :class:`SweepAbort` when ``train.device`` names a device this machine does not have."""
    try:
        pick_device(name, "train.device")
    except DeviceUnavailable as e:
        raise SweepAbort(str(e)) from None


def check_batches(run: RunConfig, n_train: int, what: str = "the training data has") -> None:
    """Raise :class:`SweepAbort` when ``n_train`` chunks cannot fill one micro-batch (steps cycle through epochs, so
    that is all a run needs)."""
    need = run.train.batch_size
    if n_train < need:
        raise SweepAbort(
            f"{what} {n_train} chunks of {run.data.seq_len} tokens, fewer than one micro-batch needs "
            f"(train.batch_size = {need}); raise data.max_train_chunks (0 = all), or lower "
            "train.batch_size or data.seq_len"
        )


def check_context(run: RunConfig, skeleton: Any) -> None:
    """Raise :class:`SweepAbort` when ``data.seq_len`` is longer than the model's context: learned positions have no
    row for it (an ``IndexError`` in every run), rotary ones train on positions the model never saw."""
    limit = getattr(getattr(skeleton, "config", None), "max_position_embeddings", None)  # GPT-2's n_positions too
    if isinstance(limit, int) and run.data.seq_len > limit:
        raise SweepAbort(
            f"data.seq_len={run.data.seq_len} is longer than the context of model.name="
            f"{run.model.name!r}: {limit} tokens (max_position_embeddings in its config); set "
            f"data.seq_len={limit} or less"
        )


def _device_here(name: str) -> torch.device | None:
    """``train.device`` on this machine; None where only a cluster's workers have it (the executor checked that)."""
    try:
        return pick_device(name)
    except DeviceUnavailable:
        return None


@dataclass(frozen=True)
class SweepPlan:
    """Every run of a sweep in grid order, and what the store's manifest records about it."""

    sweep: SweepConfig
    runs: tuple[RunSpec, ...]

    @classmethod
    def build(cls, sweep: SweepConfig) -> SweepPlan:
        return cls(sweep, tuple(plan_runs(sweep)))

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    def manifest(self) -> dict[str, Any]:
        """What ``sweep.json`` records (and is checked against)."""
        s = self.sweep
        return {
            "name": s.name,
            "grid": {k: list(v) for k, v in s.grid.items()},
            "run_ids": self.run_ids,
            "base": to_dict(s.base),
        }

    def packs(self, runs: Sequence[RunSpec]) -> list[list[RunSpec]]:
        """Split ``runs`` into packs: runs that may share a base (equal :func:`..run.pack.pack_key`), in grid order,
        at most ``sweep.pack`` per pack (0 = auto: as many as :data:`AUTO_PACK_TOKENS` tokens per micro-batch allow
        on CUDA, one run at a time elsewhere, where packing gains nothing)."""
        groups: dict[str, list[RunSpec]] = {}
        for spec in runs:
            groups.setdefault(pack_key(spec.run), []).append(spec)
        packs = []
        for group in groups.values():
            size = self.sweep.pack
            if size == 0:
                cfg = group[0].run
                on_cuda = pick_device(cfg.train.device).type == "cuda"
                size = max(1, AUTO_PACK_TOKENS // (cfg.train.batch_size * cfg.data.seq_len)) if on_cuda else 1
            packs += [group[i : i + size] for i in range(0, len(group), size)]
        return packs

    def check(self, executor: Executor) -> SweepStore:
        """What the sweep and its dry run check before any training; returns the store (not written to)."""
        store = SweepStore(self.sweep.out_dir)
        check_out_dir(store.root)
        store.check_manifest(**self.manifest())
        check_tracking(self.sweep.tracking)  # a tracker's package missing: one line with the install command
        # The real chunk count needs tokenizing (the sweep checks it); a cap below one step fails already.
        for spec in self.runs:
            if spec.run.data.max_train_chunks:
                check_batches(spec.run, spec.run.data.max_train_chunks, "data.max_train_chunks keeps")
        executor.check(self.runs)
        return store

    def check_inputs(self, runs: Sequence[RunSpec], log: Callable[[str], None] = lambda line: None) -> None:
        """Model, targets, context length and data of ``runs``, without loading weights or tokenizing (seconds).

        Raises:
            ValueError, TypeError, SweepAbort: what would fail every run on that model or data, named with the fix.
        """
        for model_cfg in dict.fromkeys(j.run.model for j in runs):
            log(f"model: {check_model(model_cfg)}")
            for device in dict.fromkeys(_device_here(j.run.train.device) for j in runs if j.run.model == model_cfg):
                if quantized := check_quantize(model_cfg, device):
                    log(f"  {quantized}")
            skeleton = model_skeleton(model_cfg)
            for lora in dict.fromkeys(j.run.lora for j in runs if j.run.model == model_cfg):
                n = len(validate(skeleton, lora))
                log(f"  lora {lora.init} r={lora.rank}: {n} modules match targets={lora.targets!r}")
            for run in dict.fromkeys(j.run for j in runs if j.run.model == model_cfg):
                check_context(run, skeleton)
        for data_cfg in dict.fromkeys(j.run.data for j in runs):
            log(f"data: {check_data(data_cfg)}")
