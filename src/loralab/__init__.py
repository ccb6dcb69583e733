"""loralab: LoRA for PyTorch models, with the adapter's initialization as a first-class, testable thing."""

__version__ = "0.1.0"

from .config import LoraConfig  # noqa: E402 (io.py reads __version__)
from .inits import Factors, InitScheme, get_scheme, init_schemes, register
from .inject import (IdentityWarning, adapters_disabled, check_identity, inject, lora_layers, lora_param_groups,
                     merge, trainable_parameters, unload, unmerge)
from .io import AdapterError, load_adapter, save_adapter
from .layers import LoraLayer, LoraStateError

__all__ = [
    "AdapterError", "Factors", "IdentityWarning", "InitScheme", "LoraConfig", "LoraLayer", "LoraStateError", "adapters_disabled",
    "check_identity", "get_scheme", "init_schemes", "inject", "lora_layers", "lora_param_groups", "load_adapter", "merge",
    "register", "save_adapter", "trainable_parameters", "unload", "unmerge",
]
