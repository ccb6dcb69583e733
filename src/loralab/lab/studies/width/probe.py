"""The width sweep's parts (``width.py`` runs them): the model family, one LoRA probe at one LR, the spike rule and the
search for the largest stable LR. Nothing here reads or writes files.

Family (:class:`WidthMLP`): x ∈ R^d → relu(embed) → (depth − 1) × relu(n×n) → head (n×n), standard parametrisation
(every weight ~ N(0, gain²/fan_in), no µP multipliers: the prediction is about such models). The head's n outputs are
read out one by one (MSE averaged over coordinates), so the loss sees the adapted features coordinate-wise; a scalar
readout would mix in its own 1/√n or 1/n. ``width.py`` pretrains it and builds the fine-tuning task.

Probe: LoRA (:func:`loralab.inject`, rank r, α) on the pretrained head, d_in = d_out = n; AdamW on the factors at a
constant LR (no warmup unless ``probe.warmup_steps``), no clipping, a fixed number of minibatch steps over a fixed train
set. Unstable = any train loss non-finite or > spike_factor × the step-0 loss, even if it recovers later. All but the
LoRA branch is frozen, so the head's input z and output W z are computed once per width and seed, and a probe's forward
is W z + s·B·A·z (``LoraLayer.lora_delta``), the adapted model's output (a test checks) at O(n·r) instead of O(n²).

Search (:func:`max_stable`): LRs lie on the grid 2^(k/per_octave). From a start guess it walks an octave at a time, up
while stable or down while unstable, bisects the bracket to adjacent grid points, then confirms: the ``confirm`` points
above the answer must be unstable too, and a stable one (a non-monotone cliff) restarts the walk from there.
"""

from __future__ import annotations

import math
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loralab import IdentityWarning, LoraConfig, LoraLayer, get_scheme, inject, lora_param_groups
from loralab.inits import stable_seed

from ...config.schema import require


