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
