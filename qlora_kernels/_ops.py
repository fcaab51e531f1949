"""Every torch.library op of the package: schema, fake (meta) implementation, device dispatch.

One place for all of them (as bitsandbytes does), so a newcomer finds every op's signature here,
its spec in reference.py and its kernels under backends/. The real implementation registered for
CPU and CUDA asks backends.get_impl which backend runs (forced or automatic).

Ops (namespace "qlora"):
  quantize_4bit(A, blocksize, quant_type) -> (packed uint8 [ceil(n/2), 1], absmax fp32 [nb])
  dequantize_4bit(packed, absmax, nested_absmax?, nested_code?, offset?, blocksize, quant_type,
                  shape, dtype) -> Tensor[shape] of dtype   (absmax uint8 when nested, else fp32)
  quantize_blockwise(A, code, blocksize) -> (q uint8 like A, absmax fp32 [nb])
  dequantize_blockwise(A, absmax, code, blocksize, dtype) -> Tensor like A of dtype
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backends import get_impl

LIB_NAME = "qlora"
_lib = torch.library.Library(LIB_NAME, "DEF")

SCHEMAS = {
    "quantize_4bit": "(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)",
    "dequantize_4bit": (
        "(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
        "int blocksize, str quant_type, SymInt[] shape, ScalarType dtype) -> Tensor"
    ),
    "quantize_blockwise": "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_blockwise": "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
}

for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _dispatching(op: str):
    def impl(*args):
        device = args[0].device
        _, fn = get_impl(op, device)
        return fn(*args)

    impl.__name__ = f"{op}_dispatch"
    return impl


for _name in SCHEMAS:
    _lib.impl(_name, _dispatching(_name), "CPU")
    _lib.impl(_name, _dispatching(_name), "CUDA")


# --- fake implementations (shapes only), for torch.compile and opcheck ---


def _nblocks(n, blocksize: int):
    return (n + blocksize - 1) // blocksize


@torch.library.register_fake(f"{LIB_NAME}::quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = A.new_empty((_nblocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake(f"{LIB_NAME}::dequantize_4bit")
def _(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake(f"{LIB_NAME}::quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((_nblocks(A.numel(), blocksize),), dtype=torch.float32)


@torch.library.register_fake(f"{LIB_NAME}::dequantize_blockwise")
def _(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype):
    return A.new_empty(A.shape, dtype=dtype)


def op_names() -> tuple[str, ...]:
    return tuple(SCHEMAS)


