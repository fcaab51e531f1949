"""Which algorithm runs the base GEMMs of the QLoRA linear (ops qlora_linear_fwd / qlora_linear_bwd)
on the kernel backends: the fused kernels (W dequantized tile by tile in registers), or "dequantize
then cuBLAS" (dequantize_4bit to the activation dtype with this package's own kernel, then a torch
matmul for X @ W^T or dY @ W). Everything else is shared by both, so they differ only in the base
product's summation order and its one extra rounding before the LoRA term is added: T = X A^T,
U = dY B, dA and dB, and the epilogue that adds s * T B^T (+ bias) or s * U A in fp32 (see
backends/triton/qlora_linear.py, which consults choose() per call; the cuda backend's decode GEMV
hands its calls to it when choose() says dequant_matmul).

Both stay available and forceable: `with use_linear_strategy("dequant_matmul"):` or env
QLORA_KERNELS_LINEAR=fused|dequant_matmul|auto. "auto" picks per call from the crossover M
measured on that GPU by `python -m qlora_kernels bench` (its fwd+bwd rows "fused" vs "dequant+cuBLAS") and
recorded in MEASURED_DEQUANT_MATMUL_MIN_M; a GPU without a measurement gets the fused kernels.
The reference backend ignores the strategy (it is the spec).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

import torch

STRATEGIES = ("auto", "fused", "dequant_matmul")
ENV_VAR = "QLORA_KERNELS_LINEAR"

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
    if not MEASURED_DEQUANT_MATMUL_MIN_M:  # every linear call asks: skip the device query
        return "fused"
    gpu = _device_name(device)
    for key, min_m in MEASURED_DEQUANT_MATMUL_MIN_M.items():
        if key in gpu and m >= min_m:
            return "dequant_matmul"
    return "fused"
