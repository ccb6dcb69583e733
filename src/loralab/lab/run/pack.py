"""Several runs trained at once on one frozen base ("packing"), so a grid of small runs fills a large device.

Each run of a pack is the library's own injected model (:func:`loralab.inject`, the same factors as anywhere else
for the same config and seed) on a module tree that shares the base's frozen tensors (no second copy of the weights;
buffers are small and stay per tree). A pack of one is that model itself. For K > 1 a pack model shares the same
tensors and holds, at each adapted position, a :class:`PackedLayer` with the K runs' layers: a step stacks the runs'
micro-batches run-major ``(K·b, T)``, the frozen base runs once over all of them, and the layer type's
:meth:`loralab.layers.LoraLayer.packed_forward` adds run k's update to run k's rows only. The loss is the sum of the
runs' mean losses, so each run's factors get exactly the gradient of its own loss. A diverged run leaves the active
set and the others go on. Dropout is drawn once over the stacked input (independent per element, so per run as well).

Runs can share a pack only if they differ in nothing but fields whose role is :data:`..config.schema.PER_RUN`, and an
init that rewrites the base weight (pissa, olora) is always packed alone (on its own copy of the weights). A 4-bit
base (``model.quantize``) packs like a float one: its frozen packed weights are shared the same way, each run's update
is its own, and no init may rewrite it (the config refuses that). ``model.quantize`` is not per run, so a 4-bit and a
float base are never in one pack.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import loralab
from loralab.inject import eval_mode
from loralab.layers import LoraLayer

from ..config.schema import PER_RUN, RunConfig, fields_with_role
from ..config.typecheck import to_dict

__all__ = ["Pack", "PackedLayer", "pack_key"]


def pack_key(run: RunConfig) -> str:
    """Runs with equal keys can train in one pack; a base-rewriting init gets a key of its own."""
    d = to_dict(run)
    for section, name in fields_with_role(PER_RUN):
        d[section].pop(name)
    if run.rewrites_base:
        d["alone"] = json.dumps(to_dict(run), sort_keys=True)
    return json.dumps(d, sort_keys=True)


class PackedLayer(nn.Module):
    """The LoRA layers of K runs on one shared frozen module; rows of the input belong to runs, run-major."""

    def __init__(self, runs: Sequence[LoraLayer]):
        super().__init__()
        self.runs = nn.ModuleList(runs)  # each wraps a module on the same frozen tensors
        self.active: list[int] = list(range(len(runs)))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        layers = typing.cast(Sequence[LoraLayer], self.runs)
        if not self.active:
            return layers[0].base_layer(x, *args, **kwargs)
        runs = [layers[k] for k in self.active]
        return type(runs[0]).packed_forward(runs, x, *args, **kwargs)


class Pack:
    """``runs`` injected into trees sharing ``base_model``'s frozen tensors, trained together (module docstring)."""

    def __init__(self, base_model: nn.Module, runs: Sequence[RunConfig]):
        if len({pack_key(r) for r in runs}) != 1:
            raise ValueError(
                "runs in one pack must differ only in " + ", ".join(f"{s}.{f}" for s, f in fields_with_role(PER_RUN))
            )
        shared = {} if any(r.rewrites_base for r in runs) else {id(t): t for t in base_model.parameters()}
        self.models = [loralab.inject(copy.deepcopy(base_model, dict(shared)), r.lora, seed=r.train.seed) for r in runs]
        self.layers: dict[str, PackedLayer] = {}
        if len(runs) == 1:
            self.model = self.models[0]
            return
        self.model = copy.deepcopy(base_model, dict(shared))
        per_run = [loralab.lora_layers(m) for m in self.models]
        for name in per_run[0]:
            packed = PackedLayer([layers[name] for layers in per_run])
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, packed)
            self.layers[name] = packed

    def set_active(self, active: Sequence[int]) -> None:
        """Which runs the pack model computes (their rows, in this order); a pack of one always computes its run."""
        for layer in self.layers.values():
            layer.active = list(active)

    def run_layers(self, k: int) -> dict[str, LoraLayer]:
        return loralab.lora_layers(self.models[k])

    def run_params(self, k: int) -> list[nn.Parameter]:
        return [p for layer in self.run_layers(k).values() for p in (layer.lora_A, layer.lora_B)]

    @torch.no_grad()
    def identity(self, ids: Tensor, active: Sequence[int], reference: nn.Module) -> list[float]:
        """Max |adapted logits − ``reference`` logits| of each run in ``active`` on ``ids`` (eval mode).

        ``reference`` is the untouched base model, so a scheme that rewrote its copy of the base (pissa, olora) is
        measured against the true pretrained model.
        """
        with eval_mode(self.model, reference):
            ref = reference(input_ids=ids).logits.float()
            self.set_active(active)
            out = self.model(input_ids=ids.repeat(len(active), 1)).logits.float()
        return [(o - ref).abs().max().item() for o in out.chunk(len(active))]
