"""Adapters on disk in the HF PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A ``loralab.json`` sidecar records what PEFT's config cannot (the exact init scheme and its options, the seed); PEFT
ignores it, and may save over the adapter leaving it stale, so it records a digest of the files it describes and
is ignored (with a warning) when they changed. Loading is all-or-nothing: files, keys and shapes are checked against the model before the first
tensor is written, so a bad adapter raises and leaves the model as it was.

Base-modifying schemes (pissa, olora): saved as-is they carry ``init_lora_weights: "pissa"``, so PEFT (and loralab)
recompute the residual base on load. ``portable=True`` writes the rank-2r form ``A = [A; A0]``, ``B = [B | -B0]``,
α → 2α (√2·α with rsLoRA), a plain adapter that loads on the unmodified base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .config import LoraConfig
from .inject import commit, lora_layers, plan
from .layers import Conv, Embedding, Linear, LoraLayer

CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE = "adapter_config.json", "adapter_model.safetensors", "loralab.json"
PREFIX = "base_model.model."
# PEFT init names that leave the base alone: the file's tensors overwrite whatever they drew.
_PEFT_PLAIN_INITS = {True: "standard", False: "standard", "gaussian": "gaussian", "orthogonal": "orthogonal-qr-const"}
_PEFT_BASE_INITS = {"pissa", "olora"}
# PEFT features whose meaning loralab does not implement: loading them silently would give other logits.
_UNSUPPORTED = ("use_dora", "modules_to_save", "layers_to_transform", "layers_pattern", "lora_bias", "bias",
                "exclude_modules", "trainable_token_indices", "target_parameters", "layer_replication", "use_qalora",
                "use_bdlora", "alora_invocation_tokens")


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded into (or saved from) this model."""


