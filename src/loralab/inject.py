"""Put LoRA layers into any model, take them out, and the model-level operations on them.

``inject`` is all-or-nothing: it computes every layer's factors and checks every target before it swaps the first
module, so bad input raises and leaves the model exactly as it was. Each module's generator is seeded from
``(seed, module name)``, so a module's factors do not depend on which other modules are targeted, and the global
RNG is never touched.

Which modules are adapted follows PEFT's rules (:func:`select_targets`), so a PEFT config's ``target_modules``,
``exclude_modules``, ``layers_to_transform`` and ``modules_to_save`` mean the same here. ``modules_to_save`` are
trained in place: PEFT keeps a frozen copy to switch back to, loralab does not (a second copy of a head or an
embedding for an ``adapters_disabled`` that only the step-0 identity check uses), so :func:`unload` and
:func:`adapters_disabled` keep their trained values.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig, layer_index, name_matches, within
from .inits import Factors, get_scheme, stable_seed
from .layers import SUPPORTED_TYPES, GPT2Conv1D, LoraLayer, LoraStateError, layer_type_for, weight_of


class IdentityWarning(UserWarning):
    """The init scheme changes the model's output at step 0."""


@dataclass
class _Planned:
    name: str
    layer: LoraLayer
    factors: Factors


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed for module ``name``; stable across runs, machines and Python versions."""
    return stable_seed(int(seed), name)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block and give each back the mode it had (also on error)."""
    modes = [(m, m.training) for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, training in modes:
            m.train(training)


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision bases keep float32 adapters: updates of size lr·A would round away in bf16.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def select_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs that ``config`` adapts in ``model``, by PEFT's rules.

    ``targets`` picks modules by name (:func:`~loralab.config.name_matches`) or, for ``"all-linear"``, by type:
    every ``nn.Linear`` and GPT-2 ``Conv1D`` outside the output head (the module ``get_output_embeddings()``
    returns, else a ``classifier``/``score`` head of the model). Then ``exclude``, anything in or under
    ``modules_to_save``, and the layers that ``layers_to_transform`` leaves out are dropped.

    Raises:
        ValueError: a ``targets`` entry matches no module (a typo would otherwise adapt fewer modules than asked),
            or nothing is left to adapt.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if config.targets == ALL_LINEAR:
        heads = _output_heads(model)
        found = [(n, m) for n, m in named if _linear_like(m) and not any(within(n, h) for h in heads)]
    else:
        found = [(n, m) for n, m in named if name_matches(n, config.targets)]
        _check_every_target_matched(config, named, found)
    kept = [
        (n, m)
        for n, m in found
        if not name_matches(n, config.exclude)
        and not any(name_matches(a, config.modules_to_save) for a in _ancestry(n))
    ]
    if config.exclude and len(kept) == len(found):
        warnings.warn(
            f"exclude={config.exclude!r} excluded no module (check its spelling): every module that "
            f"targets matched is adapted",
            UserWarning,
            stacklevel=5,
        )  # the caller of inject
    if config.layers_to_transform is not None:
        layers = config.layers_to_transform
        wanted = {layers} if isinstance(layers, int) else set(layers)
        kept = [(n, m) for n, m in kept if layer_index(n, config.layers_pattern) in wanted]
    if not kept:
        raise ValueError(
            f"targets={config.targets!r} matched {len(found)} modules, but exclude, modules_to_save and "
            f"layers_to_transform={config.layers_to_transform!r} (layers_pattern="
            f"{config.layers_pattern!r}) left none to adapt; e.g. "
            f"{found[0][0] if found else 'no module'!r} is in layer "
            f"{layer_index(found[0][0], config.layers_pattern) if found else None}"
        )
    return kept


def _linear_like(module: nn.Module) -> bool:
    # nn.Linear subclasses count (as in PEFT), so an nn.MultiheadAttention out_proj is selected and then refused
    # by validate with the fix, rather than skipped silently.
    return isinstance(module, nn.Linear) or layer_type_for(module) is GPT2Conv1D


def _output_heads(model: nn.Module) -> list[str]:
    """Names of the module that ``"all-linear"`` leaves out: the LM head or a classifier head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:  # PEFT's names for a sequence classifier's head
        head = next((m for n in ("classifier", "score") if isinstance(m := getattr(model, n, None), nn.Module)), None)
    return [n for n, m in model.named_modules() if m is head and n] if head is not None else []


def _ancestry(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: the module and every module it sits in."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _check_every_target_matched(config: LoraConfig, named: list, found: list) -> None:
    if isinstance(config.targets, str):
        if not found:
            example = named[-1][0] if named else "layers.0.q_proj"
            hint = (
                f"; for suffix matching give a list, e.g. targets=[{config.targets!r}]"
                if any(name_matches(n, [config.targets]) for n, _ in named)
                else f"; or targets='{ALL_LINEAR}' for every linear layer"
            )
            raise ValueError(
                f"no module matched targets={config.targets!r}: a string is one regex matched against "
                f"the whole module name (e.g. {example!r}){hint}"
            )
        return
    suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in named if not list(m.children())})
    unmatched = [t for t in config.targets if not any(name_matches(n, [t]) for n, _ in found)]
    if unmatched:  # a typo in one entry would otherwise adapt fewer modules than asked, silently
        hints = [
            f"{t!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(t, suffixes, 1)) else repr(t)
            for t in unmatched
        ]
        shorthand = (
            f"; for every linear layer write targets='{ALL_LINEAR}' (a string, not a list entry)"
            if ALL_LINEAR in (t.lower() for t in unmatched)
            else ""
        )
        raise ValueError(
            f"targets entries matched no module: {', '.join(hints)}; leaf module names in this model "
            f"end in: {', '.join(suffixes[:12])}{', ...' if len(suffixes) > 12 else ''}{shorthand}"
        )


def saved_modules(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """The modules ``config.modules_to_save`` names (outermost matches only; never LoRA layers' internals)."""
    inside_lora = tuple(n + "." for n in lora_layers(model))
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if (
            name
            and name_matches(name, config.modules_to_save)
            and not name.startswith(inside_lora)
            and not any(within(name, outer) for outer in found)
        ):
            found[name] = module
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
    return (
        f"{what} {name!r}, whose weight is shared with {', '.join(map(repr, others))} (tied weights), would "
        f"change those modules too; untie them first (e.g. `m.weight = nn.Parameter(m.weight.clone())` on one "
        f"of them)"
    )


@dataclass
class _Target:
    name: str
    module: nn.Module
    cls: type[LoraLayer]
    rank: int
    alpha: float
    init: str


def validate(model: nn.Module, config: LoraConfig, *, loading: bool = False) -> list[_Target]:
    """Check every target (match, type, dtype, rank) and every module to save, without touching weights; works on a
    ``meta``-device model.

    A rank above a layer's ``min(d_in, d_out)`` is refused for a new adapter (B·A cannot have a higher rank, so the
    extra directions would be parameters that train nothing; the error names the ``rank_pattern`` that fixes it) but
    accepted when ``loading`` one that PEFT made so (PEFT allows it, e.g. r = 8 on a 3-class head). An init that
    takes r directions from the weight (pissa, olora) cannot do either.
    """
    if lora_layers(model):
        raise LoraStateError("model already has LoRA layers; call unload(model) before injecting again")
    targets, shared = [], _weight_sharers(model)
    for name, module in select_targets(model, config):
        cls = layer_type_for(module)
        if cls is None:
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}, which loralab cannot adapt "
                f"(supported: {SUPPORTED_TYPES}); leave it out, e.g. with "
                f"exclude=[{name.rsplit('.', 1)[-1]!r}]"
            )
        weight = weight_of(module)
        if not weight.is_floating_point():
            raise TypeError(f"target {name!r} has a {weight.dtype} weight; load the model in a float dtype")
        rank, alpha, init = config.for_module(name, one_hot=cls.one_hot_input)
        d_out, d_in = cls.to_matrix(weight).shape
        if rank > min(d_in, d_out) and (get_scheme(init).reads_weight or not loading):
            why = (
                f"init {init!r} cannot take {rank} directions from it"
                if get_scheme(init).reads_weight
                else "B·A cannot have a higher rank, so the extra directions would train nothing"
            )
            raise ValueError(
                f"rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name!r} (d_out={d_out}, "
                f"d_in={d_in}): {why}; lower rank or set "
                f"rank_pattern={{{name.rsplit('.', 1)[-1]!r}: {min(d_in, d_out)}}}"
            )
        if get_scheme(init).modifies_base and not cls.writable_base:
            raise ValueError(
                f"init {init!r} rewrites the base weight, which {name!r} holds in 4 bits ({type(module).__name__}): "
                f"the rewrite would be rounded to the 4-bit grid; use an init that leaves the base alone (e.g. "
                f"'standard'; init_pattern sets it per module), or load the base in float (no quantization)"
            )
        if get_scheme(init).modifies_base and id(module.weight) in shared:
            raise ValueError(
                _tied_error(name, shared[id(module.weight)], f"init {init!r} rewrites the weight of")
                + f", or give {name!r} an init that leaves the base alone (init_pattern)"
            )
        targets.append(_Target(name, module, cls, rank, alpha, init))
    _check_saved_modules(model, config, shared)
    return targets


