"""The LoRA forward compiles into one graph (no graph breaks), solo and packed, with and without dropout: what
``torch.compile`` needs to fuse it with the base. ``torch._dynamo.explain`` traces without generating code: seconds."""

from __future__ import annotations

import warnings

import pytest
import torch

from loralab import LoraConfig, inject

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def tiny_llama(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir)


def explain(module, ids):
    torch._dynamo.reset()
    return torch._dynamo.explain(module)(input_ids=ids)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_injected_backbone_is_one_graph(tiny_llama, dropout):
    model = inject(tiny_llama, LoraConfig(rank=4, targets=ALL_LINEAR, dropout=dropout))
    model.train()
    ex = explain(model.base_model, torch.randint(0, 200, (2, 16)))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]


def test_packed_backbone_is_one_graph(tiny_llama):
    from loralab.lab.config.schema import RunConfig, TrainConfig
    from loralab.lab.run.pack import Pack

    runs = [RunConfig(lora=LoraConfig(rank=4, targets=ALL_LINEAR, init=i), train=TrainConfig(seed=s))
            for s, i in enumerate(["standard", "reversed", "orthogonal-qr-match"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack = Pack(tiny_llama, runs)
    ex = explain(pack.model.base_model, torch.randint(0, 200, (6, 16)))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
