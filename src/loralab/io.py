"""Adapters on disk: HF PEFT's format, or loralab's own form for what PEFT's cannot hold.

PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors`` (loads with ``PeftModel.from_pretrained``), plus a
``loralab.json`` sidecar with what PEFT's config cannot say (the exact init scheme and its options, the seed); PEFT
ignores it. ``modules_to_save`` are stored whole, under PEFT's keys (``base_model.model.<module>.<tensor>``).

loralab's own form: ``loralab_adapter.json`` (the whole :class:`LoraConfig`) + ``loralab_adapter.safetensors`` (the
same keys, factors in loralab's ``(r, d_in)``/``(d_out, r)`` shapes). :func:`save_adapter` writes it, with an
:class:`AdapterFormatWarning`, when a PEFT file would mean another model: a conv with groups, dilation or a padding
mode (PEFT's conv LoRA runs A as a dense conv without them), or a pissa/olora adapter whose residual base PEFT
cannot recompute on load. There is no ``adapter_config.json`` in it, so PEFT refuses the directory instead of
loading something else.

The ``loralab.json`` sidecar records a digest of the config and weights files it describes: PEFT (or any tool) may
save over the adapter and leave it stale, and then it is ignored with a warning.

Base-modifying schemes (pissa, olora): saved as-is they carry ``init_lora_weights: "pissa"``, so PEFT (and loralab)
recompute the residual base on load. ``portable=True`` writes the rank-2r form ``A = [A; A0]``, ``B = [B | -B0]``,
α → 2α (√2·α with rsLoRA), a plain adapter that loads on the unmodified base.

Loading is all-or-nothing: files, keys and shapes are checked against the model before the first tensor is written,
so a bad adapter raises and leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig, name_matches, within
from .inject import commit, lora_layers, plan, saved_modules
from .layers import Conv, Embedding, GPT2Conv1D, Linear, LoraLayer
from .version import __version__

CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE = "adapter_config.json", "adapter_model.safetensors", "loralab.json"
OWN_CONFIG_FILE, OWN_WEIGHTS_FILE = "loralab_adapter.json", "loralab_adapter.safetensors"
PREFIX = "base_model.model."
# PEFT init names that leave the base alone: the file's tensors overwrite whatever they drew.
_PEFT_PLAIN_INITS = {True: "standard", False: "standard", "gaussian": "gaussian", "orthogonal": "orthogonal-qr-const"}
_PEFT_BASE_INITS = {"pissa", "olora"}
# The layer types on which PEFT recomputes each base-moving init correctly on load (its OLoRA ignores GPT-2 Conv1D's
# transposed weight; both fail on convs). On an embedding PEFT leaves the base alone.
_PEFT_RECOMPUTES = {"pissa": (Linear, GPT2Conv1D), "olora": (Linear,)}
# PEFT features whose meaning loralab does not implement: loading them silently would give other logits.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "bias",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
)
# PEFT task types by transformers' auto-model mapping; other models (vision, speech) get none, as PEFT's own
# task classes would pass them input_ids.
_TASK_TYPES = (
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
)


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded into (or saved from) this model."""


class AdapterFormatWarning(UserWarning):
    """:func:`save_adapter` wrote loralab's own form, which PEFT cannot load (the message says why)."""


