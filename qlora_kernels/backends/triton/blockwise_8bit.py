"""Triton kernels: 8-bit blockwise quantize/dequantize with a 256-entry dynamic map.

Spec: reference.quantize_blockwise / reference.dequantize_blockwise (the 65536-entry lookup-table
encoder that bitsandbytes' CPU path uses). Ops: qlora::quantize_blockwise,
qlora::dequantize_blockwise (_ops.py). Used for double quantization of the 4-bit absmax and for
the 8-bit optimizer states. Tests: python_tests/test_blockwise_8bit.py.

Launched with enable_fp_fusion=False: the LUT index (v + 1) * 0.5 * 65535 + 0.5 is four separately
rounded fp32 operations in the spec, and an FMA would move some values to the neighbouring entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import DYNAMIC_LUT_SIZE, num_blocks
from ...reference import cached_lut
from ._common import lut_quantize_rows, store_cast
from ._utils import KernelSpec, interpreting

ELEMS_PER_PROG = 2048
WARPS = 4
# The quantize kernel holds each value, its scaled copy and its LUT index live at once: at 4 warps
# (16 values per thread) triton 3.6's build spilled 4 bytes for some blocksizes (compile gate).
QUANTIZE_WARPS = 8


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr, lut_ptr, q_ptr, absmax_ptr, n,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, LUT_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    block = pid.to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_range = offs < n
    x = tl.load(x_ptr + offs, mask=in_range, other=0.0).to(tl.float32)

    q, absmax = lut_quantize_rows(x, lut_ptr, LUT_SIZE)
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    tl.store(absmax_ptr + block, absmax, mask=block < nblocks)
    tl.store(q_ptr + offs, q, mask=in_range)


@triton.jit
def _dequantize_blockwise_kernel(
    q_ptr, absmax_ptr, code_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, OUT_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    block = pid.to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_range = offs < n
    q = tl.load(q_ptr + offs, mask=in_range, other=0)
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    scale = tl.load(absmax_ptr + block, mask=block < nblocks, other=0.0)
    out = tl.load(code_ptr + q.to(tl.int32)) * scale[:, None]  # int32: see _utils.py's module doc
    store_cast(out_ptr + offs, out, in_range, OUT_BF16, INTERPRET)


def _blocks_per_program(blocksize: int) -> int:
    return max(1, ELEMS_PER_PROG // blocksize)


def _dequantize_warps(blocksize: int) -> int:
    # A 4096-element block in one program holds 32 values per thread at 4 warps and spilled on
    # sm_80 (compile gate); 8 warps halve that.
    return WARPS if blocksize <= ELEMS_PER_PROG else 2 * WARPS


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = A.contiguous()
    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    nb = num_blocks(n, blocksize)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    bpp = _blocks_per_program(blocksize)
    _quantize_blockwise_kernel[(triton.cdiv(nb, bpp),)](
        x.reshape(-1), cached_lut(code), q.reshape(-1), absmax, n,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROG=bpp, LUT_SIZE=DYNAMIC_LUT_SIZE,
        num_warps=QUANTIZE_WARPS, enable_fp_fusion=False,
    )
    return q, absmax


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    q = A.contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n = q.numel()
    bpp = _blocks_per_program(blocksize)
    _dequantize_blockwise_kernel[(triton.cdiv(num_blocks(n, blocksize), bpp),)](
        q.reshape(-1), absmax, code.float(), out.reshape(-1), n,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROG=bpp, OUT_BF16=dtype == torch.bfloat16, INTERPRET=interpreting(),
        num_warps=_dequantize_warps(blocksize), enable_fp_fusion=False,
    )
    return out


IMPLS = {"quantize_blockwise": quantize_blockwise, "dequantize_blockwise": dequantize_blockwise}

# Blocksizes launched in this package: 256 (double quantization, optimizer states); 64..4096 for
# users of quantize_blockwise.
_SPEC_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def compile_specs() -> list[KernelSpec]:
    specs = []
    for bs in _SPEC_BLOCKSIZES:
        for tname in ("fp32", "bf16", "fp16"):
            specs.append(KernelSpec(
                name="quantize_blockwise", fn=_quantize_blockwise_kernel,
                signature={"x_ptr": f"*{tname}", "lut_ptr": "*u8", "q_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i32"},
                constexprs={"BLOCKSIZE": bs, "BLOCKS_PER_PROG": _blocks_per_program(bs), "LUT_SIZE": DYNAMIC_LUT_SIZE},
                num_warps=QUANTIZE_WARPS, exact_fp32=True,
            ))
            specs.append(KernelSpec(
                name="dequantize_blockwise", fn=_dequantize_blockwise_kernel,
                signature={"q_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": f"*{tname}", "n": "i32"},
                constexprs={"BLOCKSIZE": bs, "BLOCKS_PER_PROG": _blocks_per_program(bs),
                            "OUT_BF16": tname == "bf16", "INTERPRET": False},
                num_warps=_dequantize_warps(bs), exact_fp32=True,
            ))
    return specs
