"""Which algorithm runs the QLoRA linear (ops qlora_linear_fwd / qlora_linear_bwd) on the kernel
backends: the fused kernels, or "dequantize then cuBLAS" (dequantize_4bit to the activation dtype
with this package's own kernel, then torch matmuls for the base and the LoRA terms).

Both stay available and forceable: `with use_linear_strategy("dequant_matmul"):` or env
QLORA_KERNELS_LINEAR=fused|dequant_matmul|auto. "auto" picks per call from the crossover M
measured on that GPU by `python -m qlora_kernels bench` (fwd "fused" vs "unfused chain" rows) and
recorded in MEASURED_DEQUANT_MATMUL_MIN_M; a GPU without a measurement gets the fused kernels.
The reference backend ignores the strategy (it is the spec).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator, Optional

import torch

STRATEGIES = ("auto", "fused", "dequant_matmul")
ENV_VAR = "QLORA_KERNELS_LINEAR"
LINEAR_OPS = ("qlora_linear_fwd", "qlora_linear_bwd")

# GPU name substring -> smallest M (rows of X) at which dequantize + cuBLAS beat the fused kernel
# in a bench run on that GPU. No entry yet: no GPU has been measured (see the issue notes).
MEASURED_DEQUANT_MATMUL_MIN_M: dict[str, int] = {}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("qlora_linear_strategy", default=None)


def _check(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown linear strategy {name!r}; expected one of {STRATEGIES}")
    return name


@contextlib.contextmanager
def use_linear_strategy(name: str) -> Iterator[None]:
    token = _forced.set(_check(name))
    try:
        yield
    finally:
        _forced.reset(token)


def requested_strategy() -> str:
    name = _forced.get()
    if name is not None:
        return name
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def choose(m: int, device: torch.device) -> str:
    """"fused" or "dequant_matmul" for a call with M rows on `device`."""
    name = requested_strategy()
    if name != "auto":
        return name
    gpu = _device_name(device)
    for key, min_m in MEASURED_DEQUANT_MATMUL_MIN_M.items():
        if key in gpu and m >= min_m:
            return "dequant_matmul"
    return "fused"


def _weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype):
    return torch.ops.qlora.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                           quant_type, list(shape), dtype)


def dequant_matmul_fwd(x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
                       shape, lora_A, lora_B, scale, bias):
    """qlora_linear_fwd as dequantize + matmuls in the activation dtype (T returned in fp32)."""
    from ..reference import qlora_linear_forward

    w = _weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, x.dtype)
    y, t = qlora_linear_forward(x, w, lora_A, lora_B, scale, bias, x_lora, compute_dtype=x.dtype)
    return y, t.float()


def dequant_matmul_bwd(grad_out, x_lora, t, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                       quant_type, shape, lora_A, lora_B, scale, compute_dx, lora_dx):
    from ..reference import qlora_linear_backward

    dtype = x_lora.dtype
    w = _weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype)
    dx, da, db, _ = qlora_linear_backward(grad_out, x_lora, t, w, lora_A, lora_B, scale, lora_dx, compute_dtype=dtype)
    if not compute_dx:
        dx = dx[:0]
    return dx.to(dtype), da.to(lora_A.dtype), db.to(lora_B.dtype)


_DEQUANT_MATMUL = {"qlora_linear_fwd": dequant_matmul_fwd, "qlora_linear_bwd": dequant_matmul_bwd}


def with_strategy(op: str, fused: Callable) -> Callable:
    """The op's implementation, choosing fused vs dequant_matmul per call from M."""
    alternative = _DEQUANT_MATMUL[op]

    def run(*args):
        rows = args[0].shape[0]  # x (fwd) or grad_out (bwd): [M, ...]
        return (alternative if choose(rows, args[0].device) == "dequant_matmul" else fused)(*args)

    run.__name__ = f"{op}_by_strategy"
    return run
