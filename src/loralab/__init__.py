"""loralab: LoRA for PyTorch models, with the adapter's initialization as a first-class, testable thing."""

from . import _startup  # noqa: I001 (first: it holds Ctrl-C during the imports below, torch's C++ start-up)
from .config import LoraConfig
from .hf import init_peft
from .inits import Factors, InitScheme, get_scheme, init_schemes, register
from .inject import (
    IdentityWarning,
    TrainableSummary,
    adapters_disabled,
    check_identity,
    inject,
    lora_layers,
    lora_param_groups,
    merge,
    select_targets,
    trainable_parameters,
    trainable_summary,
    unload,
    unmerge,
)
from .io import AdapterError, AdapterFormatWarning, load_adapter, save_adapter
from .layers import LoraLayer, LoraStateError
from .version import __version__

# The command raises a held Ctrl-C in cli.main, after its own imports, where it is one line and exit 130.
_startup.pause() if _startup.started_as_command() else _startup.resume()

__all__ = [
    "AdapterError",
    "AdapterFormatWarning",
    "Factors",
    "IdentityWarning",
    "InitScheme",
    "LoraConfig",
    "LoraLayer",
    "LoraStateError",
    "TrainableSummary",
    "__version__",
    "adapters_disabled",
    "check_identity",
    "get_scheme",
    "init_peft",
    "init_schemes",
    "inject",
    "load_adapter",
    "lora_layers",
    "lora_param_groups",
    "merge",
    "register",
    "save_adapter",
    "select_targets",
    "trainable_parameters",
    "trainable_summary",
    "unload",
    "unmerge",
]
