"""The base model and dataset of the runs a process trains, kept loaded while consecutive runs share them."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config.schema import DataConfig, ModelConfig, RunConfig
from ..runtime import pick_device
from .data import PackedData, load_data
from .models import load_model


class Assets:
    """Keeps the last base model and dataset loaded, so consecutive runs on the same ones load them once.

    A load that raises leaves nothing cached (not the old model under the new key), so the next run loads afresh.
    ``pretrained`` is the training loop's cache of the pretrained model's eval losses on this model and data (one
    eval per process, not one per run); it is emptied whenever either changes.
    """

    def __init__(self) -> None:
        self._model_key: tuple[ModelConfig, str] | None = None
        self._data_key: DataConfig | None = None
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.data: PackedData | None = None
        self.pretrained: dict = {}

    def get(self, run: RunConfig) -> tuple[nn.Module, PackedData]:
        """The frozen base model (on the run's device) and the packed data of ``run``."""
        model_key = (run.model, run.train.device)
        if model_key != self._model_key or self.model is None:
            self._model_key = self._data_key = self.model = self.tokenizer = self.data = None  # free memory first
            self.pretrained = {}
            model, tokenizer = load_model(run.model, pick_device(run.train.device))
            model.requires_grad_(False)
            self.model, self.tokenizer, self._model_key = model, tokenizer, model_key
        if run.data != self._data_key or self.data is None:
            self._data_key = self.data = None
            self.pretrained = {}
            self.data = load_data(run.data, self.tokenizer)
            self._data_key = run.data
        return self.model, self.data