def _check_saved_modules(model: nn.Module, config: LoraConfig, shared: dict[int, list[str]]) -> None:
    saved = saved_modules(model, config)
    missing = [m for m in config.modules_to_save if not any(name_matches(n, [m]) for n in saved)]
    if missing:  # the head would stay frozen at its random init, silently
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        hints = [
            f"{m!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(m, names, 1)) else repr(m)
            for m in missing
        ]
        raise ValueError(f"modules_to_save entries matched no module: {', '.join(hints)}")
    for name, module in saved.items():
        for p in module.parameters():
            others = [h for h in shared.get(id(p), []) if not within(h, name)]
            if others:
                raise ValueError(_tied_error(name, others, "training") + ", or leave it out of modules_to_save")


def plan(model: nn.Module, config: LoraConfig, seed: int = 0, *, loading: bool = False) -> list[_Planned]:
    """Build (but do not insert) a LoRA layer with initial factors for every target; the model is not changed.

    ``loading``: the layers will receive a saved adapter's factors (see :func:`validate`).
    """
    planned = []
    for t in validate(model, config, loading=loading):
        weight = weight_of(t.module).detach()  # dequantized once for a 4-bit base
        layer = t.cls(
            t.module,
            t.rank,
            t.alpha,
            rslora=config.rslora,
            dropout=config.dropout,
            dtype=_adapter_dtype(weight),
        )
        g = torch.Generator().manual_seed(module_seed(seed, t.name))
        scheme = get_scheme(t.init)
        w = layer.to_matrix(weight)
        if scheme.reads_weight and w.is_meta:
            raise ValueError(
                f"init {t.init!r} reads the weight of {t.name!r}, which is on the meta device (no "
                f"values); load the model's weights first, or use a scheme that needs only shapes"
            )
        w = w.to(device="cpu", dtype=torch.float32) if scheme.reads_weight else torch.empty(w.shape, device="meta")
        kwargs = config.init_kwargs if t.init == config.init else {}
        factors = scheme(w, t.rank, scale=layer.scale, g=g, **kwargs)
        layer.init = t.init
        planned.append(_Planned(t.name, layer, factors))
    return planned


