"""Small modules and inputs for the core tests: one entry per supported layer type and geometry."""

from __future__ import annotations

import torch
from torch import nn


def gpt2_conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    m = Conv1D(nf, nx)
    nn.init.normal_(m.weight, std=0.2)
    nn.init.normal_(m.bias, std=0.2)
    return m


class ScaledEmbedding(nn.Embedding):
    """transformers' scaled word embedding (Gemma and others): the looked-up rows times ``embed_scale``."""

    def __init__(self, *args, embed_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


# name -> (module factory, input factory); every module is float32 with seeded weights.
LAYER_CASES = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(3, 5, 12)),
    "embedding": (lambda: nn.Embedding(20, 10, padding_idx=0), lambda: torch.randint(0, 20, (3, 5))),
    "embedding-scaled": (lambda: ScaledEmbedding(20, 10, embed_scale=3.0), lambda: torch.randint(0, 20, (3, 5))),
    "conv1d": (lambda: nn.Conv1d(6, 10, 3, padding=1), lambda: torch.randn(2, 6, 9)),
    "conv2d-groups-dilation-reflect": (
        lambda: nn.Conv2d(6, 12, 3, padding=2, dilation=2, groups=3, padding_mode="reflect"),
        lambda: torch.randn(2, 6, 7, 7)),
    "conv2d-stride-circular": (lambda: nn.Conv2d(4, 10, (3, 2), stride=2, padding=1, padding_mode="circular"),
                               lambda: torch.randn(2, 4, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(3, 8, 2, stride=(1, 2, 1), padding=1), lambda: torch.randn(2, 3, 4, 5, 4)),
    "gpt2-conv1d": (lambda: gpt2_conv1d(12, 10), lambda: torch.randn(3, 5, 12)),
}


def make_case(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A wrapped module (so the target has a parent) and an input for it."""
    module_fn, input_fn = LAYER_CASES[name]
    torch.manual_seed(seed)
    model = nn.Sequential(module_fn())
    return model, input_fn()


def perturb(model: nn.Module, std: float = 0.3, seed: int = 1) -> None:
    """Make every LoRA factor non-zero, as after some training."""
    from loralab import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * std)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * std)


def tiny_llama(seed: int = 0, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()
