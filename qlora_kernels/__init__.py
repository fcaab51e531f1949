"""qlora_kernels: NF4 QLoRA kernels (reference PyTorch, Triton, CUDA C++).

Layers: formats -> reference -> backends -> _ops -> functional -> (autograd, nn, io, optim) -> CLI.
"""

from .backends import BackendUnavailableError, use_backend
from .formats import QuantState
from .functional import dequantize_4bit, dequantize_blockwise, qlora_linear, quantize_4bit, quantize_blockwise
from .io import from_pretrained, load_adapter, load_quantized, save_adapter, save_pretrained_quantized, save_quantized
from .nn import (QLoRALinear, adapter_active, add_adapter, delete_adapter, disable_adapter, from_peft, memory_report,
                 merge_and_unload, prepare_model_for_kbit_training, replace_linear, set_adapter, unload)
from .optim import PagedAdamW, PagedAdamW8bit

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "PagedAdamW",
    "PagedAdamW8bit",
    "QLoRALinear",
    "QuantState",
    "adapter_active",
    "add_adapter",
    "delete_adapter",
    "dequantize_4bit",
    "dequantize_blockwise",
    "disable_adapter",
    "from_peft",
    "from_pretrained",
    "load_adapter",
    "load_quantized",
    "memory_report",
    "merge_and_unload",
    "prepare_model_for_kbit_training",
    "qlora_linear",
    "quantize_4bit",
    "quantize_blockwise",
    "replace_linear",
    "save_adapter",
    "save_pretrained_quantized",
    "save_quantized",
    "set_adapter",
    "unload",
    "use_backend",
]
