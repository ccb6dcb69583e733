"""Put LoRA layers into any model, take them out, and the model-level operations on them.

``inject`` is all-or-nothing: it computes every layer's factors and checks every target before it swaps the first
module, so bad input raises and leaves the model exactly as it was. Each module's generator is seeded from
``(seed, module name)``, so a module's factors do not depend on which other modules are targeted, and the global
RNG is never touched.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .config import LoraConfig
from .inits import Factors, get_scheme
from .layers import SUPPORTED_TYPES, LoraLayer, LoraStateError, layer_type_for


class IdentityWarning(UserWarning):
    """The init scheme changes the model's output at step 0."""


@dataclass
class _Planned:
    name: str
    layer: LoraLayer
    factors: Factors


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed for module ``name``; stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision bases keep float32 adapters: updates of size lr·A would round away in bf16.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def _targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if n]
    found = [(n, m) for n, m in named if config.matches(n)]
    if isinstance(config.targets, str):
        if not found:
            raise ValueError(f"no module matched targets={config.targets!r}: a string is one regex matched against "
                             f"the whole module name (e.g. {named[-1][0] if named else 'layers.0.q_proj'!r}); for "
                             f"suffix matching give a list, e.g. targets=[{config.targets!r}]")
        return found
    suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in named if not list(m.children())})
    unmatched = [t for t in config.targets if not any(n == t or n.endswith("." + t) for n, _ in found)]
    if unmatched:   # a typo in one entry would otherwise adapt fewer modules than asked, silently
        hints = [f"{t!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(t, suffixes, 1)) else
                 repr(t) for t in unmatched]
        raise ValueError(f"targets entries matched no module: {', '.join(hints)}; leaf module names in this model "
                         f"end in: {', '.join(suffixes[:12])}{', ...' if len(suffixes) > 12 else ''}")
    return found


