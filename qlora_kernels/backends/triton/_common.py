"""@triton.jit helpers shared by the kernels of this backend."""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, by bit arithmetic.

    Used only under the interpreter, whose fp32->bf16 cast truncates (DESIGN.md section 4); on a GPU
    the plain cast rounds the same way. Inputs are finite here (NaN/Inf never reach the kernels
    that call this).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_cast(ptr, value, mask, OUT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Store fp32 `value` into `ptr`'s dtype with round-to-nearest-even, on GPU and interpreter."""
    if OUT_BF16 and INTERPRET:
        tl.store(ptr, round_to_bf16(value), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_absmax(x):
    """max |x| per row of a [rows, cols] tile, NaN when the row holds a NaN (as torch.amax, the
    reference; Triton's max drops NaN). Only reachable with check_finite=False."""
    absmax = tl.max(tl.abs(x), axis=1)
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    return tl.where(has_nan, float("nan"), absmax)


@triton.jit
def lut_quantize_rows(x, lut_ptr, LUT_SIZE: tl.constexpr):
    """(codes uint8, absmax fp32 per row) of x [blocks, BLOCKSIZE] (padding already zero):
    reference.quantize_blockwise step for step. Callers launch with enable_fp_fusion=False: the
    grid index (v + 1) * 0.5 * 65535 + 0.5 is four separately rounded operations in the spec."""
    absmax = tl.max(tl.abs(x), axis=1)
    is_zero = absmax == 0.0
    inv = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(is_zero, 1.0, absmax))
    v = x * inv[:, None]
    v = tl.where(v == v, v, -1.0)  # NaN -> index 0, as the reference (a NaN -> int cast is undefined)
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    t = (v + 1.0) * 0.5
    t = t * (LUT_SIZE - 1.0)
    t = t + 0.5
    q = tl.load(lut_ptr + t.to(tl.int32))
    q = tl.where(is_zero[:, None], 0, q)
    return q, absmax