def _keys(name: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, Embedding):
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _shapes(layer: LoraLayer, rank: int, peft: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes on disk: PEFT keeps a conv's A as an r-channel kernel and B as a 1×1 conv; loralab's form, matrices."""
    if peft and isinstance(layer, Conv):
        w = layer.base_weight
        return (rank, *w.shape[1:]), (w.shape[0], rank, *([1] * (w.dim() - 2)))
    return (rank, layer.d_in), (layer.d_out, rank)


def conv_peft_differs(base: nn.Module) -> dict[str, Any]:
    """What makes PEFT's LoRA on conv ``base`` another function than loralab's (empty: the same, or not a conv)."""
    if not isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return {}
    odd: dict[str, Any] = {"groups": base.groups} if base.groups != 1 else {}
    if any(d != 1 for d in base.dilation):
        odd["dilation"] = base.dilation
    if base.padding_mode != "zeros":
        odd["padding_mode"] = base.padding_mode
    return odd


def _portable_tensors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.lora_A0 is None:
        return layer.lora_A.detach(), layer.lora_B.detach()
    return torch.cat([layer.lora_A, layer.lora_A0]).detach(), torch.cat([layer.lora_B, -layer.lora_B0], 1).detach()


def _peft_init(layers: dict[str, LoraLayer], portable: bool) -> tuple[Any, str | None]:
    """``init_lora_weights`` for the PEFT file, and why PEFT could not rebuild the model from it (None: it can)."""
    moved = {layer.init or "" for layer in layers.values() if layer.lora_A0 is not None}
    if not moved or portable:
        return True, None
    fix = "; save_adapter(model, path, portable=True) writes a PEFT-readable adapter"
    if len(moved) > 1:
        return None, f"it mixes the base-moving inits {sorted(moved)}, and PEFT's config holds one{fix}"
    init = moved.pop()
    for name, layer in layers.items():
        if isinstance(layer, Embedding):
            ok = layer.lora_A0 is None  # PEFT leaves an embedding's base alone under any init
        else:
            ok = type(layer) in _PEFT_RECOMPUTES.get(init, ()) and layer.init == init
        if not ok:
            return None, (
                f"with init_lora_weights={init!r} PEFT would not rebuild the base of {name!r} "
                f"({type(layer).__name__}, init {layer.init!r}) as loralab did{fix}"
            )
    return init, None


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``: the transformers auto class its class belongs to, else None."""
    if "transformers" not in sys.modules:  # not a transformers model: never import it for one
        return None
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, mapping in _TASK_TYPES:
        for classes in getattr(modeling_auto, mapping, {}).values():
            if name == classes or (isinstance(classes, (tuple, list)) and name in classes):
                return task
    return None


def _modules_to_save(model: nn.Module, cfg: LoraConfig, layers: dict[str, LoraLayer]) -> dict[str, nn.Module]:
    """The modules saved whole: ``cfg.modules_to_save``, plus the modules of any other trainable parameter (with a
    warning), so that no trainable parameter is dropped; raises for one that no module can carry."""
    saved = saved_modules(model, cfg)
    covered = {id(p) for m in saved.values() for p in m.parameters()}
    covered |= {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    extra: dict[str, nn.Module] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) in covered:
            continue
        owner = pname.rpartition(".")[0]  # "" for a parameter of the model itself, which holds the LoRA layers
        if not owner or any(within(owner, n) or within(n, owner) for n in layers):
            raise AdapterError(
                f"parameter {pname!r} is trainable, but its module holds or is part of a LoRA layer, "
                f"so neither PEFT's format nor loralab's can save it (PEFT's lora_bias/bias options "
                f"are not supported); freeze it with model.get_parameter({pname!r})"
                f".requires_grad_(False), or unfreeze a module without LoRA layers"
            )
        if not any(within(owner, n) for n in extra):  # keep outermost modules: a module's state holds its children's
            extra = {n: m for n, m in extra.items() if not within(n, owner)}
            extra[owner] = model.get_submodule(owner)
    if extra:
        warnings.warn(
            f"save_adapter: {sorted(extra)} have trainable parameters but are not in "
            f"LoraConfig.modules_to_save; they are saved whole, as modules_to_save (name them there to make "
            f"this explicit, or freeze them to leave them out)",
            UserWarning,
            stacklevel=3,
        )
    return {**saved, **extra}


def _adapter_config(
    model: nn.Module,
    cfg: LoraConfig,
    layers: dict[str, LoraLayer],
    init: Any,
    portable: bool,
    saved: list[str],
    base_name: str | None,
) -> dict[str, Any]:
    moved = {n for n, layer in layers.items() if layer.lora_A0 is not None}
    rank, alpha = cfg.rank, cfg.alpha
    rank_pattern, alpha_pattern = dict(cfg.rank_pattern), dict(cfg.alpha_pattern)
    if moved and portable:
        f = math.sqrt(2) if cfg.rslora else 2.0
        if moved == set(layers):
            rank, alpha = 2 * rank, f * alpha
            rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
            alpha_pattern = {k: f * v for k, v in alpha_pattern.items()}
        else:  # full-name entries first: PEFT takes the first pattern that matches
            rank_pattern = {**{re.escape(n): 2 * layers[n].rank for n in sorted(moved)}, **rank_pattern}
            alpha_pattern = {**{re.escape(n): f * layers[n].alpha for n in sorted(moved)}, **alpha_pattern}
    plain = _config_json(cfg)
    if cfg.targets == ALL_LINEAR:  # written as the names it selected (as PEFT does): the file says what is adapted
        plain["targets"] = sorted(layers)
    return {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": base_name or getattr(getattr(model, "config", None), "name_or_path", None),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": plain["targets"],
        "exclude_modules": plain["exclude"] or None,
        "layers_to_transform": plain["layers_to_transform"],
        "layers_pattern": plain["layers_pattern"],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": init,
        "fan_in_fan_out": any(isinstance(m, GPT2Conv1D) for m in layers.values()),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": saved or None,
        "inference_mode": True,
    }


def _config_json(cfg: LoraConfig) -> dict[str, Any]:
    """``cfg`` as JSON values (mappings as dicts, tuples as lists); ``LoraConfig(**_config_json(cfg)) == cfg``."""

    def plain(v: Any) -> Any:
        return dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_adapter(
    model: nn.Module, path: str | os.PathLike, *, portable: bool = False, base_model_name_or_path: str | None = None
) -> Path:
    """Write the model's adapter to directory ``path``, in PEFT's format where it can hold it.

    Args:
        model: a model with LoRA layers (after :func:`loralab.inject`).
        path: the directory; created if missing; files are replaced atomically.
        portable: for pissa/olora, write the rank-2r adapter that loads on the unmodified base (PEFT's own
            conversion); ignored for schemes that leave the base alone, and by loralab's own form (whose loader
            rebuilds the residual base).
        base_model_name_or_path: recorded in the config; defaults to ``model.config.name_or_path`` if present.

    Returns:
        The directory. ``PeftModel.from_pretrained(base, path)`` and :func:`load_adapter` load it, unless an
        :class:`AdapterFormatWarning` said it is in loralab's own form (then only :func:`load_adapter` can).

    Warns:
        AdapterFormatWarning: PEFT's format cannot hold this adapter (the message says why and any fix).
        UserWarning: trainable parameters outside the LoRA layers and ``modules_to_save`` are saved, with their
            modules, as ``modules_to_save``.
    """
    layers = lora_layers(model)
    cfg = getattr(model, "lora_config", None)
    if not layers or cfg is None:
        raise AdapterError("save_adapter: the model has no loralab adapter; call inject(model, config) first")
    if any(layer.merged for layer in layers.values()):
        raise AdapterError(
            "save_adapter: the adapter is merged into the base; call unmerge(model) to save the "
            "adapter, or unload(model) to get the plain merged model and save that"
        )
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise AdapterError(
            f"cannot save the adapter to {str(out)!r}: it is a file, and an adapter is a directory "
            f"(adapter_config.json + adapter_model.safetensors); give a directory path"
        )
    saved = _modules_to_save(model, cfg, layers)
    init, problem = _peft_init(layers, portable)
    problems = [problem] if problem else []
    convs = {n: odd for n, layer in layers.items() if (odd := conv_peft_differs(layer.base_layer))}
    if convs:
        problems.insert(
            0,
            f"conv {next(iter(convs))!r} has {next(iter(convs.values()))}, which PEFT's LoRA conv "
            f"cannot represent (it runs A as a dense conv without groups, dilation or padding_mode)",
        )
    peft = not problems
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        a, b = _portable_tensors(layer) if portable and peft else (layer.lora_A.detach(), layer.lora_B.detach())
        shape_a, shape_b = _shapes(layer, a.shape[0], peft)
        key_a, key_b = _keys(name, layer)
        tensors[key_a], tensors[key_b] = a.reshape(shape_a).contiguous().cpu(), b.reshape(shape_b).contiguous().cpu()
    for name, module in saved.items():
        tensors.update({f"{PREFIX}{name}.{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()})
    by_hand = sorted(n for n in saved if not name_matches(n, cfg.modules_to_save))
    seed = getattr(model, "lora_seed", None)
    if peft:
        files = {
            WEIGHTS_FILE: tensors,
            CONFIG_FILE: _adapter_config(
                model, cfg, layers, init, portable, list(cfg.modules_to_save) + by_hand, base_model_name_or_path
            ),
            SIDECAR_FILE: _sidecar(cfg, layers, portable, seed),
        }
    else:
        warnings.warn(
            f"save_adapter wrote {out} in loralab's own form, which PEFT cannot load: {'; '.join(problems)}. "
            f"loralab.load_adapter loads it",
            AdapterFormatWarning,
            stacklevel=2,
        )
        own = _config_json(dataclasses.replace(cfg, modules_to_save=cfg.modules_to_save + tuple(by_hand)))
        files = {
            OWN_WEIGHTS_FILE: tensors,
            OWN_CONFIG_FILE: {
                "format": 1,
                "loralab_version": __version__,
                "seed": seed,
                "config": own,
                "not_peft_because": problems,
            },
        }
    _write(out, files)
    return out


def _sidecar(cfg: LoraConfig, layers: dict[str, LoraLayer], portable: bool, seed: int | None) -> dict[str, Any]:
    exported = portable and any(layer.lora_A0 is not None for layer in layers.values())
    return {
        "format": 1,
        "loralab_version": __version__,
        "seed": seed,
        "init": "standard" if exported else cfg.init,
        "init_kwargs": {} if exported else dict(cfg.init_kwargs),
        "init_pattern": {} if exported else dict(cfg.init_pattern),
        "portable_export_of": cfg.init if exported else None,
    }


def _write(out: Path, files: dict[str, Any]) -> None:
    """Write ``files`` (tensors or JSON) atomically each, and remove the other form's files: one adapter per dir."""
    from safetensors.torch import save_file

    def writer(name: str, content: Any) -> Callable[[Path], Any]:
        if name.endswith(".safetensors"):
            return lambda p: save_file(content, str(p), metadata={"format": "pt"})
        return lambda p: p.write_text(json.dumps(content, indent=2))

    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():  # the sidecar last: it records a digest of the files it describes
        if name == SIDECAR_FILE:
            content = {**content, "adapter_sha256": _adapter_digest(out)}
        atomic_write(out / name, writer(name, content))
    for stale in {CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE, OWN_CONFIG_FILE, OWN_WEIGHTS_FILE} - set(files):
        (out / stale).unlink(missing_ok=True)


def atomic_write(dest: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Write ``dest`` so readers see the old file or the new one, never part of one.

    ``write(tmp)`` fills a temp file beside ``dest`` (same file system, so the rename is atomic), which is fsynced
    and ``os.replace``-d onto ``dest``; on any error the temp file is removed and ``dest`` is untouched. The file
    gets the mode an ordinary new file would (the process umask), not ``mkstemp``'s 0600.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path.parent} is not an adapter directory: {path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated, save it again") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    return data


def _adapter_digest(root: Path) -> str:
    """sha256 over the adapter's config and weights files, as they are on disk."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(root / name, "rb") as f:
            h.update(f"{name}:{os.fstat(f.fileno()).st_size}:".encode())
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_sidecar(root: Path) -> dict | None:
    """``loralab.json`` if it describes the adapter files beside it, else ``None``.

    PEFT (or any other tool) saving into the directory leaves a loralab sidecar in place; followed, it would apply
    another adapter's init (pissa rewrites the base weights). A sidecar whose recorded digest does not match the files
    is ignored with a warning; one without a digest (written before loralab recorded it) is followed as before.
    """
    path = root / SIDECAR_FILE
    if not path.exists():
        return None
    sidecar = _read_json(path)
    recorded = sidecar.get("adapter_sha256")
    if recorded is None or not all((root / n).is_file() for n in (CONFIG_FILE, WEIGHTS_FILE)):
        return sidecar  # a missing file fails the load below, naming it
    if recorded != _adapter_digest(root):
        warnings.warn(
            f"{path} does not describe this adapter: {CONFIG_FILE} or {WEIGHTS_FILE} changed since loralab "
            "saved it (e.g. PEFT saved over it), so it is ignored and the adapter loads as its "
            f"{CONFIG_FILE} says; delete {path} to silence this warning",
            stacklevel=3,
        )
        return None
    return sidecar


def config_from_peft(data: dict, sidecar: dict | None = None) -> LoraConfig:
    """The :class:`LoraConfig` that a PEFT ``adapter_config.json`` (plus loralab's sidecar, if any) describes."""
    if data.get("peft_type") != "LORA":
        raise AdapterError(f"adapter peft_type is {data.get('peft_type')!r}; loralab loads LoRA adapters only")
    for key in _UNSUPPORTED:
        value = data.get(key)
        if value not in (None, False, [], {}, "none"):
            raise AdapterError(
                f"adapter uses PEFT's {key}={value!r}, which loralab does not implement; loading it "
                f"would give different outputs. Load it with PEFT instead"
            )
    peft_init = data.get("init_lora_weights", True)
    if sidecar and sidecar.get("init"):
        init, kwargs, pattern = sidecar["init"], sidecar.get("init_kwargs", {}), sidecar.get("init_pattern", {})
    elif peft_init in _PEFT_BASE_INITS:
        init, kwargs, pattern = peft_init, {}, {}
    elif isinstance(peft_init, (bool, str)) and peft_init in _PEFT_PLAIN_INITS:
        init, kwargs, pattern = _PEFT_PLAIN_INITS[peft_init], {}, {}
    else:
        raise AdapterError(
            f"adapter was made with PEFT init {peft_init!r}, which rewrites the base weights on load "
            f"in a way loralab does not reproduce; convert it with PEFT to a plain adapter first"
        )
    try:
        return LoraConfig(
            rank=data["r"],
            alpha=data["lora_alpha"],
            init=init,
            targets=data["target_modules"],
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            rslora=bool(data.get("use_rslora")),
            init_kwargs=kwargs,
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            init_pattern=pattern,
            exclude=data.get("exclude_modules") or (),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern") or None,
            modules_to_save=data.get("modules_to_save") or (),
        )
    except KeyError as e:
        raise AdapterError(f"adapter_config.json lacks required key {e}") from None
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter_config.json describes an invalid LoRA config: {e}") from None


def _own_config(data: dict) -> LoraConfig:
    try:
        return LoraConfig(**data["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{OWN_CONFIG_FILE} does not describe a valid LoRA config ({e}); save it again") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise AdapterError(f"{path.parent} is not an adapter directory: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"{path} cannot be read ({e}); the file is corrupt or truncated, save it again") from None


def _match_tensors(layers: dict[str, LoraLayer], tensors: dict[str, torch.Tensor], peft: bool) -> dict[str, tuple]:
    """``{name: (A, B)}`` in loralab's shapes; every layer found, every shape right, or an AdapterError."""
    out = {}
    for name, layer in layers.items():
        key_a, key_b = _keys(name, layer)
        if key_a not in tensors or key_b not in tensors:
            raise AdapterError(
                f"adapter has no weights for module {name!r} (expected {key_a!r}); it was saved from "
                f"a different model or config"
            )
        if peft and (odd := conv_peft_differs(layer.base_layer)):
            raise AdapterError(
                f"adapter has PEFT weights for conv {name!r}, which has {odd}: PEFT's LoRA there runs "
                f"A as a dense conv without them, which is not a change of this conv's weight, so "
                f"loralab cannot represent it; load this adapter with PEFT (PeftModel.from_pretrained)"
            )
        a, b = tensors[key_a], tensors[key_b]
        want_a, want_b = _shapes(layer, layer.rank, peft)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(
                f"adapter shapes for {name!r} are A{tuple(a.shape)}, B{tuple(b.shape)} but this "
                f"model needs A{want_a}, B{want_b}: it was saved from a different model"
            )
        out[name] = (a.reshape(layer.lora_A.shape), b.reshape(layer.lora_B.shape))
    return out


def _saved_in_file(
    model: nn.Module,
    entries: tuple[str, ...],
    tensors: dict[str, torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: its state dict}`` for every module of ``model`` saved whole in ``tensors``.

    Candidates are matched by PEFT's rule for ``modules_to_save`` (a plain suffix: ``"classifier"`` also matches
    ``pre_classifier``), so whatever PEFT saved is found; outermost modules first.
    """
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if not name or not any(name.endswith(e) for e in entries) or any(name.startswith(f + ".") for f in found):
            continue
        keys = {k: f"{PREFIX}{name}.{k}" for k in module.state_dict()}
        present = [k for k, key in keys.items() if key in tensors]
        if present and len(present) < len(keys):
            raise AdapterError(
                f"adapter has only part of module {name!r} saved (missing "
                f"{sorted(set(keys) - set(present))[:3]}); it was saved from a different model"
            )
        if present:
            found[name] = {k: tensors[key] for k, key in keys.items()}
    return found


def _present(cfg: LoraConfig, model: nn.Module, in_file: dict[str, Any]) -> LoraConfig:
    """PEFT loads an adapter whose ``target_modules`` or ``modules_to_save`` list entries that match nothing in this
    model (a broad list such as ``["q_proj", "c_attn"]``, or SEQ_CLS's ``["classifier", "score"]``); keep the entries
    that match, as loralab's own configs must, and add the modules the file saved whole."""
    names = [n for n, _ in model.named_modules() if n]
    changes: dict[str, Any] = {}
    if not isinstance(cfg.targets, str):
        kept = tuple(t for t in cfg.targets if any(name_matches(n, [t]) for n in names))
        changes["targets"] = kept or cfg.targets
    entries = tuple(m for m in cfg.modules_to_save if any(name_matches(n, [m]) for n in names))
    changes["modules_to_save"] = entries + tuple(n for n in in_file if not name_matches(n, entries))
    return dataclasses.replace(cfg, **changes)


def load_adapter(model: nn.Module, path: str | os.PathLike, *, seed: int | None = None) -> nn.Module:
    """Load an adapter directory (saved by loralab, in either form, or by PEFT) into ``model``; all-or-nothing.

    On a plain model the layers named by the adapter's config are injected first (a pissa/olora adapter saved
    without ``portable`` recomputes the residual base, as PEFT does); on a model that already has LoRA layers the
    weights are loaded into them (how a training run resumes). Modules saved whole (``modules_to_save``) are loaded
    and made trainable. ``seed`` seeds that injection: by default the seed the file records (0 when it records
    none), so a base-moving scheme with random factors (random-both-subtracted) rebuilds the residual it trained on.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"adapter directory {root} does not exist (or is not a directory)")
    peft = (root / CONFIG_FILE).exists() or not (root / OWN_CONFIG_FILE).exists()
    if peft:
        sidecar = _read_sidecar(root)
        cfg = config_from_peft(_read_json(root / CONFIG_FILE), sidecar)
        tensors, saved_seed = _read_weights(root / WEIGHTS_FILE), (sidecar or {}).get("seed")
    else:
        own = _read_json(root / OWN_CONFIG_FILE)
        cfg, tensors, saved_seed = _own_config(own), _read_weights(root / OWN_WEIGHTS_FILE), own.get("seed")
    if seed is None:
        seed = saved_seed if isinstance(saved_seed, int) and not isinstance(saved_seed, bool) else 0
    in_file = _saved_in_file(model, cfg.modules_to_save, tensors)
    cfg = _present(cfg, model, in_file)
    existing = lora_layers(model)
    planned = None if existing else plan(model, cfg, seed, loading=True)
    layers = existing or {p.name: p.layer for p in planned or ()}
    matched = _match_tensors(layers, tensors, peft)
    base_updates = {
        n: tensors[f"{PREFIX}{n}.base_layer.weight"] for n in layers if f"{PREFIX}{n}.base_layer.weight" in tensors
    }  # PEFT saves resized embeddings' base weights
    for n, w in base_updates.items():
        if w.shape != layers[n].base_weight.shape:
            raise AdapterError(
                f"adapter's base weight for {n!r} has shape {tuple(w.shape)}, the model's is "
                f"{tuple(layers[n].base_weight.shape)}"
            )
    used = {k for n, layer in layers.items() for k in _keys(n, layer)}
    used |= {f"{PREFIX}{n}.base_layer.weight" for n in base_updates}
    used |= {f"{PREFIX}{m}.{k}" for m, state in in_file.items() for k in state}
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterError(
            f"adapter has {len(extra)} tensors this model has no LoRA layer or module to save for, "
            f"e.g. {extra[:3]}; it was saved from a different model or config"
        )
    _check_saved_shapes(model, in_file)
    if planned is not None:
        commit(model, planned, cfg, seed)
    with torch.no_grad():
        for name, (a, b) in matched.items():
            layers[name].lora_A.copy_(a)
            layers[name].lora_B.copy_(b)
        for n, w in base_updates.items():
            layers[n].base_weight.copy_(w)
    for name, state in in_file.items():
        model.get_submodule(name).load_state_dict(state)
    return model


def _check_saved_shapes(model: nn.Module, in_file: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, state in in_file.items():
        own = model.get_submodule(name).state_dict()
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise AdapterError(
                f"adapter's {name}.{bad[0]} has shape {tuple(state[bad[0]].shape)}, the model's is "
                f"{tuple(own[bad[0]].shape)}: it was saved from a different model (e.g. another "
                f"number of classes)"
            )
