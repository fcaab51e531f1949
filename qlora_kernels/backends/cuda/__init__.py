"""The CUDA C++ backend: csrc/ kernels through ctypes (libqlora_kernels.so, see _lib.py).

Launchers have exactly the signatures of backends/reference.py. Each allocates its outputs with
torch on the input's device, makes that device current, and launches on torch's current stream of
it (`torch.cuda.current_stream(device).cuda_stream`), so the kernels order with surrounding torch
work and never run on an implicit default stream.

Importing this module never needs a GPU or the library; available() says why it cannot run.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ...formats import check_blocksize, check_quant_type
from . import _lib

DTYPE_CODES = {
    torch.float32: _lib.CONSTANTS["QK_DTYPE_FLOAT32"],
    torch.bfloat16: _lib.CONSTANTS["QK_DTYPE_BFLOAT16"],
    torch.float16: _lib.CONSTANTS["QK_DTYPE_FLOAT16"],
}
QUANT_CODES = {"nf4": _lib.CONSTANTS["QK_QUANT_NF4"], "fp4": _lib.CONSTANTS["QK_QUANT_FP4"]}
NESTED_BLOCKSIZE = 256
LUT_SIZE = 65536

_device_ok: dict[int, tuple[bool, str]] = {}


def available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the cuda backend runs CUDA tensors only (got device type {device.type!r})"
    lib, why = _lib.try_lib()
    if lib is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_ok:
        status = lib.qk_check_device(index)
        _device_ok[index] = (True, "") if status == 0 else (False, f"libqlora_kernels cannot run on cuda:{index}: {_lib.last_error()}")
    return _device_ok[index]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _dtype_code(dtype: torch.dtype, what: str) -> int:
    if dtype not in DTYPE_CODES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {dtype}")
    return DTYPE_CODES[dtype]


def _on(device: torch.device, t: torch.Tensor, what: str) -> None:
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, expected {device}")


def _check_pow2(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"the cuda backend needs a power-of-two blocksize >= 2, got {blocksize!r}")


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    code = _dtype_code(w.dtype, "the weight")
    x = w.contiguous()
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=x.device)
    if n:
        lib = _lib.get_lib()
        with torch.cuda.device(x.device):
            _lib.check(
                lib.qk_quantize_4bit(x.data_ptr(), code, n, blocksize, QUANT_CODES[quant_type], packed.data_ptr(),
                                     absmax.data_ptr(), _stream(x.device)),
                "qk_quantize_4bit",
            )
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    out_code = _dtype_code(dtype, "dtype")
    device = packed.device
    n = math.prod(shape)
    nb = -(-n // blocksize)
    raw = packed.contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() < (n + 1) // 2:
        raise ValueError(f"packed holds {raw.numel()} bytes, shape {tuple(shape)} needs {(n + 1) // 2}")
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if n == 0:
        return out
    _on(device, absmax, "absmax")
    if nested_absmax is not None:
        if nested_code is None or offset is None:
            raise ValueError("double-quantized absmax needs nested_code and offset")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"double-quantized absmax must be uint8, got {absmax.dtype}")
        a = absmax.contiguous()
        a2 = nested_absmax.float().contiguous()
        code2 = nested_code.float().contiguous()
        off = offset.to(device=device, dtype=torch.float32).reshape(1).contiguous()
        _on(device, a2, "nested_absmax")
        _on(device, code2, "nested_code")
        if code2.numel() != 256:
            raise ValueError(f"nested_code must have 256 entries, got {code2.numel()}")
        if a2.numel() < -(-nb // NESTED_BLOCKSIZE):
            raise ValueError(f"nested_absmax has {a2.numel()} entries, {-(-nb // NESTED_BLOCKSIZE)} needed")
        ptrs = (a2.data_ptr(), code2.data_ptr(), off.data_ptr())
    else:
        a = absmax.float().contiguous()
        ptrs = (None, None, None)
    if a.numel() < nb:
        raise ValueError(f"absmax has {a.numel()} entries, {nb} needed for shape {tuple(shape)} at blocksize {blocksize}")
    lib = _lib.get_lib()
    with torch.cuda.device(device):
        _lib.check(
            lib.qk_dequantize_4bit(raw.data_ptr(), a.data_ptr(), *ptrs, n, blocksize, QUANT_CODES[quant_type],
                                   out.data_ptr(), out_code, _stream(device)),
            "qk_dequantize_4bit",
        )
    return out


def dynamic_map_lut(code: torch.Tensor) -> torch.Tensor:
    """reference.dynamic_map_lut computed on the device (uint8 [65536] on code's device)."""
    c = code.float().contiguous()
    if not 2 <= c.numel() <= 256:
        raise ValueError(f"code must have 2..256 entries, got {c.numel()}")
    lut = torch.empty(LUT_SIZE, dtype=torch.uint8, device=c.device)
    lib = _lib.get_lib()
    with torch.cuda.device(c.device):
        _lib.check(lib.qk_dynamic_map_lut(c.data_ptr(), c.numel(), lut.data_ptr(), _stream(c.device)), "qk_dynamic_map_lut")
    return lut


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pow2(blocksize)
    in_code = _dtype_code(x.dtype, "the input")
    _on(x.device, code, "code")
    xc = x.contiguous()
    n = xc.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=x.device)
    if n == 0:
        return q, absmax
    # Rebuilt per call (one tiny kernel): a cache keyed on the code tensor could go stale.
    lut = dynamic_map_lut(code)
    lib = _lib.get_lib()
    with torch.cuda.device(x.device):
        _lib.check(
            lib.qk_quantize_blockwise(xc.data_ptr(), in_code, n, blocksize, lut.data_ptr(), q.data_ptr(),
                                      absmax.data_ptr(), _stream(x.device)),
            "qk_quantize_blockwise",
        )
    return q, absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    _check_pow2(blocksize)
    out_code = _dtype_code(dtype, "dtype")
    if q.dtype != torch.uint8:
        raise TypeError(f"q must be uint8, got {q.dtype}")
    device = q.device
    _on(device, absmax, "absmax")
    _on(device, code, "code")
    qc = q.contiguous()
    n = qc.numel()
    out = torch.empty(q.shape, dtype=dtype, device=device)
    if n == 0:
        return out
    a = absmax.float().contiguous()
    c = code.float().contiguous()
    if c.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {c.numel()}")
    if a.numel() < -(-n // blocksize):
        raise ValueError(f"absmax has {a.numel()} entries, {-(-n // blocksize)} needed")
    lib = _lib.get_lib()
    with torch.cuda.device(device):
        _lib.check(
            lib.qk_dequantize_blockwise(qc.data_ptr(), a.data_ptr(), c.data_ptr(), n, blocksize, out.data_ptr(),
                                        out_code, _stream(device)),
            "qk_dequantize_blockwise",
        )
    return out


# --- unified memory (for the paged optimizer) ---


def pluggable_allocator_args() -> tuple[str, str, str]:
    """(library path, alloc symbol, free symbol) for torch.cuda.memory.CUDAPluggableAllocator."""
    _lib.get_lib()
    return str(_lib.library_path()), "qk_managed_alloc", "qk_managed_free"


def prefetch(t: torch.Tensor, device: Optional[int] = None) -> None:
    """Migrate managed tensor `t` to GPU `device` (default: its own; -1: host memory), ordered on
    the current stream of t's device."""
    dev = t.device.index if device is None else device
    lib = _lib.get_lib()
    with torch.cuda.device(t.device):
        _lib.check(lib.qk_prefetch(t.data_ptr(), t.numel() * t.element_size(), dev, _stream(t.device)), "qk_prefetch")


IMPLS = {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
}
