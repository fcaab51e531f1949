"""qlora_kernels: NF4 QLoRA kernels (reference PyTorch, Triton, CUDA C++).

Layers: formats -> reference -> backends -> _ops -> functional -> (autograd, nn, optim) -> CLI.
"""

from .backends import BackendUnavailableError, use_backend
from .formats import QuantState
from .functional import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise
from .functional import qlora_linear

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "QuantState",
    "dequantize_4bit",
    "dequantize_blockwise",
    "qlora_linear",
    "quantize_4bit",
    "quantize_blockwise",
    "use_backend",
]

# --- modules and files (issue 4) ---
from .nn import QLoRALinear, memory_report, replace_linear  # noqa: E402
from .io import load_adapter, load_quantized, save_adapter, save_quantized  # noqa: E402

__all__ += ["QLoRALinear", "load_adapter", "load_quantized", "memory_report", "replace_linear", "save_adapter",
            "save_quantized"]

# --- paged AdamW (issue 5) ---
from .optim import PagedAdamW, PagedAdamW8bit  # noqa: E402

__all__ += ["PagedAdamW", "PagedAdamW8bit"]
