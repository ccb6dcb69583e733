"""Checks of what no single run can get past, shared by the sweep (before and while training) and its dry run."""

from __future__ import annotations

import torch

from .config import RunConfig


class SweepAbort(ValueError):
    """An error that is not one run's fault and would fail every run alike: the sweep stops, naming the fix."""


def check_device(name: str) -> None:
    """Raise :class:`SweepAbort` when ``train.device`` names a device this machine does not have."""
    missing = {"cuda": not torch.cuda.is_available(),
               "mps": not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if missing.get(name):
        raise SweepAbort(f"train.device={name!r} but this machine (torch {torch.__version__}) has no {name.upper()} "
                         f"device; set --set train.device=auto (or cpu), or run where {name} is available")


def check_batches(run: RunConfig, n_train: int, what: str = "the training data has") -> None:
    """Raise :class:`SweepAbort` when ``n_train`` chunks cannot fill one micro-batch (steps cycle through epochs, so
    that is all a run needs)."""
    need = run.train.batch_size
    if n_train < need:
        raise SweepAbort(f"{what} {n_train} chunks of {run.data.seq_len} tokens, fewer than one micro-batch needs "
                         f"(train.batch_size = {need}); raise data.max_train_chunks (0 = all), or lower "
                         "train.batch_size or data.seq_len")
