"""The Hugging Face stack: transformers' ``save_pretrained`` and ``Trainer`` checkpoints, and PEFT models.

* ``save_pretrained``: on a transformers model with loralab adapters it writes the adapter (:func:`save_adapter`,
  PEFT's format where it can hold it), not the full model. The full model's keys (``q_proj.base_layer.weight``)
  are ones ``from_pretrained`` does not know, so it would silently re-initialise every adapted layer, and GPT-2's
  tied ``lm_head`` would make it refuse to save at all. An adapter directory loads with
  ``loralab.load_adapter``, ``PeftModel.from_pretrained`` and, when ``base_model_name_or_path`` names the base,
  ``AutoModel*.from_pretrained(dir)``. ``inject`` puts the method on the model through
  :func:`loralab.inject.register_model_hook`, so imports keep pointing one way (inject ← io ← hf).
* :class:`AdapterTrainerMixin` / ``LoraTrainer``: Trainer checkpoints hold the adapter only and
  ``train(resume_from_checkpoint=...)`` continues exactly (the plain Trainer can save them, but resumes only from
  full-model or PEFT-model checkpoints).
* :func:`init_peft`: any loralab init scheme on an existing PEFT LoRA model.

transformers and peft are imported inside the functions that use them: the library itself needs neither.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .inits import get_scheme
from .inject import IdentityWarning, lora_layers, module_seed, register_model_hook
from .io import CONFIG_FILE, OWN_CONFIG_FILE, AdapterError, conv_peft_differs, load_adapter, save_adapter
from .layers import layer_type_for, weight_of


class _SavePretrained:
    """``model.save_pretrained`` while the model has loralab adapters: writes the adapter (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(
        self,
        save_directory: str | os.PathLike,
        *,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        # kwargs such as safe_serialization or max_shard_size do not apply: an adapter is one safetensors file.
        if push_to_hub:
            raise AdapterError(
                "save_pretrained(push_to_hub=True) is not supported for a loralab adapter; save it "
                "with model.save_pretrained(dir), then upload dir (huggingface_hub.upload_folder)"
            )
        if state_dict is not None:  # the Trainer passes one under FSDP/DeepSpeed, where parameters are sharded
            raise AdapterError(
                "save_pretrained(state_dict=...) is not supported for a loralab adapter (it is "
                "saved from the model's own tensors, which FSDP/DeepSpeed shard); train without them, "
                "or merge with loralab.unload(model) and save the plain model"
            )
        if is_main_process:
            save_adapter(self.model, save_directory)


def _attach(model: nn.Module) -> None:
    if callable(getattr(type(model), "save_pretrained", None)):  # a transformers model (or alike)
        model.__dict__["save_pretrained"] = _SavePretrained(model)  # an instance attribute: the model alone


def _detach(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        del model.__dict__["save_pretrained"]  # the class's own save_pretrained again


register_model_hook(_attach, _detach)


def _is_adapter_dir(path: str | os.PathLike | None) -> bool:
    return path is not None and any((Path(path) / f).is_file() for f in (CONFIG_FILE, OWN_CONFIG_FILE))


class AdapterTrainerMixin:
    """Adapter-only checkpoints for ``transformers.Trainer`` and its subclasses (TRL's ``SFTTrainer``, ...).

    Put it first: ``class MyTrainer(AdapterTrainerMixin, SFTTrainer): pass`` (``loralab.hf.LoraTrainer`` is this
    over ``transformers.Trainer``). For a model with loralab adapters, every checkpoint holds the adapter (what
    :func:`save_adapter` writes) next to the Trainer's optimizer, scheduler and RNG states, and
    ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` load it back into the model's adapters:
    resuming gives the factors an uninterrupted run would. Build the resumed model as the first (same base, config
    and seed) before the Trainer. Other models are left to the Trainer.
    """

    # What the Trainer it is mixed into provides (transformers types none of it for a mixin).
    accelerator: Any
    model: Any
    args: Any
    processing_class: Any
    state: Any

    def _lora_model(self, model: nn.Module | None = None) -> nn.Module | None:
        inner = self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)
        return inner if lora_layers(inner) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._lora_model()
        if model is None or callable(getattr(type(model), "save_pretrained", None)):
            return super()._save(output_dir, state_dict)  # type: ignore[misc]  # a transformers model's save_pretrained writes the adapter
        # A plain nn.Module: the Trainer would write its whole state dict.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            save_adapter(model, output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self._lora_model(model)
        if target is None or not _is_adapter_dir(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        load_adapter(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        target = self._lora_model()
        if target is None or not _is_adapter_dir(self.state.best_model_checkpoint):
            return super()._load_best_model()  # type: ignore[misc]
        load_adapter(target, self.state.best_model_checkpoint)
        return None


def __getattr__(name: str):
    if name == "LoraTrainer":  # built on first use, so importing loralab does not import transformers
        from transformers import Trainer

        cls = type(
            "LoraTrainer",
            (AdapterTrainerMixin, Trainer),
            {"__module__": __name__, "__doc__": "``transformers.Trainer`` with :class:`AdapterTrainerMixin`."},
        )
        globals()["LoraTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def init_peft(
    peft_model: nn.Module, init: str, *, seed: int = 0, adapter_name: str | None = None, **init_kwargs
) -> nn.Module:
    """Initialise the LoRA factors of a PEFT model with a loralab scheme, in place, as :func:`loralab.inject` would.

    Each PEFT LoRA layer of the adapter gets the scheme's factors for its base weight (seen as a matrix), rank and
    scaling, from a generator seeded by ``(seed, module name)``, and an embedding its scheme's ``one_hot`` variant,
    exactly as in ``inject``: ``init_peft(get_peft_model(base, cfg), "orthogonal-qr-match", seed=0)`` writes the
    factors ``inject(base, LoraConfig(init="orthogonal-qr-match", ...), seed=0)`` would. PEFT then trains and saves
    the model as usual; its saved adapters load on the plain base, since the base is untouched.

    Args:
        peft_model: a ``PeftModel`` (``get_peft_model``) or a model with PEFT LoRA layers.
        init: a loralab scheme (:func:`loralab.init_schemes`).
        seed: seeds the factors.
        adapter_name: the adapter to initialise; default the active one.
        **init_kwargs: the scheme's options (``LoraConfig.init_kwargs``).

    Raises:
        ValueError: a scheme that rewrites the base weight (pissa, olora: PEFT's saved config would not say so; use
            PEFT's own ``init_lora_weights="pissa"``), an odd rank for a scheme that pairs directions, DoRA, or a
            conv whose PEFT LoRA is not a change of its weight (groups, dilation, padding_mode).
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    scheme = get_scheme(init)
    if scheme.modifies_base:
        raise ValueError(
            f"init_peft: {init!r} rewrites the base weight, which a PEFT adapter file would not record "
            f"(it would load on the wrong base); use PEFT's own init_lora_weights={init!r}"
        )
    adapter = str(adapter_name or getattr(peft_model, "active_adapter", "default"))
    get_base = getattr(peft_model, "get_base_model", None)
    root = get_base() if callable(get_base) else peft_model
    writes = []
    for name, module in root.named_modules():
        if not isinstance(module, PeftLoraLayer) or adapter not in module.r:
            continue
        writes.append(_peft_factors(name, module, adapter, init, seed, init_kwargs))
    if not writes:
        raise ValueError(f"init_peft: the model has no PEFT LoRA layers of adapter {adapter!r}")
    with torch.no_grad():  # all layers were checked first: a refusal leaves the model as it was
        for a, b, factors in writes:
            a.copy_(factors.a.reshape(a.shape))
            b.copy_(factors.b.reshape(b.shape))
    if not scheme.preserves_output:
        warnings.warn(f"init {init!r} does not preserve the model's output", IdentityWarning, stacklevel=2)
    return peft_model


def _peft_factors(name: str, module: Any, adapter: str, init: str, seed: int, init_kwargs: dict):
    """``(A parameter, B parameter, factors)`` for one PEFT LoRA layer, checked."""
    base = module.get_base_layer()
    cls = layer_type_for(base)
    if cls is None:
        raise TypeError(f"init_peft: {name!r} adapts a {type(base).__name__}, which loralab's schemes do not cover")
    if module.use_dora.get(adapter):
        raise ValueError(
            f"init_peft: {name!r} uses DoRA, whose magnitude PEFT set from the factors it drew; "
            f"init_peft supports plain LoRA (use_dora=False)"
        )
    if odd := conv_peft_differs(base):
        raise ValueError(
            f"init_peft: {name!r} is a conv with {odd}: PEFT's LoRA there is not a change of its "
            f"weight, so a scheme's factors would not mean what they do in loralab"
        )
    resolved = (get_scheme(init).one_hot or init) if cls.one_hot_input else init
    scheme, rank = get_scheme(resolved), module.r[adapter]
    if scheme.even_rank and rank % 2:
        raise ValueError(f"init_peft: {resolved!r} needs an even rank; {name!r} has r={rank}")
    w = cls.to_matrix(weight_of(base).detach())
    w = w.to(device="cpu", dtype=torch.float32) if scheme.reads_weight else torch.empty(w.shape, device="meta")
    g = torch.Generator().manual_seed(module_seed(seed, name))
    factors = scheme(w, rank, scale=module.scaling[adapter], g=g, **(init_kwargs if resolved == init else {}))
    if cls.one_hot_input:
        return module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], factors
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight, factors
