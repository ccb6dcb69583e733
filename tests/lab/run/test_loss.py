"""The fused, chunked LM loss equals the plain logits + cross-entropy path in value and gradient, and knows when it
does not apply."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loralab import IdentityWarning, LoraConfig, inject
from loralab.lab.run import loss as loss_mod
from loralab.lab.run.loss import fused_loss_ok, sequence_losses


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    with pytest.warns(IdentityWarning):   # random-both on purpose: B != 0, so every factor has a gradient
        return inject(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"], init="random-both"), seed=0)


def losses_and_grads(model, ids, fused):
    model.zero_grad(set_to_none=True)
    per_seq = sequence_losses(model, ids, fused=fused)
    (per_seq * torch.arange(1, len(ids) + 1)).sum().backward()   # unequal weights: per-row gradients must be right
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return per_seq.detach(), grads


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])   # shared CPU
@given(batch=st.integers(1, 3), seq=st.integers(2, 24), chunk_rows=st.integers(1, 40))
def test_fused_matches_plain_in_value_and_gradient(tiny_lm, batch, seq, chunk_rows):
    vocab = tiny_lm.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seq))
    plain, g_plain = losses_and_grads(tiny_lm, ids, fused=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loss_mod, "CHUNK_ELEMENTS", chunk_rows * vocab)   # forces several chunks, ragged last one
        fused, g_fused = losses_and_grads(tiny_lm, ids, fused=True)
    assert fused.shape == (batch,)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert g_plain.keys() == g_fused.keys() and g_plain
    # float32 sums in another order: the error is relative to the largest gradient anywhere (a factor's gradient can be
    # ~0, e.g. q with a 2-token sequence, and its rounding noise then has no relative scale of its own)
    scale = max(g.abs().max().item() for g in g_plain.values())
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_plain_path_is_the_hf_loss(tiny_lm):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = tiny_lm(input_ids=ids, labels=ids).loss
        ours = sequence_losses(tiny_lm, ids, fused=False).mean()
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)


def test_fused_loss_ok_on_a_plain_model(tiny_lm):
    assert fused_loss_ok(tiny_lm, torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1)))


def test_fused_loss_refuses_a_model_that_reshapes_its_logits(tiny_lm, monkeypatch):
    """A head that rescales its logits (soft-capping, a logit scale) makes the fused loss wrong: the check must see
    it numerically."""
    forward = type(tiny_lm).forward

    def capped(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = 4.0 * out.logits   # the tiny model's logits are too small for tanh capping to bite
        return out

    monkeypatch.setattr(type(tiny_lm), "forward", capped)
    assert not fused_loss_ok(tiny_lm, torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1)))


def test_a_trainable_lm_head_takes_the_plain_path(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)   # nothing frozen
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    assert not fused_loss_ok(model, ids)
    sequence_losses(model, ids).sum().backward()
    assert model.get_output_embeddings().weight.grad is not None   # the plain path trains the head


def test_fused_loss_ok_on_a_model_with_dropout_in_train_mode():
    """GPT-2 has its own dropout (0.1): the check runs in eval mode, else two passes with other masks would differ;
    the model's mode is left as it was."""
    from core_helpers import tiny_gpt2

    model = tiny_gpt2().requires_grad_(False).train()
    assert model.config.resid_pdrop > 0
    assert fused_loss_ok(model, torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3)))
    assert model.training
