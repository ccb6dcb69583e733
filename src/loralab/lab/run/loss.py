"""Causal-LM loss that never materializes the full logits, with its gradient computed in the forward pass.

The lm_head and a float32 cross-entropy over the whole vocabulary dominate a LoRA step on a small model: for
SmolLM2 (vocab 49,152) a 4 × 128-token batch has 100 MB of float32 logits, and autograd keeps the logits, their
log-softmax and their gradient. :func:`sequence_losses` instead runs the backbone, then the lm_head and the
cross-entropy over row chunks; for each chunk it also forms the gradient w.r.t. the hidden states,
``(softmax(z) − onehot(y)) · W``, and keeps only that (N × d, as small as the hidden states). The backward pass is
then one multiply by the incoming per-token gradient. Same FLOPs as the plain path, O(chunk × V) memory.

The fused path needs a plain, frozen, bias-free ``nn.Linear`` lm_head applied directly to the backbone's last hidden
state. Models that transform the logits (soft-capping, scaling) break that; :func:`fused_loss_ok` checks a model's
logits numerically once, and the lab falls back to the plain path when it disagrees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loralab.inject import eval_mode

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in float32


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row ``CE(h W^T, y)`` for ``h (N, d)``, frozen ``W (V, d)``; returns float32 losses ``(N,)``."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for i in range(0, n, chunk):
            logits = (h[i : i + chunk] @ weight.T).float()  # (c, V)
            t = targets[i : i + chunk]
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            losses[i : i + chunk] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if grad_h is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad_h[i : i + chunk] = probs.to(weight.dtype) @ weight  # (c, d)
        ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_losses[:, None].to(grad_h.dtype), None, None


def _fused_parts(model: nn.Module) -> tuple[nn.Module, Tensor] | None:
    """The backbone and lm_head weight when the fused path can apply, else None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(model, "base_model", None)
    if (
        type(head) is not nn.Linear
        or head.bias is not None
        or head.weight.requires_grad
        or backbone is None
        or backbone is model
    ):
        return None
    return backbone, head.weight


def sequence_losses(model: nn.Module, ids: Tensor, *, fused: bool = True) -> Tensor:
    """Mean next-token cross-entropy of each sequence of a packed batch ``ids (B, T)``: float32 ``(B,)``.

    Labels are the inputs shifted by one. ``fused`` picks the chunked path when the model allows it (see the
    module docstring); both paths give the same values and gradients up to float rounding.
    """
    parts = _fused_parts(model) if fused else None
    if parts is None:
        logits = model(input_ids=ids).logits  # (B, T, V)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        return ce.view(ids.shape[0], -1).mean(1)
    backbone, weight = parts
    hidden = backbone(input_ids=ids).last_hidden_state[:, :-1]  # (B, T-1, d)
    ce = _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, ids[:, 1:].flatten())
    return ce.view(ids.shape[0], -1).mean(1)


@torch.no_grad()
def fused_loss_ok(model: nn.Module, ids: Tensor) -> bool:
    """Whether the fused path applies to ``model``: its logits must be its lm_head applied to the backbone's last
    hidden state and nothing more (a model that soft-caps or scales them fails).

    The check compares logits, not losses: the same matmul on the same hidden states agrees to rounding in any dtype,
    while a chunked loss in bfloat16 may differ from the plain one by more than a fixed tolerance allows.
    """
    parts = _fused_parts(model)
    if parts is None:
        return False
    backbone, weight = parts
    with eval_mode(model):  # the model's own dropout would make the two passes differ
        logits = model(input_ids=ids).logits.float()
        direct = F.linear(backbone(input_ids=ids).last_hidden_state, weight).float()
    tol = max(1e-4, 4 * torch.finfo(weight.dtype).eps) * logits.abs().max().clamp_min(1.0)
    return bool((direct - logits).abs().max() <= tol)


__all__ = ["sequence_losses", "fused_loss_ok"]
