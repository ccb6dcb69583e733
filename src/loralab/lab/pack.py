"""Several runs trained at once on one frozen base ("packing"), so a grid of small runs fills a large device.

A pack of K runs shares one copy of the base model. Each run keeps its own LoRA layers, built by the library's
:func:`loralab.inject.plan` exactly as a solo run builds them (same factors for the same config and seed), its own
batches, learning rate, schedule and clipping. A step stacks the runs' micro-batches along the batch dimension,
run-major ``(K·b, T)``: the frozen base runs once over all of them, and each adapted layer adds run k's low-rank
update to run k's rows only. The loss is the sum of the runs' mean losses, so each run's factors get exactly the
gradient of its own loss. A diverged run is dropped from the active set and the others go on undisturbed.

For ``nn.Linear`` targets of one rank the K updates are two batched matmuls (``bmm``); other layer types fall back
to each run's own ``lora_delta`` on its rows. Dropout is drawn once over the stacked input (independent per element,
so per run as well; the masks differ from a solo run's, the distribution does not).

Runs can share a pack only if they differ in nothing but :data:`PACKABLE` fields, and an init that rewrites the
base weight (pissa, olora) is always packed alone.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import Tensor, nn

from loralab.inits import get_scheme
from loralab.inject import plan, warn_identity
from loralab.layers import Linear, LoraLayer, add_update, down

from .config import RunConfig
from .typecheck import to_dict

PACKABLE = {"lora": ("init", "alpha", "init_kwargs", "init_pattern", "alpha_pattern"),
            "train": ("lr", "seed", "grad_clip", "warmup_ratio", "weight_decay", "diverge_factor")}


def pack_key(run: RunConfig) -> str:
    """Runs with equal keys can train in one pack; a base-rewriting init gets a key of its own."""
    d = to_dict(run)
    for section, fields in PACKABLE.items():
        for f in fields:
            d[section].pop(f)
    if any(get_scheme(i).modifies_base for i in {run.lora.init, *run.lora.init_pattern.values()}):
        d["alone"] = json.dumps(to_dict(run), sort_keys=True)
    return json.dumps(d, sort_keys=True)


class PackedLayer(nn.Module):
    """One frozen module and the LoRA layers of K runs on it; rows of the input belong to runs, run-major."""

    def __init__(self, base: nn.Module, runs: list[LoraLayer]):
        super().__init__()
        self.base_layer = base
        self.runs = nn.ModuleList(runs)   # each wraps the same ``base`` (shared, not copied)
        self.active: list[int] = list(range(len(runs)))
        self.batched = all(type(r) is Linear for r in runs) and len({r.rank for r in runs}) == 1

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self.active:
            return self.base_layer(x, *args, **kwargs)
        runs = [self.runs[k] for k in self.active]
        if not self.batched:
            out = self.base_layer(x, *args, **kwargs)
            parts = x.chunk(len(runs))
            delta = torch.cat([r.lora_delta(r.dropout(p), r.lora_A, r.lora_B) for r, p in zip(runs, parts)])
            return out + delta.to(out.dtype)
        x3 = x.reshape(len(runs), -1, x.shape[-1])                # (K, n, d_in): rows of run k, as a 3-D base input
        a = torch.stack([r.lora_A * r.scale for r in runs])     # (K, r, d_in); scales as Python floats: no device copy
        b = torch.stack([r.lora_B for r in runs])               # (K, d_out, r)
        xd, unbias = runs[0].dropout.masked(x3)
        out = add_update(self.base_layer(x3, *args, **kwargs), down(xd, a, unbias), b)   # (K, n, d_out)
        return out.view(*x.shape[:-1], out.shape[-1])


class Pack:
    """A base model copy with the LoRA layers of ``runs`` packed into it (see the module docstring)."""

    def __init__(self, base_model: nn.Module, runs: list[RunConfig]):
        if len({pack_key(r) for r in runs}) != 1:
            raise ValueError("runs in one pack must differ only in " +
                             ", ".join(f"{s}.{f}" for s, fs in PACKABLE.items() for f in fs))
        # The pack's model is a new module tree on the same frozen tensors (no second copy of the base on the
        # device), except when an init rewrites base weights: then the tensors are copied too.
        moves = any(get_scheme(i).modifies_base for r in runs for i in {r.lora.init, *r.lora.init_pattern.values()})
        shared = {} if moves else {id(t): t for t in base_model.parameters()}   # buffers (small) stay per pack
        self.model = copy.deepcopy(base_model, shared)
        plans = [plan(self.model, r.lora, seed=r.train.seed) for r in runs]
        for p, r in zip(plans, runs):
            warn_identity(p, r.lora, stacklevel=3)
        self.model.requires_grad_(False)
        self.layers: dict[str, PackedLayer] = {}
        for i, item in enumerate(plans[0]):
            per_run = [p[i] for p in plans]
            for p in per_run:
                p.layer.set_factors(p.factors)
                p.layer.lora_A.requires_grad_(True)
                p.layer.lora_B.requires_grad_(True)
            packed = PackedLayer(item.layer.base_layer, [p.layer for p in per_run])
            parent, _, child = item.name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, packed)
            self.layers[item.name] = packed
        self.size = len(runs)

    def set_active(self, active: list[int]) -> None:
        for layer in self.layers.values():
            layer.active = list(active)

    def run_layers(self, k: int) -> dict[str, LoraLayer]:
        return {name: layer.runs[k] for name, layer in self.layers.items()}

    def run_params(self, k: int) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.runs[k].lora_A, layer.runs[k].lora_B)]

    @torch.no_grad()
    def identity(self, ids: Tensor, active: list[int], reference: nn.Module) -> list[float]:
        """Max |adapted logits − ``reference`` logits| of each run in ``active`` on ``ids`` (eval mode).

        ``reference`` is the untouched base model: with no run active this pack's model is not that for an init
        that moved weight out of the base (pissa, olora).
        """
        modes = [(m, m.training) for m in (self.model, reference)]
        try:
            reference.eval()
            ref = reference(input_ids=ids).logits.float()
            self.model.eval()
            self.set_active(active)
            out = self.model(input_ids=ids.repeat(len(active), 1)).logits.float()
        finally:
            for m, training in modes:
                m.train(training)
        return [(o - ref).abs().max().item() for o in out.chunk(len(active))]

__all__ = ["PACKABLE", "Pack", "PackedLayer", "pack_key"]
