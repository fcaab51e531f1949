"""The Triton backend: kernels for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1.

Kernel modules are imported lazily (on first use of IMPLS), because whether @triton.jit builds a
GPU kernel or an interpreted one is decided when the module is imported. KERNEL_MODULES lists
every module with kernels; each exposes IMPLS (op name -> launcher) and compile_specs() (the
configs it can launch, for `python -m qlora_kernels compile-check`).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ._utils import interpreting

KERNEL_MODULES = ("quant_4bit", "blockwise_8bit", "qlora_linear", "qlora_linear_small_m", "adamw")

_loaded_interpreted: bool | None = None


def _kernel_modules() -> list[Any]:
    global _loaded_interpreted
    mods = [importlib.import_module(f"{__name__}.{m}") for m in KERNEL_MODULES]
    if _loaded_interpreted is None:
        _loaded_interpreted = interpreting()
    return mods


def available(device: torch.device) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, ""
    if device.type == "cpu":
        if not interpreting():
            return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1, set before the kernels are defined"
        if _loaded_interpreted is False:
            return False, "the Triton kernels were defined for a GPU before TRITON_INTERPRET=1 was set"
        return True, ""
    return False, f"no Triton support for device type {device.type}"


def compile_specs() -> list:
    specs = []
    for mod in _kernel_modules():
        specs.extend(mod.compile_specs())
    return specs


def __getattr__(name: str):
    if name == "IMPLS":
        impls: dict[str, Any] = {}
        for mod in _kernel_modules():
            impls.update(mod.IMPLS)
        return impls
    raise AttributeError(name)
