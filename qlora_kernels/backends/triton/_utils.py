"""Shared bits of the Triton kernels: interpreter detection and compile-gate specs.

INTERPRET: every kernel that touches bf16 takes one `INTERPRET: tl.constexpr`, true only under
TRITON_INTERPRET=1, where bf16 arithmetic and fp32->bf16 casts are wrong (DESIGN.md section 4): the
kernel then moves bf16 through its raw 16 bits and rounds to nearest even by hand. Launchers pass
`interpreting()`; the compile gate passes False so it compiles the GPU code.

uint8 offsets: a loaded uint8 (an 8-bit code, a double-quantized scale) added to a pointer as it
is gets sign-extended by Triton 3.2 (`cvt.s32.s8` in the PTX), so codes >= 128 would index before
their table; 3.3+ zero-extend. Kernels cast such bytes to int32 first, which zero-extends on every
release, and the compile gate fails any PTX with a byte sign-extension.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton; (0, 0) if it cannot be read."""
    import triton

    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def uses_bf16_bits(dtype: torch.dtype) -> bool:
    """Under the interpreter, bf16 tensors go to kernels as int16 views (see module doc)."""
    return dtype == torch.bfloat16 and interpreting()


TRITON_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass
class KernelSpec:
    """One (kernel, config) the package can launch on a GPU, for the compile gate.

    signature: {argument name: triton type string, e.g. "*fp32", "*u8", "i32", "i64", "fp32"} for
    every non-constexpr argument; constexprs: {name: value} for every tl.constexpr argument (with
    INTERPRET False). needs_tensor_cores: the PTX must contain mma (sm_80) / wgmma (sm_90).
    """

    name: str
    fn: Callable[..., Any]
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    needs_tensor_cores: bool = False
    # Kernels whose rounding must match reference.py are launched with enable_fp_fusion=False
    # (no FMA contraction of a*b+c); the gate compiles them the same way and checks for no fma.
    exact_fp32: bool = False
    # fma instructions an exact_fp32 kernel writes itself (tl.fma) per thread and trip of its main
    # loop, e.g. the decode path's code * x products, which no spec rounding governs. Fusion stays
    # off, so the scale decode still rounds as the reference does; the gate then requires the fma
    # in the PTX to be a positive multiple of this (one trip, or an unrolled few) instead of none:
    # an fma from anywhere else (a libdevice call in the scale decode) breaks the count.
    explicit_fma: int = 0
    # The compute capabilities whose launches use this config (None: every one the gate compiles
    # for); the gate compiles it for those only.
    archs: tuple[int, ...] | None = None
    # At most this many single-byte global loads in the PTX (None: not checked). Set on the
    # launch_variant of kernels that stream packed 4-bit bytes: those must load them in vectors.
    max_byte_loads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items() if k != "INTERPRET"]
        parts += [f"warps={self.num_warps}", f"stages={self.num_stages}"]
        return ",".join(parts)


def launch_variant(spec: KernelSpec, divisible_by_16: tuple[str, ...], equal_to_1: tuple[str, ...] = (),
                   max_byte_loads: int | None = None) -> KernelSpec:
    """`spec` as Triton's JIT specializes it for a real model's shapes: the int arguments named in
    `divisible_by_16` multiples of 16, those in `equal_to_1` equal to 1 (unit strides). Named
    `<name>@ints16` (see compile_check's module doc)."""
    extra = dict(spec.extra)
    extra["divisible_by_16"] = tuple(divisible_by_16)
    extra["equal_to_1"] = tuple(equal_to_1)
    return dataclasses.replace(spec, name=f"{spec.name}@ints16", extra=extra, max_byte_loads=max_byte_loads)