def _keys(name: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, Embedding):
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _peft_shapes(layer: LoraLayer, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes PEFT stores: convs keep A as an r-channel kernel and B as a 1×1 conv."""
    if isinstance(layer, Conv):
        w = layer.base_layer.weight
        return (rank, *w.shape[1:]), (w.shape[0], rank, *([1] * (w.dim() - 2)))
    return (rank, layer.d_in), (layer.d_out, rank)


def _check_peft_representable(name: str, layer: LoraLayer) -> None:
    if isinstance(layer, Conv):
        base = layer.base_layer
        odd = {k: v for k, v in (("groups", base.groups), ("padding_mode", base.padding_mode),
                                 ("dilation", base.dilation)) if v not in (1, "zeros") and set(v) != {1}}
        if odd:
            raise AdapterError(f"conv {name!r} has {odd}, which PEFT's LoRA conv cannot represent (it runs A without "
                               f"groups, dilation or padding_mode), so a PEFT-format file would mean a different "
                               f"model; adapt this model with loralab only, or leave {name!r} out of targets")


def _portable_tensors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.lora_A0 is None:
        return layer.lora_A.detach(), layer.lora_B.detach()
    return torch.cat([layer.lora_A, layer.lora_A0]).detach(), torch.cat([layer.lora_B, -layer.lora_B0], 1).detach()


def _adapter_config(model: nn.Module, cfg: LoraConfig, layers: dict[str, LoraLayer], portable: bool,
                    base_name: str | None) -> dict[str, Any]:
    inits = {cfg.for_module(n)[2] for n in layers}
    moved = {n for n, layer in layers.items() if layer.lora_A0 is not None}
    rank, alpha = cfg.rank, cfg.alpha
    rank_pattern, alpha_pattern = dict(cfg.rank_pattern), dict(cfg.alpha_pattern)
    init: Any = True
    if moved and portable:
        f = math.sqrt(2) if cfg.rslora else 2.0
        if moved == set(layers):
            rank, alpha = 2 * rank, f * alpha
            rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
            alpha_pattern = {k: f * v for k, v in alpha_pattern.items()}
        else:  # full-name entries first: PEFT takes the first pattern that matches
            rank_pattern = {**{re.escape(n): 2 * layers[n].rank for n in sorted(moved)}, **rank_pattern}
            alpha_pattern = {**{re.escape(n): f * layers[n].alpha for n in sorted(moved)}, **alpha_pattern}
    elif moved:
        # PEFT recomputes the residual base on load, but only with one init for all layers and only for Linear.
        odd = sorted(n for n in moved if not isinstance(layers[n], Linear))
        if len(inits) > 1 or odd:
            why = f"modules {odd[:3]} are not Linear" if odd else f"it mixes inits {sorted(inits)}"
            raise AdapterError(f"this {next(iter(inits))} adapter cannot be saved in PEFT's base-modifying form "
                               f"({why}, which PEFT cannot recompute on load); save it with portable=True")
        init = next(iter(inits))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if hasattr(model, "generate") else None,
        "base_model_name_or_path": base_name or getattr(getattr(model, "config", None), "name_or_path", None),
        "r": rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "init_lora_weights": init,
        "fan_in_fan_out": any(type(m).__name__ == "GPT2Conv1D" for m in layers.values()),
        "bias": "none", "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, *, portable: bool = False,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter to directory ``path`` in PEFT's format (loads with ``PeftModel.from_pretrained``).

    Args:
        model: a model with LoRA layers (after :func:`loralab.inject`).
        path: the directory; created if missing; files are replaced atomically.
        portable: for pissa/olora, write the rank-2r adapter that loads on the unmodified base (PEFT's own
            conversion); ignored for schemes that leave the base alone.
        base_model_name_or_path: recorded in the config; defaults to ``model.config.name_or_path`` if present.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    cfg = getattr(model, "lora_config", None)
    if not layers or cfg is None:
        raise AdapterError("save_adapter: the model has no loralab adapter; call inject(model, config) first")
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("save_adapter: the adapter is merged into the base; call unmerge(model) before saving")
    tensors = {}
    for name, layer in layers.items():
        _check_peft_representable(name, layer)
        a, b = _portable_tensors(layer) if portable else (layer.lora_A.detach(), layer.lora_B.detach())
        shape_a, shape_b = _peft_shapes(layer, a.shape[0])
        key_a, key_b = _keys(name, layer)
        tensors[key_a] = a.reshape(shape_a).contiguous().cpu()
        tensors[key_b] = b.reshape(shape_b).contiguous().cpu()
    config = _adapter_config(model, cfg, layers, portable, base_model_name_or_path)
    exported = portable and any(layer.lora_A0 is not None for layer in layers.values())
    sidecar = {"format": 1, "loralab_version": __version__, "seed": getattr(model, "lora_seed", None),
               "init": "standard" if exported else cfg.init, "init_kwargs": {} if exported else dict(cfg.init_kwargs),
               "init_pattern": {} if exported else dict(cfg.init_pattern), "portable_export_of": cfg.init if exported else None}
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise AdapterError(f"cannot save the adapter to {str(out)!r}: it is a file, and an adapter is a directory "
                           f"(adapter_config.json + adapter_model.safetensors); give a directory path")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    sidecar["adapter_sha256"] = _adapter_digest(out)   # ties the sidecar to these files (see _sidecar)
    atomic_write(out / SIDECAR_FILE, lambda p: p.write_text(json.dumps(sidecar, indent=2)))
    return out


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


def _sidecar(root: Path) -> dict | None:
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
        return sidecar   # a missing file fails the load below, naming it
    if recorded != _adapter_digest(root):
        warnings.warn(f"{path} does not describe this adapter: {CONFIG_FILE} or {WEIGHTS_FILE} changed since loralab "
                      "saved it (e.g. PEFT saved over it), so it is ignored and the adapter loads as its "
                      f"{CONFIG_FILE} says; delete {path} to silence this warning", stacklevel=3)
        return None
    return sidecar


def config_from_peft(data: dict, sidecar: dict | None = None) -> LoraConfig:
    """The :class:`LoraConfig` that a PEFT ``adapter_config.json`` (plus loralab's sidecar, if any) describes."""
    if data.get("peft_type") != "LORA":
        raise AdapterError(f"adapter peft_type is {data.get('peft_type')!r}; loralab loads LoRA adapters only")
    for key in _UNSUPPORTED:
        value = data.get(key)
        if value not in (None, False, [], {}, "none"):
            raise AdapterError(f"adapter uses PEFT's {key}={value!r}, which loralab does not implement; loading it "
                               f"would give different outputs. Load it with PEFT instead")
    peft_init = data.get("init_lora_weights", True)
    if sidecar and sidecar.get("init"):
        init, kwargs, pattern = sidecar["init"], sidecar.get("init_kwargs", {}), sidecar.get("init_pattern", {})
    elif peft_init in _PEFT_BASE_INITS:
        init, kwargs, pattern = peft_init, {}, {}
    elif isinstance(peft_init, (bool, str)) and peft_init in _PEFT_PLAIN_INITS:
        init, kwargs, pattern = _PEFT_PLAIN_INITS[peft_init], {}, {}
    else:
        raise AdapterError(f"adapter was made with PEFT init {peft_init!r}, which rewrites the base weights on load "
                           f"in a way loralab does not reproduce; convert it with PEFT to a plain adapter first")
    try:
        return LoraConfig(rank=data["r"], alpha=data["lora_alpha"], init=init, targets=data["target_modules"],
                          dropout=data.get("lora_dropout", 0.0) or 0.0, rslora=bool(data.get("use_rslora")),
                          init_kwargs=kwargs, rank_pattern=data.get("rank_pattern") or {},
                          alpha_pattern=data.get("alpha_pattern") or {}, init_pattern=pattern)
    except KeyError as e:
        raise AdapterError(f"adapter_config.json lacks required key {e}") from None
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter_config.json describes an invalid LoRA config: {e}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise AdapterError(f"{path.parent} is not an adapter directory: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"{path} cannot be read ({e}); the file is corrupt or truncated, save it again") from None


def _match_tensors(layers: dict[str, LoraLayer], tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """``{name: (A, B)}`` in loralab's shapes; every key used, every shape right, or an AdapterError."""
    out, used = {}, set()
    for name, layer in layers.items():
        key_a, key_b = _keys(name, layer)
        if key_a not in tensors or key_b not in tensors:
            raise AdapterError(f"adapter has no weights for module {name!r} (expected {key_a!r}); it was saved from "
                               f"a different model or config")
        a, b = tensors[key_a], tensors[key_b]
        want_a, want_b = _peft_shapes(layer, layer.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(f"adapter shapes for {name!r} are A{tuple(a.shape)}, B{tuple(b.shape)} but this "
                               f"model needs A{want_a}, B{want_b}: it was saved from a different model")
        out[name] = (a.reshape(layer.lora_A.shape), b.reshape(layer.lora_B.shape))
        used |= {key_a, key_b}
    base_keys = {f"{PREFIX}{n}.base_layer.weight" for n in layers}  # PEFT saves targeted embeddings' base weights
    extra = sorted(set(tensors) - used - base_keys)
    if extra:
        raise AdapterError(f"adapter has {len(extra)} tensors this model has no LoRA layer for, e.g. {extra[:3]}; "
                           f"it was saved from a different model or config")
    return out


def _present_targets(cfg: LoraConfig, model: nn.Module) -> LoraConfig:
    """PEFT loads an adapter whose ``target_modules`` list has entries that match nothing in this model (a broad list
    such as ``["q_proj", "c_attn"]``); keep the entries that match, as loralab's own configs must."""
    if isinstance(cfg.targets, str):
        return cfg
    names = [n for n, _ in model.named_modules() if n]
    kept = tuple(t for t in cfg.targets if any(n == t or n.endswith("." + t) for n in names))
    return dataclasses.replace(cfg, targets=kept) if kept else cfg


def load_adapter(model: nn.Module, path: str | os.PathLike, *, seed: int = 0) -> nn.Module:
    """Load an adapter directory (saved by loralab or PEFT) into ``model``; all-or-nothing.

    On a plain model the layers named by the adapter's config are injected first (a pissa/olora adapter saved
    without ``portable`` recomputes the residual base, as PEFT does); on a model that already has LoRA layers the
    weights are loaded into them.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"adapter directory {root} does not exist (or is not a directory)")
    data = _read_json(root / CONFIG_FILE)
    sidecar = _sidecar(root)
    cfg = _present_targets(config_from_peft(data, sidecar), model)
    tensors = _read_weights(root / WEIGHTS_FILE)
    existing = lora_layers(model)
    planned = None if existing else plan(model, cfg, seed)
    layers = existing or {p.name: p.layer for p in planned}
    matched = _match_tensors(layers, tensors)
    base_updates = {n: tensors[f"{PREFIX}{n}.base_layer.weight"] for n in layers
                    if f"{PREFIX}{n}.base_layer.weight" in tensors}
    for n, w in base_updates.items():
        if w.shape != layers[n].base_layer.weight.shape:
            raise AdapterError(f"adapter's base weight for {n!r} has shape {tuple(w.shape)}, the model's is "
                               f"{tuple(layers[n].base_layer.weight.shape)}")
    if planned is not None:
        commit(model, planned, cfg, seed)
    with torch.no_grad():
        for name, (a, b) in matched.items():
            layers[name].lora_A.copy_(a)
            layers[name].lora_B.copy_(b)
        for n, w in base_updates.items():
            layers[n].base_layer.weight.copy_(w)
    return model
