"""LoRA layers: one base class holds the maths, each layer type says how its weight is a matrix.

``h = base(x) + s · B A dropout(x)`` with ``A: (r, d_in)``, ``B: (d_out, r)`` and ``s = α/r`` (``α/√r`` with rsLoRA).
:class:`LoraLayer` writes ΔW, merge, unmerge and the forward once. A layer type gives three small methods:
``to_matrix``/``from_matrix`` (its weight seen as ``(d_out, d_in)`` and back) and ``apply_weight`` (its op with a
given weight and no bias). The generic LoRA forward is ``apply_weight(x, ΔW)``, exact for every type by linearity;
types override ``lora_delta`` with a factored form that never builds ΔW (and the tests check the two agree).

A 4-bit base (bitsandbytes' ``Linear4bit``, e.g. from transformers' ``BitsAndBytesConfig(load_in_4bit=True)``) is
adapted without importing bitsandbytes here (it is an optional extra): its type is recognised by name, and its weight
is dequantized only where a float matrix is read (:func:`weight_of`, for the init and the shapes). Its base cannot take
an exact update, so merging and the inits that rewrite the base are refused there (:class:`Linear4bit`).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inits import Factors


class LoraStateError(RuntimeError):
    """An illegal state transition (merge twice, unmerge when not merged, ...)."""


class Dropout(nn.Module):
    """Inverted dropout (as ``nn.Dropout``) whose CPU mask comes from 16-bit random integers.

    Four mask entries per 64-bit draw make drawing the mask several times faster than ``nn.Dropout``'s float
    Bernoulli on CPU, where dropout is most of PEFT's cost over the frozen base (docs/benchmarks.md). ``p`` is
    rounded to a multiple of 2⁻¹⁶ (error < 8·10⁻⁶) and the scale uses the rounded value, so the output stays
    unbiased. On other devices it is ``F.dropout`` (a fused kernel there).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.drop = round(p * 65536)  # dropped int16 values out of 65536
        self.scale = 65536 / (65536 - self.drop)

    def masked(self, x: Tensor) -> tuple[Tensor, float]:
        """``x`` with the dropped entries zeroed, and the factor that makes it unbiased (1 where ``x`` is already
        scaled). Callers that feed a linear map scale its small output by the factor instead of ``x``."""
        if not self.training or self.drop == 0:
            return x, 1.0
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True), 1.0
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        bits = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        keep = (bits >= self.drop - 32768).to(x.dtype)  # a float mask: its backward is one multiply
        return x * keep, self.scale

    def forward(self, x: Tensor) -> Tensor:
        y, factor = self.masked(x)
        return y if factor == 1.0 else y * factor

    def extra_repr(self) -> str:
        return f"p={self.p}"


def down(x: Tensor, a: Tensor, scale: float | Tensor) -> Tensor:
    """``scale · x Aᵀ``: the ``(..., r)`` side of the update, where scaling costs r, not d_out, per row.

    ``a`` is ``(r, d_in)``, or ``(K, r, d_in)`` for K runs whose rows of ``x`` are stacked run-major.
    """
    if x.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
        x = x.to(a.dtype)  # under autocast the matmul casts x itself: a round trip through float32 is waste
    h = F.linear(x, a) if a.dim() == 2 else torch.bmm(x.reshape(a.shape[0], -1, a.shape[-1]), a.mT)
    return h * (scale.to(h.dtype) if isinstance(scale, Tensor) else scale)


def add_update(out: Tensor, h: Tensor, b: Tensor, *, inplace: bool = True) -> Tensor:
    """``out + h Bᵀ`` for ``out: (n, d_out)``, ``h: (n, r)``, ``b: (d_out, r)``, or batched per run with a leading K.

    The update is added inside the GEMM (``baddbmm``, or ``addmm_`` in place with ``inplace``, only for a fresh 2-D
    tensor that nothing else holds, as the output of a hook-free ``nn.Linear`` on a 2-D input): no extra pass over
    the output. Under autocast the factors take the autocast dtype, as the matmul would give them.
    """
    device = out.device.type
    if torch.is_autocast_enabled(device) and out.dtype == torch.get_autocast_dtype(device):
        h, b = h.to(out.dtype), b.to(out.dtype)
    if h.dtype == b.dtype == out.dtype:
        if b.dim() == 3:  # out may be a view (a 3-D nn.Linear output): in place would cost a copy in backward
            return torch.baddbmm(out, h, b.mT)
        if inplace:
            return out.addmm_(h, b.t())
    delta = F.linear(h, b) if b.dim() == 2 else torch.bmm(h, b.mT)
    return out + delta.to(out.dtype)


