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


# --- 4-bit code lookup by warp shuffle ---------------------------------------------------------
# A 4-bit weight's code is one of 16 fp32 values. Gathering it from the table in global memory
# costs a 64-bit address, an L1 request and bank conflicts among the lanes per nibble (about 12
# instructions per weight in the GEMM tiles, bench/sass_budget.py). Instead each lane l holds
# code[l % 16] in a register (code_table), and shfl.sync.idx reads any lane's register: it takes
# the source lane from bits 4:0 of its index operand only (PTX ISA, shfl.sync), so a packed word
# shifted right to a nibble indexes the table as it is: bit 4, the next nibble's low bit, picks
# lanes 16-31, which hold the same 16 codes. One shift (none for the lowest nibble) and one
# shuffle per weight, exact, no memory traffic. The interpreter has no lanes: it gathers.
# Element order: byte j of a word holds elements 2j (high nibble) and 2j + 1 (low nibble), as
# packed 4-bit tensors do (formats.py).


@triton.jit
def lane_id(like):
    """This thread's lane in its warp, shaped like `like` (GPU only)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def code_table(code_ptr, like, INTERPRET: tl.constexpr):
    """fp32 tensor shaped like `like` holding code[lane % 16] on a GPU (the lookup's table, made
    once before a kernel's loop in the layout of the packed tile it serves); zeros, unused, under
    the interpreter."""
    if INTERPRET:
        table = tl.zeros(like.shape, tl.float32)
    else:
        table = tl.load(code_ptr + (lane_id(like.to(tl.int32)) & 15))
    return table


# The asm of both lookups: $8 is the packed word, $9 its lane's table entry; s0..s6 the word
# shifted to each nibble but the lowest (element order above: shift 4 is byte 0's high nibble).
_SHIFTS = """
            {
            .reg .b32 s<7>;
            shr.u32 s0, $8, 4;
            shr.u32 s1, $8, 12;
            shr.u32 s2, $8, 8;
            shr.u32 s3, $8, 20;
            shr.u32 s4, $8, 16;
            shr.u32 s5, $8, 28;
            shr.u32 s6, $8, 24;
"""
# Outputs $0..$7 = elements 0..7 of the word.
_WORD_ASM: tl.constexpr = tl.constexpr(_SHIFTS + """
            shfl.sync.idx.b32 $0, $9, s0, 0x1f, -1;
            shfl.sync.idx.b32 $1, $9, $8, 0x1f, -1;
            shfl.sync.idx.b32 $2, $9, s1, 0x1f, -1;
            shfl.sync.idx.b32 $3, $9, s2, 0x1f, -1;
            shfl.sync.idx.b32 $4, $9, s3, 0x1f, -1;
            shfl.sync.idx.b32 $5, $9, s4, 0x1f, -1;
            shfl.sync.idx.b32 $6, $9, s5, 0x1f, -1;
            shfl.sync.idx.b32 $7, $9, s6, 0x1f, -1;
            }
""")
# Outputs $0..$3 = the high nibbles of bytes 0..3, $4..$7 = their low nibbles.
_BYTE_ASM: tl.constexpr = tl.constexpr(_SHIFTS + """
            shfl.sync.idx.b32 $0, $9, s0, 0x1f, -1;
            shfl.sync.idx.b32 $1, $9, s1, 0x1f, -1;
            shfl.sync.idx.b32 $2, $9, s3, 0x1f, -1;
            shfl.sync.idx.b32 $3, $9, s5, 0x1f, -1;
            shfl.sync.idx.b32 $4, $9, $8, 0x1f, -1;
            shfl.sync.idx.b32 $5, $9, s2, 0x1f, -1;
            shfl.sync.idx.b32 $6, $9, s4, 0x1f, -1;
            shfl.sync.idx.b32 $7, $9, s6, 0x1f, -1;
            }
""")


@triton.jit
def word_codes(word, table, code_ptr, INTERPRET: tl.constexpr):
    """The fp32 codes of the 8 elements of each int32 `word` of packed bytes (element order above)."""
    if INTERPRET:
        c0 = tl.load(code_ptr + ((word >> 4) & 15))
        c1 = tl.load(code_ptr + (word & 15))
        c2 = tl.load(code_ptr + ((word >> 12) & 15))
        c3 = tl.load(code_ptr + ((word >> 8) & 15))
        c4 = tl.load(code_ptr + ((word >> 20) & 15))
        c5 = tl.load(code_ptr + ((word >> 16) & 15))
        c6 = tl.load(code_ptr + ((word >> 28) & 15))
        c7 = tl.load(code_ptr + ((word >> 24) & 15))
    else:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _WORD_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [word, table], dtype=(tl.float32,) * 8, is_pure=False, pack=1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def byte_codes(byte, table, code_ptr, INTERPRET: tl.constexpr):
    """(high-nibble codes, low-nibble codes), fp32, of a uint8 tensor of packed bytes. On a GPU the
    asm takes 4 bytes a call, packed into one register with the first in bits 7:0 (Triton's packing
    of sub-32-bit inputs, as in tl.inline_asm_elementwise's own example), and 4 table registers, of
    which it reads the first (all hold the same value)."""
    if INTERPRET:
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 0xF))
    else:
        hi, lo = tl.inline_asm_elementwise(
            _BYTE_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [byte, table], dtype=(tl.float32, tl.float32),
            is_pure=False, pack=4)
    return hi, lo
