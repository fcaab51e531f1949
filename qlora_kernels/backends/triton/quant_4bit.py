"""Triton kernels: 4-bit (NF4/FP4) blockwise quantize and dequantize. Spec: reference.quantize_4bit,
reference.dequantize_4bit, reference.double_dequantize. Ops: qlora::quantize_4bit,
qlora::dequantize_4bit (_ops.py). Tests: python_tests/test_quant_4bit.py.

Both kernels are launched with enable_fp_fusion=False: the reference rounds after every fp32
operation, and an FMA (code2*absmax2 + offset) would round once and break bit-identity.
Divisions that the reference performs use div_rn (the default fp32 division on a GPU is
approximate).

dequantize is memory-bound (4.127 bits read, 16 or 32 written per weight): one program decodes
ELEMS consecutive weights as an [ROWS, COLS] tile whose rows never straddle a quantization block,
so each row needs one scale (decoded once from the double-quantized form) and the packed bytes of a
row are contiguous (16-byte vector loads when COLS >= 32).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ...formats import get_code, num_blocks
from ...reference import sorted_levels
from ._common import row_absmax, store_cast
from ._utils import KernelSpec, interpreting, launch_variant

# Elements per program: quantize keeps whole blocks (absmax needs the full block) in one program.
QUANT_ELEMS = 2048
DEQUANT_ELEMS = 2048
DEQUANT_WARPS = 4
QUANT_WARPS = 4


@triton.jit
def _quantize_4bit_kernel(
    x_ptr, midpoints_ptr, order_ptr, packed_ptr, absmax_ptr, n, nbytes,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr,
):
    # nbytes = ceil(n / 2) is an argument for the reason _dequantize_4bit_kernel's is: computed
    # here, Triton cannot prove the packed bytes aligned and stores them one at a time.
    pid = tl.program_id(0)
    block = pid.to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)  # [BPP]
    col = tl.arange(0, BLOCKSIZE)
    offs = block[:, None] * BLOCKSIZE + col[None, :]  # [BPP, BLOCKSIZE] flat element index
    in_range = offs < n
    x = tl.load(x_ptr + offs, mask=in_range, other=0.0).to(tl.float32)

    absmax = row_absmax(x)  # [BPP]
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    tl.store(absmax_ptr + block, absmax, mask=block < nblocks)

    # Full blocks scale by the reciprocal, a final partial block divides (bitsandbytes' rule).
    # The reference clamps with torch's fp32 1e-38 (a subnormal); an all-zero block then scales
    # 0 by a finite 1e38 and encodes 0.0.
    denom = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))
    inv = tl.math.div_rn(tl.full(denom.shape, 1.0, tl.float32), denom)
    partial = (block + 1) * BLOCKSIZE > n
    divided = tl.math.div_rn(x, denom[:, None])
    scaled = tl.where(partial[:, None], divided, x * inv[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)

    # Rank among the sorted levels = number of midpoints strictly below (ties go to the lower level).
    rank = tl.zeros(scaled.shape, dtype=tl.int32)
    for j in tl.static_range(15):
        rank += (scaled > tl.load(midpoints_ptr + j)).to(tl.int32)
    q = tl.load(order_ptr + rank).to(tl.uint8)

    hi, lo = tl.split(tl.reshape(q, (BLOCKS_PER_PROG, BLOCKSIZE // 2, 2)))
    packed = (hi << 4) | lo
    byte_offs = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte_offs, packed, mask=byte_offs < nbytes)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr, n, nbytes,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, NESTED: tl.constexpr,
    OUT_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    # nbytes = ceil(n / 2) comes as an argument, not computed here: Triton then knows it is a
    # multiple of 16 when it is, so the masked byte loads below become vector loads.
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * (ROWS * COLS) + tl.arange(0, ROWS) * COLS  # [ROWS] first element
    byte_offs = (pid.to(tl.int64) * (ROWS * COLS // 2) + tl.arange(0, ROWS) * (COLS // 2))[:, None] \
        + tl.arange(0, COLS // 2)[None, :]
    packed = tl.load(packed_ptr + byte_offs, mask=byte_offs < nbytes, other=0)

    hi = tl.load(code_ptr + (packed >> 4))
    lo = tl.load(code_ptr + (packed & 0xF))
    values = tl.reshape(tl.join(hi, lo), (ROWS, COLS))  # element 2j from the high nibble

    block = row_start // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=row_start < n, other=0)
        # The uint8 code as an int32 offset: _utils.py's module doc.
        scale = tl.load(nested_code_ptr + q.to(tl.int32)) * tl.load(nested_absmax_ptr + block // 256, mask=row_start < n, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=row_start < n, other=0.0)

    out = values * scale[:, None]
    elem_offs = row_start[:, None] + tl.arange(0, COLS)[None, :]
    store_cast(out_ptr + elem_offs, out, elem_offs < n, OUT_BF16, INTERPRET)


def _blocks_per_program(blocksize: int) -> int:
    return max(1, QUANT_ELEMS // blocksize)


def _quant_warps(blocksize: int) -> int:
    # Quantize holds a whole block per program: 4096-element blocks get 8 warps (no spills).
    return QUANT_WARPS if blocksize <= QUANT_ELEMS else 2 * QUANT_WARPS


def _dequant_tile(blocksize: int) -> tuple[int, int]:
    cols = min(blocksize, DEQUANT_ELEMS)
    return DEQUANT_ELEMS // cols, cols


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = A.contiguous().reshape(-1)
    n = x.numel()
    nb = num_blocks(n, blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    midpoints, order = sorted_levels(quant_type, x.device)
    bpp = _blocks_per_program(blocksize)
    grid = (triton.cdiv(nb, bpp),)
    _quantize_4bit_kernel[grid](
        x, midpoints, order.to(torch.int32), packed, absmax, n, (n + 1) // 2,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROG=bpp, num_warps=_quant_warps(blocksize), enable_fp_fusion=False,
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
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    n = out.numel()
    rows, cols = _dequant_tile(blocksize)
    nested = nested_absmax is not None
    code = get_code(quant_type, packed.device)
    grid = (triton.cdiv(n, rows * cols),)
    _dequantize_4bit_kernel[grid](
        packed.reshape(-1), absmax,
        nested_absmax if nested else absmax, nested_code if nested else code,
        offset.reshape(1).float() if nested else absmax, code, out, n, (n + 1) // 2,
        BLOCKSIZE=blocksize, ROWS=rows, COLS=cols, NESTED=nested,
        OUT_BF16=dtype == torch.bfloat16, INTERPRET=interpreting(),
        num_warps=DEQUANT_WARPS, enable_fp_fusion=False,
    )
    return out


IMPLS = {"quantize_4bit": quantize_4bit, "dequantize_4bit": dequantize_4bit}

_IN_TYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# The only byte loads left once the packed bytes load in vectors: the u8 double-quantized scales.
DEQUANT_MAX_BYTE_LOADS = 2


def compile_specs() -> list[KernelSpec]:
    """Every (kernel, constexpr) combination the launchers above can produce, plus the dequantize
    kernel as it runs on a real model's weights (n a multiple of 32), for two tile shapes."""
    specs = []
    for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        for tname in _IN_TYPES:
            specs.append(KernelSpec(
                name="quantize_4bit", fn=_quantize_4bit_kernel,
                signature={"x_ptr": f"*{tname}", "midpoints_ptr": "*fp32", "order_ptr": "*i32",
                           "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i32", "nbytes": "i32"},
                constexprs={"BLOCKSIZE": bs, "BLOCKS_PER_PROG": _blocks_per_program(bs)},
                num_warps=_quant_warps(bs), exact_fp32=True,
            ))
        rows, cols = _dequant_tile(bs)
        for nested in (True, False):
            for tname in _IN_TYPES:
                specs.append(KernelSpec(
                    name="dequantize_4bit", fn=_dequantize_4bit_kernel,
                    signature={"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                               "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32",
                               "code_ptr": "*fp32", "out_ptr": f"*{tname}", "n": "i32", "nbytes": "i32"},
                    constexprs={"BLOCKSIZE": bs, "ROWS": rows, "COLS": cols, "NESTED": nested,
                                "OUT_BF16": tname == "bf16", "INTERPRET": False},
                    num_warps=DEQUANT_WARPS, exact_fp32=True,
                ))
    specs += [launch_variant(s, divisible_by_16=("n", "nbytes"), max_byte_loads=DEQUANT_MAX_BYTE_LOADS)
              for s in specs if s.name == "dequantize_4bit" and s.constexprs["BLOCKSIZE"] in (64, 4096)]
    return specs