def _weight_sharers(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` → names of the distinct modules holding it, for parameters held by more than one (tied)."""
    holders: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), {}).setdefault(id(module), name)
    return {k: list(v.values()) for k, v in holders.items() if len(v) > 1}


def _tied_error(name: str, holders: list[str], what: str) -> str:
    others = [h for h in holders if h != name and not h.startswith(name + ".")]
    return (f"{what} {name!r}, whose weight is shared with {', '.join(map(repr, others))} (tied weights), would "
            f"change those modules too; untie them first (e.g. `m.weight = nn.Parameter(m.weight.clone())` on one "
            f"of them)")


@dataclass
class _Target:
    name: str
    module: nn.Module
    cls: type[LoraLayer]
    rank: int
    alpha: float
    init: str


def validate(model: nn.Module, config: LoraConfig) -> list[_Target]:
    """Check every target (match, type, dtype, rank) without touching weights; works on a ``meta``-device model."""
    if lora_layers(model):
        raise LoraStateError("model already has LoRA layers; call unload(model) before injecting again")
    targets, shared = [], _weight_sharers(model)
    for name, module in _targets(model, config):
        cls = layer_type_for(module)
        if cls is None:
            raise TypeError(f"target {name!r} is a {type(module).__name__}, which loralab cannot adapt "
                            f"(supported: {SUPPORTED_TYPES}); narrow targets so it does not match this module")
        if not module.weight.is_floating_point():
            raise TypeError(f"target {name!r} has a {module.weight.dtype} weight; load the model in a float dtype")
        rank, alpha, init = config.for_module(name, one_hot=cls.one_hot_input)
        d_out, d_in = cls.to_matrix(module.weight).shape
        if rank > min(d_in, d_out):
            raise ValueError(f"rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name!r} "
                             f"(d_out={d_out}, d_in={d_in}): B·A cannot have a higher rank, so the extra "
                             f"directions are wasted (and pissa/olora cannot be computed); lower rank or set "
                             f"rank_pattern={{{name.rsplit('.', 1)[-1]!r}: {min(d_in, d_out)}}}")
        if get_scheme(init).modifies_base and id(module.weight) in shared:
            raise ValueError(_tied_error(name, shared[id(module.weight)], f"init {init!r} rewrites the weight of") +
                             f", or give {name!r} an init that leaves the base alone (init_pattern)")
        targets.append(_Target(name, module, cls, rank, alpha, init))
    return targets


def plan(model: nn.Module, config: LoraConfig, seed: int = 0) -> list[_Planned]:
    """Build (but do not insert) a LoRA layer with initial factors for every target; the model is not changed."""
    planned = []
    for t in validate(model, config):
        layer = t.cls(t.module, t.rank, t.alpha, rslora=config.rslora, dropout=config.dropout,
                      dtype=_adapter_dtype(t.module.weight))
        g = torch.Generator().manual_seed(module_seed(seed, t.name))
        scheme = get_scheme(t.init)
        w = layer.to_matrix(t.module.weight.detach())
        if scheme.reads_weight and w.is_meta:
            raise ValueError(f"init {t.init!r} reads the weight of {t.name!r}, which is on the meta device (no "
                             f"values); load the model's weights first, or use a scheme that needs only shapes")
        w = w.to(device="cpu", dtype=torch.float32) if scheme.reads_weight else torch.empty(w.shape, device="meta")
        kwargs = config.init_kwargs if t.init == config.init else {}
        factors = scheme(w, t.rank, scale=layer.scale, g=g, **kwargs)
        layer.init = t.init
        planned.append(_Planned(t.name, layer, factors))
    return planned


def commit(model: nn.Module, planned: list[_Planned], config: LoraConfig, seed: int) -> nn.Module:
    """Insert planned layers, write their factors, and freeze everything but the adapters."""
    model.lora_config, model.lora_seed = config, seed
    for p in model.parameters():
        p.requires_grad_(False)
    for item in planned:
        item.layer.set_factors(item.factors)
        parent_name, _, child = item.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, item.layer)
        item.layer.lora_A.requires_grad_(True)
        item.layer.lora_B.requires_grad_(True)
    return model


def inject(model: nn.Module, config: LoraConfig, seed: int = 0) -> nn.Module:
    """Replace the modules named by ``config.targets`` with LoRA layers, in place, and freeze the rest.

    Args:
        model: any ``nn.Module``.
        config: what to adapt and how.
        seed: seeds every adapter's init; same config and seed give bit-identical factors on any device.

    Returns:
        ``model`` itself, now with only the LoRA factors trainable.
    """
    planned = plan(model, config, seed)
    commit(model, planned, config, seed)
    warn_identity(planned, config, stacklevel=3)
    return model


def warn_identity(planned: list[_Planned], config: LoraConfig, stacklevel: int = 2) -> None:
    """Warn (:class:`IdentityWarning`) when an init used by ``planned`` changes the model's output at step 0."""
    used = {p.layer.init for p in planned}
    broken = sorted(n for n in used if not get_scheme(n).preserves_output)
    if broken:
        warnings.warn(f"init {', '.join(broken)} does not preserve the model's output: the adapted model differs "
                      f"from the pretrained one before training (check_identity shows by how much)",
                      IdentityWarning, stacklevel=stacklevel + 1)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _require_layers(model: nn.Module, what: str) -> dict[str, LoraLayer]:
    layers = lora_layers(model)
    if not layers:
        raise LoraStateError(f"{what}: the model has no LoRA layers; call inject(model, config) first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; raises (changing nothing) if any is already merged."""
    layers = _require_layers(model, "merge")
    if any(layer.merged for layer in layers.values()):
        raise LoraStateError("model is already merged; call unmerge(model) before merging again")
    _check_untied(model, layers)
    for layer in layers.values():
        layer.merge()
    return model


def _check_untied(model: nn.Module, layers: dict[str, LoraLayer]) -> None:
    shared = _weight_sharers(model)
    for name, layer in layers.items():
        if not layer.merged and id(layer.base_layer.weight) in shared:
            raise LoraStateError(_tied_error(name, shared[id(layer.base_layer.weight)], "merging") +
                                 ", or keep this adapter unmerged")


def unmerge(model: nn.Module) -> nn.Module:
    """Take every adapter back out of its base weight; raises (changing nothing) unless all are merged."""
    layers = _require_layers(model, "unmerge")
    if not all(layer.merged for layer in layers.values()):
        raise LoraStateError("model is not merged; there is nothing to unmerge (call merge(model) first)")
    for layer in layers.values():
        layer.unmerge()
    return model


def unload(model: nn.Module, *, merge_weights: bool = True) -> nn.Module:
    """Replace every LoRA layer by its base module and return the plain model.

    With ``merge_weights`` (default) the adapters are merged first, so the result computes what the adapted model
    did. Without it the base modules come back as they are: for pissa/olora that is the residual weight.
    """
    layers = _require_layers(model, "unload")
    if merge_weights:
        _check_untied(model, layers)
    for name, layer in layers.items():
        if merge_weights and not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    for attr in ("lora_config", "lora_seed"):
        model.__dict__.pop(attr, None)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after :func:`inject`, the LoRA factors)."""
    return [p for p in model.parameters() if p.requires_grad]


def lora_param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                      loraplus_ratio: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: A at ``lr``, B at ``lr · loraplus_ratio`` (LoRA+, Hayou et al. 2024; 1 = plain)."""
    layers = _require_layers(model, "lora_param_groups").values()
    return [
        {"params": [m.lora_A for m in layers], "lr": lr, "weight_decay": weight_decay},
        {"params": [m.lora_B for m in layers], "lr": lr * loraplus_ratio, "weight_decay": weight_decay},
    ]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the pretrained function (for pissa/olora: residual + initial factors)."""
    layers = _require_layers(model, "adapters_disabled").values()
    if any(layer.merged for layer in layers):
        raise LoraStateError("cannot disable merged adapters; call unmerge(model) first")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def _main_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return _main_tensor(out[0])
    raise TypeError(f"check_identity: cannot find a tensor in the model's output of type {type(out).__name__}")


@torch.no_grad()
def check_identity(model: nn.Module, *args, **kwargs) -> float:
    """Max |adapted output − pretrained output| on the given inputs (logits for HF models), in eval mode.

    0 for an output-preserving init (up to float rounding for pissa/olora); call it before training.
    """
    was_training = model.training
    model.eval()
    try:
        out = _main_tensor(model(*args, **kwargs)).float()
        with adapters_disabled(model):
            ref = _main_tensor(model(*args, **kwargs)).float()
    finally:
        model.train(was_training)
    return (out - ref).abs().max().item()
