"""fastpeft: fused Triton kernels for LoRA / QLoRA training and multi-LoRA serving.

    import fastpeft
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05))
    ...train...
    fastpeft.save_adapter(model, "out/")        # PEFT's on-disk format

Importing fastpeft never imports peft.
"""
from .config import LoraConfig
from .options import Options, get_options, set_options
from .layer import LoraLinear
from .multi_lora import MultiLora
from .patch import merge, patch, unmerge, unpatch
from .adapter_io import load_adapter, save_adapter
from .utils import print_trainable_parameters, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "Options",
    "get_options",
    "set_options",
    "LoraLinear",
    "MultiLora",
    "patch",
    "unpatch",
    "merge",
    "unmerge",
    "save_adapter",
    "load_adapter",
    "trainable_parameters",
    "print_trainable_parameters",
]
