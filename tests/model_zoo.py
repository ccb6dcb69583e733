"""Tiny random-weight models of many architectures, built from configs (nothing is downloaded), with their inputs.

Each :class:`Arch` says how to build the model, a batch to run it on, one training example for a Trainer, the
modules one usually adapts in it, and which of them PEFT's LoRA means the same as loralab's (a depthwise conv's
does not: PEFT runs A as a dense conv). A model this transformers version cannot build is skipped by
:func:`build`, naming why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

VOCAB = 64


@dataclass(frozen=True)
class Arch:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]   # forward kwargs for a batch of 2, no labels
    example: Callable[[torch.Generator], dict[str, torch.Tensor]]  # one training example, labels included
    targets: tuple[str, ...]
    peft_targets: tuple[str, ...] | None = None   # the targets PEFT means the same as loralab (default: targets)
    modules_to_save: tuple[str, ...] = ()
    peft_task: str | None = None                  # PEFT's task_type, as a PEFT user would set it
    all_linear: bool = True                       # whether "all-linear" leaves anything to adapt

    @property
    def same_in_peft(self) -> tuple[str, ...]:
        return self.targets if self.peft_targets is None else self.peft_targets


def build(arch: Arch) -> nn.Module:
    """The seeded model in eval mode, or a skip that names what this transformers version lacks."""
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return arch.make().eval()
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        import transformers

        pytest.skip(f"{arch.name} cannot be built offline with transformers {transformers.__version__}: {e}")


def main_output(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"]


def _ids(g, n=2, t=8):
    return torch.randint(3, VOCAB, (n, t), generator=g)


def _lm_inputs(g):
    return {"input_ids": _ids(g)}


def _lm_example(g):
    ids = _ids(g, 1)[0]
    return {"input_ids": ids, "labels": ids}


def _cls_example(g):
    return {"input_ids": _ids(g, 1)[0], "labels": torch.randint(0, 3, (), generator=g)}


def _s2s_inputs(g):
    return {"input_ids": _ids(g), "decoder_input_ids": _ids(g, t=5)}


def _s2s_example(g):
    return {"input_ids": _ids(g, 1)[0], "labels": _ids(g, 1, 5)[0]}


def _pixels(g, n=2, size=16):
    return torch.randn(n, 3, size, size, generator=g)


def _image_example(size):
    return lambda g: {"pixel_values": _pixels(g, 1, size)[0], "labels": torch.randint(0, 3, (), generator=g)}


def _audio_inputs(g):
    return {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": _ids(g, t=5)}


def _audio_example(g):
    return {"input_features": torch.randn(8, 32, generator=g), "labels": _ids(g, 1, 5)[0]}


def _decoder(config_name: str, model_name: str, **extra) -> Callable[[], nn.Module]:
    def make():
        import transformers

        cfg = getattr(transformers, config_name)(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, **extra)
        return getattr(transformers, model_name)(cfg)
    return make


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    max_position_embeddings=64))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0, pad_token_id=0))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64, num_labels=3))


def _whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                     layer_type="basic", num_labels=3))


def _convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                         num_labels=3))


class SmallCNN(nn.Module):
    """A hand-built CNN: a plain conv, a grouped conv (groups = 2), a linear head; returns a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)   # 4 logits (labels use 3): rank 4 fits it

    def forward(self, pixel_values, labels=None):
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values))))
        logits = self.fc(h.mean((2, 3)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"logits": logits} if loss is None else {"loss": loss, "logits": logits}


ARCHS = [
    Arch("llama", _decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2), _lm_inputs, _lm_example,
         ("q_proj", "v_proj", "embed_tokens"), peft_task="CAUSAL_LM"),
    Arch("qwen2", _decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2), _lm_inputs, _lm_example,
         ("q_proj", "v_proj"), peft_task="CAUSAL_LM"),
    Arch("mistral", _decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=2), _lm_inputs, _lm_example,
         ("q_proj", "v_proj"), peft_task="CAUSAL_LM"),
    Arch("gemma", _decoder("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8), _lm_inputs,
         _lm_example, ("q_proj", "v_proj", "embed_tokens"), peft_task="CAUSAL_LM"),
    Arch("phi3", _decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                          bos_token_id=1), _lm_inputs, _lm_example, ("qkv_proj", "o_proj"), peft_task="CAUSAL_LM"),
    Arch("gpt_neox", _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM"), _lm_inputs, _lm_example,
         ("query_key_value", "dense"), peft_task="CAUSAL_LM"),
    Arch("opt", _opt, _lm_inputs, _lm_example, ("q_proj", "v_proj"), peft_task="CAUSAL_LM"),
    Arch("gpt2", _gpt2, _lm_inputs, _lm_example, ("c_attn", "c_proj"), peft_task="CAUSAL_LM"),
    Arch("bert-classifier", _bert, lambda g: {"input_ids": _ids(g)}, _cls_example, ("query", "value"),
         modules_to_save=("classifier",), peft_task="SEQ_CLS"),
    Arch("t5", _t5, _s2s_inputs, _s2s_example, ("q", "v", "wo"), peft_task="SEQ_2_SEQ_LM"),
    Arch("vit-classifier", _vit, lambda g: {"pixel_values": _pixels(g)}, _image_example(16),
         ("q_proj", "v_proj", "projection"), modules_to_save=("classifier",)),
    Arch("whisper", _whisper, _audio_inputs, _audio_example, ("q_proj", "v_proj", "conv1"),
         peft_targets=("q_proj", "v_proj")),   # PEFT's own Conv1d wrapper has no `stride`, which Whisper reads
    Arch("resnet", _resnet, lambda g: {"pixel_values": _pixels(g, size=32)}, _image_example(32), ("convolution",),
         modules_to_save=("classifier",), all_linear=False),   # its one linear layer is the head
    Arch("convnext-depthwise", _convnext, lambda g: {"pixel_values": _pixels(g, size=32)}, _image_example(32),
         ("dwconv", "pwconv1", "pwconv2"), peft_targets=("pwconv1", "pwconv2"), modules_to_save=("classifier",)),
    Arch("cnn-grouped", SmallCNN, lambda g: {"pixel_values": _pixels(g)}, _image_example(16),
         ("conv1", "conv2", "fc"), peft_targets=("conv1", "fc")),
]
BY_NAME = {a.name: a for a in ARCHS}