def commit(model: nn.Module, planned: list[_Planned], config: LoraConfig, seed: int) -> nn.Module:
    """Insert planned layers, write their factors, and freeze everything but the adapters and ``modules_to_save``."""
    saved = saved_modules(model, config)
    model.__dict__.update(lora_config=config, lora_seed=seed)  # plain attributes, read by save_adapter and hf
    for p in model.parameters():
        p.requires_grad_(False)
    for item in planned:
        item.layer.set_factors(item.factors)
        parent_name, _, child = item.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, item.layer)
        item.layer.lora_A.requires_grad_(True)
        item.layer.lora_B.requires_grad_(True)
    for module in saved.values():
        module.requires_grad_(True)
    for attach, _ in _MODEL_HOOKS:
        attach(model)
    return model


_MODEL_HOOKS: list[tuple[Callable[[nn.Module], None], Callable[[nn.Module], None]]] = []


def register_model_hook(attach: Callable[[nn.Module], None], detach: Callable[[nn.Module], None]) -> None:
    """Call ``attach(model)`` whenever adapters are committed to a model (:func:`inject`, ``load_adapter``) and
    ``detach(model)`` when :func:`unload` takes them out.

    How a module above this one (``hf.py``: an injected transformers model's ``save_pretrained`` writes the adapter)
    adds to the model without this module importing it: imports point one way.
    """
    _MODEL_HOOKS.append((attach, detach))


def inject(model: nn.Module, config: LoraConfig, seed: int = 0) -> nn.Module:
    """Replace the modules selected by ``config`` with LoRA layers, in place, and freeze the rest.

    Args:
        model: any ``nn.Module``.
        config: what to adapt and how (:func:`select_targets` says which modules).
        seed: seeds every adapter's init; same config and seed give bit-identical factors on any device.

    Returns:
        ``model`` itself, now with only the LoRA factors (and ``config.modules_to_save``) trainable.

    Warns:
        IdentityWarning: an init changes the model's output at step 0.
    """
    planned = plan(model, config, seed)
    commit(model, planned, config, seed)
    warn_identity(planned, config, stacklevel=3)
    return model


