"""What every part of the lab needs from the machine, each written once: devices, compute dtypes, versions, cache and
output paths.

``model.dtype = "auto"`` is bfloat16 on CUDA, and on a CPU that computes bfloat16 natively (``avx512_bf16`` or AMX in
its flags: read, never guessed from the vendor); float32 elsewhere. On a CPU without those instructions torch's
bfloat16 matmul is a slow fallback: on a VM that exposes only AVX2 a 512×576 @ 576×1536 product ran ~45× slower in
bfloat16 than in float32 (torch 2.13; ``bench/bench_matmul.py``, ``docs/benchmarks.md``), so there auto stays
float32.

Atomic files come from the library (:func:`loralab.io.atomic_write`) and seeds from :func:`loralab.inits.stable_seed`,
so the library and the lab write files and derive seeds the same way.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

import loralab

__all__ = [
    "DeviceUnavailable",
    "auto_dtype",
    "cache_root",
    "check_out_dir",
    "cpu_has_native_bf16",
    "native_bf16_in",
    "pick_device",
    "pid_alive",
    "versions",
]


class DeviceUnavailable(ValueError):
    """A configured device that this machine does not have; the message says what to set instead."""


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return True


def pick_device(name: str = "auto", what: str = "device") -> torch.device:
    """``auto`` → cuda, then mps, then cpu; a named device must exist here (``what`` names the setting in errors).

    Raises:
        DeviceUnavailable: ``name`` is ``cuda`` or ``mps`` and this machine has none.
    """
    if name == "auto":
        return torch.device(next(k for k in ("cuda", "mps", "cpu") if _available(k)))
    kind = torch.device(name).type
    if not _available(kind):
        raise DeviceUnavailable(
            f"{what}={name!r} but this machine (torch {torch.__version__}) has no "
            f"{kind.upper()} device; set {what}=auto (or cpu), or run where {kind} is available"
        )
    return torch.device(name)


def native_bf16_in(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo``'s text lists ``avx512_bf16`` or ``amx_bf16`` among the first CPU's flags."""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (Linux: its flags; elsewhere no claim is made)."""
    try:
        return native_bf16_in(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False


def auto_dtype(device: torch.device | str) -> str:
    """What ``model.dtype = "auto"`` means on ``device``: ``"bfloat16"`` on CUDA and on a CPU with native bfloat16,
    else ``"float32"`` (see the module docstring)."""
    kind = torch.device(device).type
    return "bfloat16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "float32"


def versions() -> dict[str, str]:
    """What produced a result: loralab, torch, transformers (when installed) and Python versions."""
    out = {"loralab": loralab.__version__, "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    out["python"] = platform.python_version()
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (someone else's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cache_root(cfg_cache_dir: str = "") -> Path:
    """The lab's cache directory: ``cfg_cache_dir``, else ``$LORALAB_CACHE``, else ``~/.cache/loralab``."""
    root = cfg_cache_dir or os.environ.get("LORALAB_CACHE") or "~/.cache/loralab"
    return Path(root).expanduser()


def check_out_dir(path: str | os.PathLike, what: str = "out_dir") -> Path:
    """``path`` (``~`` expanded) if it is, or can be made, a writable directory; else ``ValueError`` naming it."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a directory; choose another {what}")
    parent = next(p for p in (path, *path.parents) if p.exists())  # the root always exists
    if not parent.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {parent} is a file; choose another {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: no write permission on {parent}; choose another {what}")
    return path
