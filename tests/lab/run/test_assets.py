"""The assets a process keeps loaded across runs: a load that raises must leave nothing behind that a later run uses
(issue 22, item 3: a failed model load once poisoned the runs after it)."""

from __future__ import annotations

import shutil

import pytest
import torch

from loralab.lab.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from loralab.lab.run.assets import Assets
from loralab.lab.run.models import ModelError, load_model


def without_tokenizer(src, dst):
    """A model directory whose weights and config are fine but whose tokenizer is gone: it fails only when loaded."""
    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).unlink()
    return dst


def run_on(model_dir, chat_jsonl) -> RunConfig:
    return RunConfig(model=ModelConfig(name=str(model_dir)), train=TrainConfig(device="cpu"),
                     data=DataConfig(source=str(chat_jsonl), seq_len=32, max_train_chunks=8, max_eval_chunks=2))


def test_a_failed_load_leaves_nothing_a_later_run_would_use(tiny_lm_dir, chat_jsonl, tmp_path, one_thread):
    good, bad = run_on(tiny_lm_dir, chat_jsonl), run_on(without_tokenizer(tiny_lm_dir, tmp_path / "bad"), chat_jsonl)
    assets = Assets()
    assets.get(good)
    for _ in range(2):   # not the good model under the bad model's name, the second time either
        with pytest.raises(ModelError, match="tokenizer"):
            assets.get(bad)
    model, data = assets.get(good)
    reference, _ = load_model(good.model, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert len(data.train) == 8 and not any(p.requires_grad for p in model.parameters())
