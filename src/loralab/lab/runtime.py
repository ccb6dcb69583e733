"""What every part of the lab needs from the machine, each written once: devices, versions, cache and output paths.

Atomic files come from the library (:func:`loralab.io.atomic_write`) and seeds from :func:`loralab.inits.stable_seed`,
so the library and the lab write files and derive seeds the same way.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

import loralab

__all__ = ["DeviceUnavailable", "cache_root", "check_out_dir", "pick_device", "pid_alive", "versions"]


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
        raise DeviceUnavailable(f"{what}={name!r} but this machine (torch {torch.__version__}) has no "
                                f"{kind.upper()} device; set {what}=auto (or cpu), or run where {kind} is available")
    return torch.device(name)


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
    parent = next(p for p in (path, *path.parents) if p.exists())   # the root always exists
    if not parent.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {parent} is a file; choose another {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: no write permission on {parent}; choose another {what}")
    return path