def warn_identity(planned: list[_Planned], config: LoraConfig, stacklevel: int = 2) -> None:
    """Warn (:class:`IdentityWarning`) when an init used by ``planned`` changes the model's output at step 0."""
    used = {p.layer.init for p in planned if p.layer.init is not None}
    broken = sorted(n for n in used if not get_scheme(n).preserves_output)
    if broken:
        warnings.warn(
            f"init {', '.join(broken)} does not preserve the model's output: the adapted model differs "
            f"from the pretrained one before training (check_identity shows by how much)",
            IdentityWarning,
            stacklevel=stacklevel + 1,
        )


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
    _check_mergeable(model, layers)
    for layer in layers.values():
        layer.merge()
    return model


def _check_mergeable(model: nn.Module, layers: dict[str, LoraLayer]) -> None:
    """Raise before any layer merges if one cannot (a 4-bit base, a tied weight): merging is all-or-nothing."""
    shared = _weight_sharers(model)
    for name, layer in layers.items():
        layer.check_mergeable(repr(name))
        if not layer.merged and id(layer.base_layer.weight) in shared:
            raise LoraStateError(
                _tied_error(name, shared[id(layer.base_layer.weight)], "merging") + ", or keep this adapter unmerged"
            )


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
    did. Without it the base modules come back as they are: for pissa/olora that is the residual weight. Modules to
    save keep their trained values either way.
    """
    layers = _require_layers(model, "unload")
    if merge_weights:
        _check_mergeable(model, layers)
    for name, layer in layers.items():
        if merge_weights and not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    for attr in ("lora_config", "lora_seed"):
        model.__dict__.pop(attr, None)
    for _, detach in _MODEL_HOOKS:
        detach(model)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after :func:`inject`, the LoRA factors)."""
    return [p for p in model.parameters() if p.requires_grad]


def lora_param_groups(
    model: nn.Module, lr: float, *, weight_decay: float = 0.0, loraplus_ratio: float = 1.0
) -> list[dict]:
    """Optimizer parameter groups: A at ``lr``, B at ``lr · loraplus_ratio`` (LoRA+, Hayou et al. 2024; 1 = plain),
    and, if there are any, the other trainable parameters (``modules_to_save``, or unfrozen by hand) at ``lr``."""
    layers = _require_layers(model, "lora_param_groups").values()
    factors = {id(p) for m in layers for p in (m.lora_A, m.lora_B)}
    others = [p for p in trainable_parameters(model) if id(p) not in factors]
    groups = [
        {"params": [m.lora_A for m in layers], "lr": lr, "weight_decay": weight_decay},
        {"params": [m.lora_B for m in layers], "lr": lr * loraplus_ratio, "weight_decay": weight_decay},
    ]
    return groups + ([{"params": others, "lr": lr, "weight_decay": weight_decay}] if others else [])


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
    with eval_mode(model):
        out = _main_tensor(model(*args, **kwargs)).float()
        with adapters_disabled(model):
            ref = _main_tensor(model(*args, **kwargs)).float()
    return (out - ref).abs().max().item()


@dataclass(frozen=True)
class TrainableSummary:
    """What :func:`trainable_summary` counts; ``str()`` gives PEFT's ``print_trainable_parameters`` line and a
    per-type breakdown."""

    trainable: int
    total: int
    by_type: dict[str, tuple[int, int]]  # "LoRA Linear" / "modules_to_save" / "other trainable" -> (modules, params)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [
            (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}")
        ]
        lines += [
            f"  {kind}: {n} module{'s' * (n != 1)}, {count:,d} params" for kind, (n, count) in self.by_type.items()
        ]
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable and total parameter counts (each shared tensor once, as PEFT counts), by LoRA layer type.

    ``print(loralab.trainable_summary(model))`` is PEFT's ``model.print_trainable_parameters()``; ``trainable``
    equals PEFT's ``get_nb_trainable_parameters()[0]`` for the same config.
    """
    params = {id(p): p for p in model.parameters()}
    by_type: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()

    def add(kind: str, owned: list[nn.Parameter]) -> None:
        n, count = by_type.get(kind, (0, 0))
        by_type[kind] = (n + 1, count + sum(p.numel() for p in owned))
        seen.update(id(p) for p in owned)

    for layer in lora_layers(model).values():
        add(f"LoRA {type(layer).__name__}", [layer.lora_A, layer.lora_B])
    config = getattr(model, "lora_config", None)
    for module in (saved_modules(model, config) if config is not None else {}).values():
        add("modules_to_save", [p for p in module.parameters() if p.requires_grad and id(p) not in seen])
    other = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen}  # unfrozen by hand
    if other:
        owners = {n.rpartition(".")[0] for n in other}
        by_type["other trainable"] = (len(owners), sum(p.numel() for p in other.values()))
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return TrainableSummary(trainable, sum(p.numel() for p in params.values()), by_type)