@dataclass(frozen=True)
class FamilyConfig:
    d_in: int = 32  # input dimension, the same at every width
    depth: int = 2  # n×n layers; LoRA adapts the last (the head), whose outputs are the readout
    pretrain_steps: int = 200  # Adam steps on the teacher; the result is cached per width and seed
    pretrain_batch: int = 64
    pretrain_lr: float = 0.3  # Adam lr × fan-in, per layer (1.0 kills ~half the relu units)
    shift_rank: int = 4  # k: rank of the change of the teacher's head that makes the fine-tuning task
    shift_scale: float = 1.0  # c: per-coordinate RMS of that change, the same at every width
    samples: int = 1024  # fine-tuning train set, shared by every probe of a width and seed

    def __post_init__(self):
        for name in ("d_in", "depth", "pretrain_batch", "shift_rank", "samples"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        require(self.pretrain_steps >= 0, f"pretrain_steps must be >= 0; got {self.pretrain_steps}")
        for name in ("pretrain_lr", "shift_scale"):
            require(getattr(self, name) > 0, f"{name} must be > 0; got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ProbeConfig:
    rank: int = 8  # LoRA rank r, the same at every width
    alpha: float = 16.0  # s = α/r = 2, as in the study
    steps: int = 100  # AdamW steps per probe
    batch_size: int = 64
    weight_decay: float = 0.0  # AdamW's decoupled decay; 0 leaves the probe to Adam's own dynamics
    warmup_steps: int = 0  # linear warmup; 0 in the stability probe (warmup hides Init[B]'s first-step limit)
    spike_factor: float = 10.0  # unstable: any loss > spike_factor × the step-0 loss, or non-finite
    lr_min: float = 2.0**-20  # ends of the LR grid
    lr_max: float = 4.0
    per_octave: int = 4  # grid points per doubling: 4 = steps of 2^(1/4)
    confirm: int = 2  # grid points above the answer that must be unstable as well

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "per_octave", "confirm"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        require(self.alpha > 0 and self.weight_decay >= 0, "alpha must be > 0 and weight_decay >= 0")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps); got {self.warmup_steps}")
        require(self.spike_factor > 1, f"spike_factor must be > 1; got {self.spike_factor!r}; try 10")
        require(0 < self.lr_min < self.lr_max, f"need 0 < lr_min < lr_max; got {self.lr_min!r}, {self.lr_max!r}")


# ---- model family --------------------------------------------------------------------------------------------------


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded from ``parts``: each random draw has its own stream, stable across machines."""
    return torch.Generator().manual_seed(stable_seed(*parts))


def _linear(d_in: int, d_out: int, gain: float, g: torch.Generator | None) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False, device="meta")  # meta: no throwaway init of an n×n matrix
    w = torch.empty(d_out, d_in, device="meta") if g is None else torch.randn(d_out, d_in, generator=g)
    layer.weight = nn.Parameter(w * (gain / math.sqrt(d_in)))
    return layer


class WidthMLP(nn.Module):
    """x (B, d_in) → relu(embed) → (depth − 1) × relu(n×n) → head (n×n): (B, n), read out per coordinate.

    Args:
        d_in, width, depth: input size, hidden width n, number of n×n layers (the last is the head).
        g: draws He-initialised weights; ``None`` leaves them on the meta device (to load a state dict into).
    """

    def __init__(self, d_in: int, width: int, depth: int, g: torch.Generator | None):
        super().__init__()
        self.embed = _linear(d_in, width, math.sqrt(2.0), g)
        self.hidden = nn.ModuleList(_linear(width, width, math.sqrt(2.0), g) for _ in range(depth - 1))
        self.head = _linear(width, width, 1.0, g)

    def features(self, x: Tensor) -> Tensor:
        """The head's input z, (B, n)."""
        h = F.relu(self.embed(x))
        for layer in self.hidden:
            h = F.relu(layer(h))
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class Features:
    """The frozen part of the adapted model on the fine-tuning train set, computed once per width and seed."""

    z: Tensor  # (N, n) the head's input
    base: Tensor  # (N, n) the head's output W z
    y: Tensor  # (N, n) fine-tuning targets
    head: nn.Linear  # the pretrained head, to adapt
    info: dict  # pretraining losses, target sizes


# ---- one probe, the spike rule, the search -------------------------------------------------------------------------


def spike_step(losses: Sequence[float], factor: float) -> int | None:
    """First step whose loss is non-finite or > ``factor`` × the step-0 loss (a spike counts even if it recovers)."""
    for t, loss in enumerate(losses):
        if not math.isfinite(loss) or loss > factor * losses[0]:
            return t
    return None


def adapted_head(feats: Features, init: str, probe: ProbeConfig, seed: int) -> nn.ModuleDict:
    """``{"head": LoRA layer}`` made by :func:`loralab.inject` on the pretrained head (weight shared unless the
    init rewrites it)."""
    w = feats.head.weight.detach()
    head = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    head.weight = nn.Parameter(w.clone() if get_scheme(init).modifies_base else w, requires_grad=False)
    host = nn.ModuleDict({"head": head})
    with warnings.catch_warnings():  # random-both moves the output at init: the probe measures from there on purpose
        warnings.simplefilter("ignore", IdentityWarning)
        inject(host, LoraConfig(rank=probe.rank, alpha=probe.alpha, init=init, targets=("head",)), seed=seed)
    return host


def run_probe(feats: Features, init: str, lr: float, probe: ProbeConfig, seed: int) -> dict:
    """Fine-tune a fresh adapter at ``lr``; returns ``{lr, stable, spike_step, max_ratio, final_loss, losses}``."""
    host = adapted_head(feats, init, probe, seed)
    layer = typing.cast(LoraLayer, host["head"])
    with torch.no_grad():
        base = layer.base_layer(feats.z) if get_scheme(init).modifies_base else feats.base
    opt = torch.optim.AdamW(lora_param_groups(host, lr, weight_decay=probe.weight_decay))
    warm = probe.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warm) if warm else 1.0)
    g, n = generator(seed, "batches"), feats.z.shape[0]
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-probe.steps * probe.batch_size // n))])
    losses = []
    for idx in order[: probe.steps * probe.batch_size].view(probe.steps, -1).to(feats.z.device):
        out = base[idx] + layer.lora_delta(feats.z[idx], layer.lora_A, layer.lora_B)  # (B, n): the adapted head
        loss = F.mse_loss(out, feats.y[idx])  # mean over coordinates: a coordinate-wise readout
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break  # nothing to learn past a NaN
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    spike = spike_step(losses, probe.spike_factor)
    finite = [x for x in losses if math.isfinite(x)]
    return {
        "lr": lr,
        "stable": spike is None,
        "spike_step": spike,
        "max_ratio": max(finite) / losses[0] if finite else math.nan,
        "final_loss": losses[-1],
        "losses": losses,
    }


def max_stable(
    stable: Callable[[int], bool], k_min: int, k_max: int, start: int, step: int, confirm: int
) -> int | None:
    """Largest grid index k in [k_min, k_max] with ``stable(k)``, walking, bisecting and confirming (module docstring).

    For a monotone ``stable`` the answer is exact; otherwise it is a stable k whose next ``confirm`` points are not.
    Returns ``None`` when ``k_min`` itself is unstable. ``stable`` is called at most once per k.
    """
    seen: dict[int, bool] = {}

    def ok(k: int) -> bool:
        if k not in seen:
            seen[k] = stable(k)
        return seen[k]

    k = min(max(start, k_min), k_max)
    while not ok(k):  # down an octave at a time to a stable point
        if k == k_min:
            return None
        k = max(k - step, k_min)
    lo = k
    while True:
        hi = lo
        while ok(hi):  # up an octave at a time until unstable: lo stable, hi unstable
            if hi == k_max:
                return k_max
            lo, hi = hi, min(hi + step, k_max)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        above = [j for j in range(lo + 1, min(lo + confirm, k_max) + 1) if ok(j)]
        if not above:
            return lo
        lo = max(above)


def cell_key(init: str, width: int, seed: int) -> str:
    """The key of one cell (init × width × seed) in the width study's results."""
    return f"{init}|n{width}|seed{seed}"
