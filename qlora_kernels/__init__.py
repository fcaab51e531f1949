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

# --- paged AdamW (issue 5) ---
from .optim import PagedAdamW, PagedAdamW8bit  # noqa: E402

__all__ += ["PagedAdamW", "PagedAdamW8bit"]