def weight_of(module: nn.Module) -> Tensor:
    """``module.weight`` as a float tensor: the weight itself, or for a 4-bit bitsandbytes weight (which carries its
    ``quant_state``) a dequantized copy in the dtype it was quantized from."""
    weight = typing.cast(Tensor, module.weight)
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    from bitsandbytes.functional import dequantize_4bit  # only reached with bitsandbytes installed: it made `weight`

    return dequantize_4bit(weight.data, state)


class LoraLayer(nn.Module):
    """A frozen module plus a trainable low-rank update (the base of every LoRA layer type).

    To the model's own code the layer looks like its base: attributes it does not have itself (``weight``, ``bias``,
    ``in_features``, ``stride``, ``padding_idx``, ...) are read from ``base_layer``, so a model that reads
    ``self.wo.weight.dtype`` or ``self.conv1.stride`` runs unchanged; the base's parameters stay registered only
    under ``base_layer``, so they appear once in ``named_parameters()`` and the state dict.

    Args:
        base: the module to adapt; kept as ``base_layer`` and never copied.
        rank: r.
        alpha: α; the update is scaled by ``α/r`` or, with ``rslora``, ``α/√r`` (Kalajdzievski 2023).
        dropout: dropout probability on the LoRA branch's input (no op when 0).
        dtype: dtype of A and B.
    """

    one_hot_input = False  # an embedding's input is one-hot: inits take their scheme's `one_hot` variant there
    writable_base = True  # False: the base weight cannot take an exact update (merge and base-rewriting inits refused)

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        rslora: bool = False,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.base_layer = base
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        weight = weight_of(base)
        d_out, d_in = self.to_matrix(weight).shape
        device = weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))
        self.dropout = Dropout(dropout)  # an identity when p = 0 (no op, no copy)
        # Initial factors, kept only when the init moved weight out of the base (pissa/olora): they define the
        # pretrained model (base + s·B0·A0) and the portable export.
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        self.merged = False
        self.disabled = False
        self.init: str | None = None  # the init scheme that made the factors (set by inject.plan)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # own parameters, buffers and submodules
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None:  # still being built (or unpickled)
                raise
            return getattr(base, name)

    # -- what a layer type says ------------------------------------------------------------------------------------
    @staticmethod
    def to_matrix(weight: Tensor) -> Tensor:
        """The base weight viewed as a ``(d_out, d_in)`` matrix."""
        return weight

    def from_matrix(self, m: Tensor) -> Tensor:
        """A ``(d_out, d_in)`` matrix back in the base weight's layout."""
        return m

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base op with ``weight`` (in the base layout) and no bias."""
        raise NotImplementedError

    def lora_delta(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``s · (B A)`` applied to ``x``; generic and exact, types override it with a factored form."""
        x = x.to(a.dtype) if x.is_floating_point() else x
        return self.apply_weight(x, self.from_matrix(self.scale * (b @ a)))

    # -- written once ------------------------------------------------------------------------------------------------
    @property
    def base_weight(self) -> Tensor:
        """The frozen base module's ``weight`` (in the base layout)."""
        return typing.cast(Tensor, self.base_layer.weight)

    @property
    def d_out(self) -> int:
        return self.lora_B.shape[0]

    @property
    def d_in(self) -> int:
        return self.lora_A.shape[1]

    def delta_weight(self) -> Tensor:
        """ΔW = s·B·A in the base weight's layout (float32 or the adapter dtype)."""
        return self.from_matrix(self.scale * (self.lora_B @ self.lora_A))

    @torch.no_grad()
    def set_factors(self, factors: Factors) -> None:
        """Load initial factors; if they carry a new base weight, write it and remember ``A0, B0``."""
        self.lora_A.copy_(factors.a)
        self.lora_B.copy_(factors.b)
        if factors.base is not None:
            w = self.base_weight
            w.copy_(self.from_matrix(factors.base).to(w.dtype))
            self.lora_A0 = self.lora_A.detach().clone()
            self.lora_B0 = self.lora_B.detach().clone()

    def check_mergeable(self, name: str = "LoRA layer") -> None:
        """Raise :class:`LoraStateError` if ΔW cannot be folded into this layer's base weight (``name`` names it)."""
        if not self.writable_base:
            raise LoraStateError(
                f"{name}: cannot merge into its {type(self.base_layer).__name__} base: a 4-bit weight would round "
                f"ΔW away; keep the adapter unmerged (unload(model, merge_weights=False) gives the base back), or "
                f"load the base in float and load the adapter onto it to merge there"
            )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight (``W ← W + s·B·A``)."""
        if self.merged:
            raise LoraStateError("LoRA layer is already merged; call unmerge() before merging again")
        self.check_mergeable()
        w = self.base_weight
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of the base weight (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise LoraStateError("LoRA layer is not merged; there is nothing to unmerge")
        w = self.base_weight
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        if self.disabled:  # the pretrained model: base plus whatever the init moved out of it
            if self.lora_A0 is None:
                return out
            return out + self.lora_delta(x, self.lora_A0, self.lora_B0).to(out.dtype)
        return out + self.lora_delta(self.dropout(x), self.lora_A, self.lora_B).to(out.dtype)

    @classmethod
    def packed_forward(cls, runs: Sequence[LoraLayer], x: Tensor, *args, **kwargs) -> Tensor:
        """One shared frozen base with K runs' adapters on it: the rows of ``x`` belong to runs, run-major (K·n, ...).

        Each run's update is added to its own rows only, so each run's factors get the gradient of its own loss.
        Generic form: each run's ``lora_delta`` on its rows; a layer type may give a batched one.
        """
        out = runs[0].base_layer(x, *args, **kwargs)
        parts = x.chunk(len(runs))
        delta = torch.cat([r.lora_delta(r.dropout(p), r.lora_A, r.lora_B) for r, p in zip(runs, parts)])
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"


class Linear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight ``(out, in)``)."""

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def lora_delta(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return F.linear(down(x, a, self.scale), b)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.merged or self.disabled or type(self.base_layer) is not nn.Linear:
            return super().forward(x, *args, **kwargs)
        # On 2-D rows the in-place add needs no view of the output (autograd would replay one in backward, by copy).
        x2 = x.reshape(-1, x.shape[-1])
        xd, unbias = self.dropout.masked(x2)
        hooked = bool(self.base_layer._forward_hooks)  # a hook may keep the base output: never write into it
        out = add_update(
            self.base_layer(x2), down(xd, self.lora_A, self.scale * unbias), self.lora_B, inplace=not hooked
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    @classmethod
    def packed_forward(cls, runs: Sequence[LoraLayer], x: Tensor, *args, **kwargs) -> Tensor:
        """The K updates as two batched matmuls (``bmm``) when the runs share a rank; else the generic form."""
        if len({r.rank for r in runs}) != 1 or any(type(r) is not type(runs[0]) for r in runs):
            return super().packed_forward(runs, x, *args, **kwargs)
        x3 = x.reshape(len(runs), -1, x.shape[-1])  # (K, n, d_in): rows of run k, as a 3-D base input
        a = torch.stack([r.lora_A * r.scale for r in runs])  # (K, r, d_in); scales as Python floats: no device copy
        b = torch.stack([r.lora_B for r in runs])  # (K, d_out, r)
        xd, unbias = runs[0].dropout.masked(x3)
        out = add_update(runs[0].base_layer(x3, *args, **kwargs), down(xd, a, unbias), b)  # (K, n, d_out)
        return out.view(*x.shape[:-1], out.shape[-1])


class Linear4bit(Linear):
    """LoRA on bitsandbytes' ``Linear4bit`` (nf4/fp4 weight, dequantized by the base's own forward; QLoRA, Dettmers
    et al. 2023).

    The base forward is untouched and the update runs in the adapter's dtype, cast to the output's: at step 0 with
    B = 0 the output is the 4-bit base's, exactly. Merging is refused (:meth:`check_mergeable`): requantizing
    ``W + ΔW`` rounds each entry to the 4-bit grid, whose steps (nf4: 0.08 to 0.30 of the block's largest entry) are
    larger than a trained update's entries, so the merged weight would be off by about as much as ΔW itself. For the
    same reason the inits that rewrite the base (pissa, olora) are refused on it (``inject.validate``).
    """

    writable_base = False


class _StoredTransposed:
    """For a layer type whose weight is stored as ``(d_in, d_out)``: the matrix is its transpose."""

    @staticmethod
    def to_matrix(weight: Tensor) -> Tensor:
        return weight.T

    def from_matrix(self, m: Tensor) -> Tensor:
        return m.T


class GPT2Conv1D(_StoredTransposed, Linear):
    """LoRA on transformers' GPT-2 ``Conv1D`` (weight stored transposed, ``(in, out)``; PEFT ``fan_in_fan_out``)."""

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight


class Embedding(_StoredTransposed, LoraLayer):
    """LoRA on ``nn.Embedding``: the weight ``(num, dim)`` is the matrix ``(dim, num)`` acting on one-hot inputs.

    Inputs are one-hot, so dropout does not apply, and inits take their scheme's ``one_hot`` variant (for PEFT's
    schemes, PEFT's A = 0, B ~ N(0, 1)). A scaled embedding (transformers' Gemma-style ``embed_scale``, which
    multiplies the looked-up rows) scales the update too, so unmerged equals merged.
    """

    one_hot_input = True

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, **kwargs):
        if base.max_norm is not None:
            raise ValueError(
                "LoRA on an nn.Embedding with max_norm is not supported (the renormalisation is not "
                "linear); adapt a model whose embedding has max_norm=None or leave it out of targets"
            )
        kwargs["dropout"] = 0.0
        super().__init__(base, rank, alpha, **kwargs)

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._embed_scaled(F.embedding(x, weight, self._padding_idx))

    def lora_delta(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        h = F.embedding(x, a.T, self._padding_idx)  # (..., r)
        return self._embed_scaled(h @ b.T * self.scale)  # (..., r) @ (r, dim)

    @property
    def _padding_idx(self) -> int | None:
        return typing.cast(nn.Embedding, self.base_layer).padding_idx

    def _embed_scaled(self, h: Tensor) -> Tensor:
        scale = getattr(self.base_layer, "embed_scale", None)
        return h if scale is None else h * (scale.to(h.dtype) if isinstance(scale, Tensor) else scale)


class Conv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: weight ``(C_out, C_in/groups, *k)`` as the matrix ``(C_out, C_in/groups·∏k)``.

    Exact for any stride, padding, padding_mode, dilation and groups: the generic path convolves with ΔW through the
    base's own ``_conv_forward``. With groups = 1 the factored path runs A as an r-channel conv with the base's
    geometry and B as a 1×1 channel mix, which is the same map.
    """

    @staticmethod
    def to_matrix(weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, m: Tensor) -> Tensor:
        return m.reshape(self.base_weight.shape)

    @property
    def _conv(self) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
        return typing.cast("nn.Conv1d | nn.Conv2d | nn.Conv3d", self.base_layer)

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv._conv_forward(x, weight, None)

    def lora_delta(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        if self._conv.groups != 1:
            return super().lora_delta(x, a, b)
        kernel = a.reshape(a.shape[0], *self.base_weight.shape[1:])  # (r, C_in, *k)
        h = self._conv._conv_forward(x.to(a.dtype), kernel, None)  # (N, r, *spatial)
        return F.linear(h.movedim(1, -1), b).movedim(-1, 1) * self.scale  # (N, C_out, *spatial)


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _is_bnb_4bit(module: nn.Module) -> bool:
    # By name, so the library never imports bitsandbytes (an optional extra); its subclasses count too.
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def layer_type_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that adapts ``module``, or None if its type is not supported."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None  # nn.MultiheadAttention reads out_proj.weight directly; a wrapper would be silently ignored
    if _is_bnb_4bit(module):  # an nn.Linear subclass whose weight is packed
        return Linear4bit
    if isinstance(module, nn.Linear):
        return Linear
    if isinstance(module, nn.Embedding):
        return Embedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv
    if _is_gpt2_conv1d(module):
        return GPT2Conv1D
    return None


SUPPORTED_TYPES = "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, transformers' GPT-2 Conv1D, bitsandbytes' Linear4bit"
