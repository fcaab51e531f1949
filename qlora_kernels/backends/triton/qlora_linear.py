"""Triton kernels: the fused QLoRA linear, forward and backward. Spec: reference.qlora_linear_forward
and reference.qlora_linear_backward. Ops: qlora::qlora_linear_fwd, qlora::qlora_linear_bwd (_ops.py).
Tests: python_tests/test_qlora_linear.py. Small-M forward (M <= 16): qlora_linear_small_m.py, one
launch that computes T and Y together (a decode step is too short for a second launch).

Forward, for X [M, K], W [N, K] stored 4-bit, A [r, K], B [N, r]:
    T = X_lora @ A^T             _lora_down_kernel  -> fp32 [M, r], saved for the backward
    Y = X @ W^T + s*T @ B^T + b  _fwd_kernel: W tiles dequantized in registers, never in memory
Backward, for dY [M, N]:
    U = dY @ B                   _lora_down_kernel  -> fp32 [M, r]
    dX = dY @ W + s*U @ A        _dx_kernel: the same tile dequantizer, reduction over N
    dA = s*U^T @ X_lora, dB = s*dY^T @ T: torch matmuls (cuBLAS) when X and dY already have the
                                 LoRA dtype; else _lora_down_kernel over X^T / dY^T, converting
                                 tiles in registers instead of writing upcast copies, with the
                                 M-row reduction split across the SMs (lora_weight_grads)
The "dequant_matmul" linear strategy (linear_strategy.py, chosen per call by M) replaces only the
two base GEMMs: dequantize_4bit, a torch matmul, then _lora_epilogue_kernel adds s*T @ B^T + b
(or s*U @ A) in fp32 in place, as the fused kernels' epilogue does.

Numerics: the tensor-core operands are the activation dtype (bf16/fp16; fp32 activations use
tf32x3, about fp32 accuracy), accumulation is fp32. The dequantized weight tile equals
reference.dequantize_weight bit for bit in fp32 (launched with enable_fp_fusion=False so the
double-quantized scale rounds twice, as the spec does) and is then rounded once to the operand
dtype, exactly what "dequantize to bf16, then matmul" would feed cuBLAS. The LoRA path runs in the
LoRA weights' dtype (as PEFT casts x to lora_A's dtype); T and U stay fp32 between kernels.

Under TRITON_INTERPRET=1 (INTERPRET constexpr) bf16 arithmetic and fp32->bf16 casts are wrong
(DESIGN.md section 4): tiles are upcast to fp32 after loading, every rounding to a bf16 operand
is emulated by a round-to-nearest-even bit trick on the fp32 value, and bf16 stores go through
the same trick, so the interpreter computes what the GPU computes up to summation order.

Where a weight tile's scales come from (flat element index i = n*K + k, block i // blocksize):
  ALIGNED (K % blocksize == 0): a tile row of BK elements spans NSB = max(1, BK // blocksize)
      whole blocks, so the scales are a [BN, NSB] load decoded once per tile, not per element.
  otherwise (blocks cross rows): with BK <= blocksize a tile row touches at most two blocks, both
      decoded per row and selected per element; with BK > blocksize, or odd K, the scale is
      gathered per element (correct for every K, slower: the register budget of the odd-K path
      has no room for the select).
  PAIRED (K even): a tile row's bytes are contiguous and hold (high, low) nibble pairs, joined in
      registers; odd K (rows start mid-byte) gathers each nibble by its flat index.
The codes of PAIRED tiles are looked up by warp shuffle on a GPU (_common.py: one shift and one
shuffle per weight, exact) and gathered under the interpreter, which has no lanes: the same values.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ...formats import get_code
from ..linear_strategy import choose as choose_strategy
from .._device import cc_major, sm_count
from ._common import byte_codes, code_table
from ._utils import KernelSpec, interpreting, launch_variant, triton_version

# Operand kinds of tl.dot (constexpr values).
KIND_FP32, KIND_BF16, KIND_FP16 = 0, 1, 2
_KIND_OF = {torch.float32: KIND_FP32, torch.bfloat16: KIND_BF16, torch.float16: KIND_FP16}
_TYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ---------------------------------------------------------------------------------------------
# @triton.jit helpers (also used by qlora_linear_small_m.py)
# ---------------------------------------------------------------------------------------------


@triton.jit
def round_bf16_f32(x):
    """fp32 -> the fp32 value of the nearest bf16 (ties to even), by bit arithmetic. Finite input."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def as_operand(v, KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """A tile as a tl.dot operand of KIND. Under the interpreter the operand stays fp32 but holds
    exactly the value the GPU's cast would produce (fp16 casts are exact there, bf16 are not)."""
    if INTERPRET:
        v = v.to(tl.float32)
        if KIND == 1:
            v = round_bf16_f32(v)
        elif KIND == 2:
            v = v.to(tl.float16).to(tl.float32)
    else:
        if KIND == 1:
            v = v.to(tl.bfloat16)
        elif KIND == 2:
            v = v.to(tl.float16)
        else:
            v = v.to(tl.float32)
    return v


@triton.jit
def dot_acc(a, b, acc, KIND: tl.constexpr):
    # fp32 operands: tf32x3 keeps ~fp32 accuracy on the tensor cores (plain tf32 would not).
    if KIND == 0:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def store_out(ptr, value, mask, OUT_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Store fp32 `value` in ptr's dtype, rounding to nearest even on GPU and interpreter alike."""
    if OUT_BF16 and INTERPRET:
        bits = (value.to(tl.uint32, bitcast=True) + 0x7FFF + ((value.to(tl.uint32, bitcast=True) >> 16) & 1)) >> 16
        tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_scale(absmax_ptr, nabsmax_ptr, ncode_ptr, offset, blk, mask, NESTED: tl.constexpr):
    """fp32 absmax of blocks `blk` (int64, any shape); 0 where masked."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0)
        # The uint8 code as an int32 offset: _utils.py's module doc.
        s = tl.load(ncode_ptr + q.to(tl.int32)) * tl.load(nabsmax_ptr + blk // 256, mask=mask, other=0.0)
        s = tl.where(mask, s + offset, 0.0)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return s


@triton.jit
def tile_code_table(code_ptr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr):
    """dequant_tile's `table`: the code table of the warp-shuffle lookup (_common.py) in the
    layout of a tile's [BN, BK / 2] packed bytes, made once before the kernel's loop."""
    return code_table(code_ptr, tl.arange(0, BN)[:, None] + tl.arange(0, BK // 2)[None, :], INTERPRET)


@triton.jit
def dequant_tile(
    packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset, code_ptr, table,
    n0, k0, N, K,
    BN: tl.constexpr, BK: tl.constexpr, BLOCKSIZE: tl.constexpr, NSB: tl.constexpr,
    NESTED: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr, INTERPRET: tl.constexpr,
):
    """fp32 [BN, BK] tile of dequant(W) at rows n0.., cols k0.. (k0 a multiple of BK); 0 outside W.
    table: tile_code_table's (PAIRED tiles look their codes up by warp shuffle on a GPU)."""
    offs_n = n0 + tl.arange(0, BN)
    n_ok = offs_n < N
    row = offs_n.to(tl.int64) * K  # flat index of each row's first element
    if PAIRED:
        if ALIGNED:
            # Bytes addressed from the tile's first one (K and k0 are even): with K a multiple of
            # 16, Triton proves each row's bytes contiguous and aligned and loads them in vectors.
            kb = tl.arange(0, BK // 2)
            bmask = n_ok[:, None] & (kb < (K - k0) // 2)[None, :]
            byte = tl.load(packed_ptr + (row + k0)[:, None] // 2 + kb[None, :], mask=bmask, other=0)
        else:
            # Blocks crossing rows (rare shapes): the form above spilled here under triton 3.6 on sm_80.
            kk = k0 + 2 * tl.arange(0, BK // 2)
            bmask = n_ok[:, None] & (kk < K)[None, :]
            byte = tl.load(packed_ptr + (row[:, None] + kk[None, :]) // 2, mask=bmask, other=0)
        hi, lo = byte_codes(byte, table, code_ptr, INTERPRET)
        vals = tl.reshape(tl.join(hi, lo), (BN, BK))  # element 2j is the high nibble
    else:
        offs_k = k0 + tl.arange(0, BK)
        flat = row[:, None] + offs_k[None, :]
        emask = n_ok[:, None] & (offs_k < K)[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=emask, other=0)
        nib = tl.where((flat % 2) == 0, byte >> 4, byte & 0xF)
        vals = tl.load(code_ptr + nib)
    if ALIGNED:
        blk0 = (row + k0) // BLOCKSIZE  # [BN]
        if NSB == 1:
            scale = load_scale(absmax_ptr, nabsmax_ptr, ncode_ptr, offset, blk0, n_ok, NESTED)
            w = vals * scale[:, None]
        else:
            j = tl.arange(0, NSB)
            smask = n_ok[:, None] & ((k0 + j * BLOCKSIZE) < K)[None, :]
            scale = load_scale(absmax_ptr, nabsmax_ptr, ncode_ptr, offset, blk0[:, None] + j[None, :], smask, NESTED)
            w = tl.reshape(tl.reshape(vals, (BN, NSB, BLOCKSIZE)) * scale[:, :, None], (BN, BK))
    else:
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        blk = (row[:, None] + offs_k[None, :]) // BLOCKSIZE
        if NSB == 1 and PAIRED:
            # BK <= blocksize: a tile row touches at most two blocks. Decode both scales per row
            # and pick one per element (no per-element loads).
            blk0 = (row + k0) // BLOCKSIZE
            # The second block exists where it starts inside this row (so inside W).
            has_next = n_ok & ((blk0 + 1) * BLOCKSIZE < row + K)
            s0 = load_scale(absmax_ptr, nabsmax_ptr, ncode_ptr, offset, blk0, n_ok, NESTED)
            s1 = load_scale(absmax_ptr, nabsmax_ptr, ncode_ptr, offset, blk0 + 1, has_next, NESTED)
            scale = tl.where(blk == blk0[:, None], s0[:, None], s1[:, None])
            w = tl.where(k_ok[None, :], vals * scale, 0.0)
        else:
            emask = n_ok[:, None] & k_ok[None, :]
            scale = load_scale(absmax_ptr, nabsmax_ptr, ncode_ptr, offset, blk, emask, NESTED)
            w = vals * scale
    return w


@triton.jit
def x_wt_tiles(
    acc, x_ptr, offs_m, M, stride_xm, stride_xk, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr,
    n0, k_start, k_step, N, K,
    BN: tl.constexpr, BK: tl.constexpr, BLOCKSIZE: tl.constexpr, NSB: tl.constexpr,
    NESTED: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr, X_KIND: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """acc [rows, BN] + X[offs_m, k] @ dequant(W)[n0 .., k]^T over the BK-wide k-tiles at k_start,
    k_start + k_step, ... (< K): the forward GEMM's loop and the small-M kernel's tiles."""
    m_ok = offs_m < M
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    table = tile_code_table(code_ptr, BN, BK, INTERPRET)
    for k0 in range(k_start, K, k_step):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * stride_xk, mask=m_ok[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        w = dequant_tile(packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset, code_ptr, table, n0, k0, N, K,
                         BN, BK, BLOCKSIZE, NSB, NESTED, PAIRED, ALIGNED, INTERPRET)
        acc = dot_acc(as_operand(x, X_KIND, INTERPRET), tl.trans(as_operand(w, X_KIND, INTERPRET)), acc, X_KIND)
    return acc


@triton.jit
def lora_up(acc, t_ptr, b_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_bn, stride_br, scale,
            RP: tl.constexpr, L_KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + (s * T[offs_m, :R]) @ B[offs_n, :R]^T, r padded to RP (a power of two >= 16).

    s scales T before the dot so the dot accumulates straight into acc: a second [BM, BN] fp32
    accumulator for the LoRA term made the fp32 (tf32x3) epilogue spill on sm_90."""
    offs_r = tl.arange(0, RP)
    r_ok = offs_r < R
    t = tl.load(t_ptr + offs_m.to(tl.int64)[:, None] * stride_tm + offs_r[None, :],
                mask=(offs_m < M)[:, None] & r_ok[None, :], other=0.0)
    bt = tl.load(b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_r[:, None] * stride_br,
                 mask=r_ok[:, None] & (offs_n < N)[None, :], other=0.0)
    return dot_acc(as_operand(t * scale, L_KIND, INTERPRET), as_operand(bt, L_KIND, INTERPRET), acc, L_KIND)


@triton.jit
def lora_down_range(p_ptr, q_ptr, offs_m, M, R, l_start, l_end, stride_pm, stride_pl, stride_ql, stride_qr,
                    BM: tl.constexpr, BL: tl.constexpr, RP: tl.constexpr, KIND: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """fp32 [BM, RP] P[offs_m, l_start:l_end] @ Q[l_start:l_end, :R] padded to RP columns, in BL-wide steps with
    operands of KIND: the reduction of T = X A^T, U = dY B and the LoRA weight gradients."""
    offs_r = tl.arange(0, RP)
    m_ok = offs_m < M
    r_ok = offs_r < R
    p_rows = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for l0 in range(l_start, l_end, BL):
        offs_l = l0 + tl.arange(0, BL)
        l_ok = offs_l < l_end
        p = tl.load(p_rows + offs_l[None, :].to(tl.int64) * stride_pl, mask=m_ok[:, None] & l_ok[None, :], other=0.0)
        q = tl.load(q_ptr + offs_l.to(tl.int64)[:, None] * stride_ql + offs_r[None, :] * stride_qr,
                    mask=l_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot_acc(as_operand(p, KIND, INTERPRET), as_operand(q, KIND, INTERPRET), acc, KIND)
    return acc


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lora_down_kernel(
    p_ptr, q_ptr, c_ptr, M, L, R, L_PER_SPLIT,
    stride_pm, stride_pl, stride_ql, stride_qr,
    BM: tl.constexpr, BL: tl.constexpr, RP: tl.constexpr, KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    """C[s] [M, R] fp32 (row stride R) = P[:, Ls] @ Q[Ls, :] over the split Ls = [s*L_PER_SPLIT,
    (s+1)*L_PER_SPLIT) of the reduction, s = program_id(1): T = X @ A^T and U = dY @ B unsplit;
    dA^T = X^T @ (s U) and dB = dY^T @ (s T), whose reduction runs over the M rows, split."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid * BM + tl.arange(0, BM)
    offs_r = tl.arange(0, RP)
    l_start = split * L_PER_SPLIT
    acc = lora_down_range(p_ptr, q_ptr, offs_m, M, R, l_start, tl.minimum(L, l_start + L_PER_SPLIT),
                          stride_pm, stride_pl, stride_ql, stride_qr, BM, BL, RP, KIND, INTERPRET)
    c = c_ptr + split.to(tl.int64) * M * R + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    tl.store(c, acc, mask=(offs_m < M)[:, None] & (offs_r < R)[None, :])


@triton.jit
def lora_and_bias(acc, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_bn, stride_br, scale,
                  RP: tl.constexpr, L_KIND: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """The forward epilogue: acc (+ s * T @ B^T) (+ bias), before the single store."""
    if HAS_LORA:
        acc = lora_up(acc, t_ptr, b_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_bn, stride_br, scale,
                      RP, L_KIND, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lora_epilogue_kernel(
    y_ptr, t_ptr, b_ptr, bias_ptr,
    M, N, R, scale, stride_ym, stride_tm, stride_bn, stride_br,
    BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, L_KIND: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, Y_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Y [M, N] += s * T @ B^T (+ bias) in place (ACCUMULATE; else Y = ...), summed in fp32 and
    rounded once: the fused forward's epilogue over a Y that cuBLAS computed (the dequant_matmul
    strategy), so both strategies run the LoRA term with the same operands and precision; and the
    LoRA part of dX alone, s * U @ A, when LoRA dropout separates it (lora_input_grad)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if ACCUMULATE:
        acc = tl.load(y, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = lora_and_bias(acc, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_bn, stride_br,
                        scale, RP, L_KIND, HAS_LORA, HAS_BIAS, INTERPRET)
    store_out(y, acc, mask, Y_BF16, INTERPRET)


@triton.jit
def grouped_tile(pid, num_m, num_cols, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped launch order: GROUP_M row tiles walk
    each column of W tiles together, so that column stays in L2 while they use it."""
    group = pid // (GROUP_M * num_cols)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_cols)) % size_m
    pid_col = (pid % (GROUP_M * num_cols)) // size_m
    return pid_m, pid_col


@triton.jit
def _fwd_kernel(
    x_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr,
    t_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_tm, stride_bn, stride_br, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, RP: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NSB: tl.constexpr,
    NESTED: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_KIND: tl.constexpr, L_KIND: tl.constexpr, Y_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Y [M, N] = X @ dequant(W)^T (+ s * T @ B^T) (+ bias)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    acc = x_wt_tiles(tl.zeros((BM, BN), dtype=tl.float32), x_ptr, offs_m, M, stride_xm, stride_xk, packed_ptr,
                     absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr, pid_n * BN, 0, BK, N, K,
                     BN, BK, BLOCKSIZE, NSB, NESTED, PAIRED, ALIGNED, X_KIND, INTERPRET)
    acc = lora_and_bias(acc, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_bn, stride_br,
                        scale, RP, L_KIND, HAS_LORA, HAS_BIAS, INTERPRET)
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    store_out(y, acc, m_ok[:, None] & (offs_n < N)[None, :], Y_BF16, INTERPRET)


@triton.jit
def _dx_kernel(
    dy_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr,
    u_ptr, a_ptr, dx_ptr,
    M, N, K, R, scale,
    stride_dym, stride_dyn, stride_um, stride_ar, stride_ak, stride_dxm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, RP: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NSB: tl.constexpr,
    NESTED: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr,
    X_KIND: tl.constexpr, L_KIND: tl.constexpr, Y_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dX [M, K] = dY @ dequant(W) (+ s * U @ A): W read packed, tiles [BN, BK] down its columns."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(K, BK), GROUP_M)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    m_ok = offs_m < M
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    table = tile_code_table(code_ptr, BN, BK, INTERPRET)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        dy = tl.load(dy_rows + offs_n.to(tl.int64)[None, :] * stride_dyn, mask=m_ok[:, None] & (offs_n < N)[None, :], other=0.0)
        w = dequant_tile(packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset, code_ptr, table, n0, pid_k * BK, N,
                         K, BN, BK, BLOCKSIZE, NSB, NESTED, PAIRED, ALIGNED, INTERPRET)
        acc = dot_acc(as_operand(dy, X_KIND, INTERPRET), as_operand(w, X_KIND, INTERPRET), acc, X_KIND)
    if HAS_LORA:
        # s * U @ A: the same epilogue as the forward's, with A [r, K] read as "B^T" of [K, r].
        acc = lora_up(acc, u_ptr, a_ptr, offs_m, offs_k, M, K, R, stride_um, stride_ak, stride_ar, scale,
                      RP, L_KIND, INTERPRET)
    dx = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
    store_out(dx, acc, m_ok[:, None] & (offs_k < K)[None, :], Y_BF16, INTERPRET)


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


# GPU configs (H100/A100 class), each in compile_specs() so the compile gate checks it under the
# pinned triton and the GPU machine's (`python -m qlora_kernels compile-check --kernels qlora_`).
# "narrow" configs serve the register-hungrier variants: fp32 activations or LoRA weights (tf32x3 =
# three dots) and weight layouts that gather a scale per element (K % blocksize != 0, odd K).
# The dequantized [BN, BK] tile lives in registers next to the accumulator: BK = 32 keeps sm_80's
# mma.sync forward under 255 registers with no spills (BK = 64 spills there). sm_90 (wgmma, whose
# accumulator takes fewer registers) launches SM90_CONFIGS' "large" instead.
GPU_CONFIGS = {
    "large": GemmConfig(128, 128, 32, num_warps=8, num_stages=3),
    "medium": GemmConfig(64, 128, 32, num_warps=8, num_stages=3),
    "narrow_large": GemmConfig(128, 64, 32, num_warps=8, num_stages=3),
    "narrow_medium": GemmConfig(64, 64, 32, num_warps=8, num_stages=2),
}
# dX: BN is the reduction (over W's rows) and BK the output width.
DX_GPU_CONFIGS = {
    "large": GemmConfig(128, 32, 128, num_warps=8, num_stages=3),
    "medium": GemmConfig(64, 32, 64, num_warps=4, num_stages=3),
    # 32-wide output tiles: 64 wide spilled on sm_80 under triton 3.6 (the GPU machine's) in the
    # blocks-crossing-rows layout; 64-row variants spilled on sm_80 under 3.7.
    "narrow_large": GemmConfig(128, 32, 32, num_warps=8, num_stages=3),
    "narrow_medium": GemmConfig(128, 32, 32, num_warps=8, num_stages=3),
}
# sm_90's "large" (M > 64, 16-bit operands), sized by `python bench/sass_budget.py --gemm`: a W
# tile is dequantized once per CTA and shared by its BM rows, and that work must issue in fewer
# clocks than the tile's wgmma takes, or the GEMM cannot keep up with a BF16 one. Per k-tile, in
# tensor-core clocks: forward 128x128x32 1.48x (1.91x when codes were gathered), 128x128x64 1.06x;
# dX 128x32x128 1.62x, 128x64x128 (2 stages) 1.10x; all at <= 128 registers, so two CTAs share an
# SM and one's dequantization overlaps the other's wgmma. Wider tiles issue less per weight but
# take 184-255 registers: one CTA per SM, nothing to overlap with. To be confirmed on an H100.
SM90_CONFIGS = {"large": GemmConfig(128, 128, 64, num_warps=8, num_stages=3)}
SM90_DX_CONFIGS = {"large": GemmConfig(128, 64, 128, num_warps=8, num_stages=2)}
# Interpreter: tiles >= 64 keep numpy fast (DESIGN.md section 4); one config only.
INTERPRET_CONFIG = GemmConfig(64, 64, 64)
LORA_DOWN_BM, LORA_DOWN_BL, LORA_DOWN_WARPS = 64, 64, 4
# Split reductions of the LoRA weight gradients (lora_grad_splits).
LORA_GRAD_PROGRAMS_PER_SM = 4
LORA_GRAD_MIN_ROWS = 4 * LORA_DOWN_BL
# _lora_epilogue_kernel: a memory-bound pass over Y (read once, written once).
LORA_EPILOGUE_BM, LORA_EPILOGUE_BN, LORA_EPILOGUE_WARPS = 64, 64, 8


def empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer of these launchers comes from here: tests swap in a NaN-filled one to
    prove each kernel writes every element it returns."""
    return torch.empty(shape, dtype=dtype, device=device)


def config_name(m: int, narrow: bool) -> str:
    return ("narrow_" if narrow else "") + ("large" if m > 64 else "medium")


def pick_config(m: int, x_dtype: torch.dtype, lora_dtype: torch.dtype, shape: Sequence[int], blocksize: int,
                dx: bool = False, cc_major: int = 8) -> GemmConfig:
    """The tile config for M rows; cc_major: the GPU's compute capability major (9: SM90_CONFIGS)."""
    if interpreting():
        return INTERPRET_CONFIG
    narrow = torch.float32 in (x_dtype, lora_dtype) or int(shape[1]) % blocksize != 0
    name = config_name(m, narrow)
    sm90 = SM90_DX_CONFIGS if dx else SM90_CONFIGS
    if cc_major >= 9 and name in sm90:
        return sm90[name]
    return (DX_GPU_CONFIGS if dx else GPU_CONFIGS)[name]


def lora_rank_pad(r: int) -> int:
    """r padded for tl.dot: a power of two, at least 16 (the minimum dot dimension)."""
    return max(16, triton.next_power_of_2(r))


# Triton 3.2 aborts the whole process ("LLVM ERROR: Failed to emit transfer from register to
# shared") compiling the paired nibble decode (tl.join + reshape) into a tf32x3 dot, i.e. for fp32
# activations; 3.3+ compile it. There fp32 takes the per-nibble path, which 3.2 compiles.
PAIRED_FP32_OK = triton_version() >= (3, 3)


def paired_decode(k: int, x_dtype: torch.dtype) -> bool:
    """PAIRED of dequant_tile for W with K columns feeding dots of x_dtype operands."""
    return k % 2 == 0 and (x_dtype != torch.float32 or PAIRED_FP32_OK)


def weight_layout(shape: Sequence[int], blocksize: int, bk: int, x_dtype: torch.dtype) -> dict:
    """Constexprs of dequant_tile for W [N, K] read in tiles BK wide, for x_dtype activations."""
    k = int(shape[1])
    return {
        "BLOCKSIZE": blocksize,
        "NSB": max(1, bk // blocksize),
        "PAIRED": paired_decode(k, x_dtype),
        "ALIGNED": k % blocksize == 0,
    }


def weight_args(packed, absmax, nested_absmax, nested_code, offset, quant_type):
    """(packed, absmax, nested_absmax, nested_code, offset [1] fp32, code) pointers; unused ones
    alias a real tensor so every pointer argument is valid."""
    code = get_code(quant_type, packed.device)
    nested = nested_absmax is not None
    return (
        packed.reshape(-1).view(torch.uint8),
        absmax.contiguous(),
        nested_absmax.contiguous() if nested else code,
        nested_code.float().contiguous() if nested else code,
        offset.reshape(1).float() if nested else code,
        code,
    )


def _check_inputs(x, lora_A, lora_B, shape):
    n, k = int(shape[0]), int(shape[1])
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if lora_A.shape[1] != k or lora_B.shape[0] != n or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not fit W {n}x{k}")
    if lora_A.shape[0] > 128:
        raise ValueError(f"LoRA rank {lora_A.shape[0]} > 128 is not supported by the Triton kernels")


def lora_down(p: torch.Tensor, q: torch.Tensor, kind: int, splits: int = 1) -> torch.Tensor:
    """fp32 [M, r] = p [M, L] @ q [L, r] (either may be a strided view). The L reduction is cut
    into up to `splits` parts summed afterwards by torch (deterministic, unlike atomics)."""
    m, l = p.shape
    r = q.shape[1]
    per = triton.cdiv(triton.cdiv(max(l, 1), max(1, splits)), LORA_DOWN_BL) * LORA_DOWN_BL
    splits = max(1, triton.cdiv(l, per))
    c = empty((splits, m, r), torch.float32, p.device)
    _lora_down_kernel[(triton.cdiv(m, LORA_DOWN_BM), splits)](
        p, q, c, m, l, r, per, p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        BM=LORA_DOWN_BM, BL=LORA_DOWN_BL, RP=lora_rank_pad(r), KIND=kind, INTERPRET=interpreting(),
        num_warps=LORA_DOWN_WARPS,
    )
    return c[0] if splits == 1 else c.sum(0)


def lora_grad_splits(out_rows: int, l: int, device: torch.device) -> int:
    """Parts of the M-row reduction of dA^T [K, r] / dB [N, r]: their cdiv(K or N, 64) programs
    alone leave most SMs idle, so the rows are split for LORA_GRAD_PROGRAMS_PER_SM programs per
    SM, never into parts under LORA_GRAD_MIN_ROWS rows. 1 off the GPU."""
    if device.type != "cuda":
        return 1
    want = triton.cdiv(LORA_GRAD_PROGRAMS_PER_SM * sm_count(device), triton.cdiv(out_rows, LORA_DOWN_BM))
    return max(1, min(want, l // LORA_GRAD_MIN_ROWS))


def lora_weight_grads(grad_out, x_lora, t, u, lora_A, lora_B, scale):
    """(dA = s * U^T @ X_lora [r, K] like lora_A, dB = s * dY^T @ T [N, r] like lora_B): operands
    in lora_A's dtype, fp32 accumulation, s applied to the small factor in fp32 first.

    When the activations already have that dtype, cuBLAS runs them. Otherwise (fp32 adapters on
    bf16 activations, QLoRALinear's default) _lora_down_kernel reads X and dY as they are and
    converts tiles in registers: a torch matmul would first write fp32 copies of both, two
    [M, K]/[M, N] tensors twice the size of the activations, per layer and step."""
    ldt = lora_A.dtype
    if x_lora.dtype == ldt and grad_out.dtype == ldt:
        da = torch.matmul((u * scale).t().to(ldt), x_lora)
        db = torch.matmul(grad_out.t(), (t * scale).to(ldt))
        return da, db.to(lora_B.dtype)
    kind, m, dev = _KIND_OF[ldt], grad_out.shape[0], grad_out.device
    n, k = grad_out.shape[1], x_lora.shape[1]
    da_t = lora_down(x_lora.t(), u * scale, kind, lora_grad_splits(k, m, dev))  # dA^T = X^T @ (s U)
    db = lora_down(grad_out.t(), t * scale, kind, lora_grad_splits(n, m, dev))
    return da_t.t().contiguous().to(ldt), db.to(lora_B.dtype)


def lora_epilogue(y, t, b_t, scale, bias=None, accumulate=True) -> torch.Tensor:
    """y [M, N] += s * t [M, r] @ b_t [r, N] (+ bias) in place (accumulate=False: y = ...), in fp32
    with one rounding, b_t's dtype as the LoRA operand kind: b_t is B^T for Y, A itself for dX."""
    m, n = y.shape
    r = t.shape[1]
    grid = (triton.cdiv(m, LORA_EPILOGUE_BM), triton.cdiv(n, LORA_EPILOGUE_BN))
    _lora_epilogue_kernel[grid](
        y, t, b_t, bias if bias is not None else y,
        m, n, r, float(scale), y.stride(0), t.stride(0), b_t.stride(1), b_t.stride(0),
        BM=LORA_EPILOGUE_BM, BN=LORA_EPILOGUE_BN, RP=lora_rank_pad(r), L_KIND=_KIND_OF[b_t.dtype],
        HAS_LORA=True, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, Y_BF16=y.dtype == torch.bfloat16,
        INTERPRET=interpreting(), num_warps=LORA_EPILOGUE_WARPS, enable_fp_fusion=False,
    )
    return y


def dequantized_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype):
    """dequant(W) [N, K] in `dtype` through the op (so the fastest dequantize backend runs it)."""
    return torch.ops.qlora.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                           quant_type, list(shape), dtype)


def fwd_gemm(x, t, packed_args, blocksize, shape, lora_B, scale, bias, cfg: Optional[GemmConfig] = None):
    """Y = X @ W^T + s*T @ B^T + bias with the tiled kernel."""
    m = x.shape[0]
    n, k = int(shape[0]), int(shape[1])
    cfg = cfg or pick_config(m, x.dtype, lora_B.dtype, shape, blocksize, cc_major=cc_major(x.device))
    y = empty((m, n), x.dtype, x.device)
    has_lora = t is not None
    grid = (triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN),)
    _fwd_kernel[grid](
        x, *packed_args, t if has_lora else x, lora_B, bias if bias is not None else x, y,
        m, n, k, lora_B.shape[1], float(scale),
        x.stride(0), x.stride(1), t.stride(0) if has_lora else 0, lora_B.stride(0), lora_B.stride(1), y.stride(0),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, RP=lora_rank_pad(lora_B.shape[1]),
        NESTED=packed_args[2] is not packed_args[5], **weight_layout(shape, blocksize, cfg.BK, x.dtype),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        X_KIND=_KIND_OF[x.dtype], L_KIND=_KIND_OF[lora_B.dtype], Y_BF16=x.dtype == torch.bfloat16,
        INTERPRET=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return y


def qlora_linear_fwd(
    x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
    lora_A, lora_B, scale, bias,
):
    _check_inputs(x, lora_A, lora_B, shape)
    bias = bias.contiguous() if bias is not None else None  # the kernels index bias densely
    if x.shape[0] == 0:  # a grid of zero programs is not launchable
        return x.new_empty((0, int(shape[0]))), x.new_empty((0, lora_A.shape[0]), dtype=torch.float32)
    strategy = choose_strategy(x.shape[0], x.device)
    if x.shape[0] <= SMALL_M and strategy == "fused":
        from .qlora_linear_small_m import small_m_fwd

        args = weight_args(packed, absmax, nested_absmax, nested_code, offset, quant_type)
        return small_m_fwd(x, x_lora, lora_A, args, blocksize, shape, lora_B, scale, bias)  # T in the same launch
    t = lora_down(x if x_lora is None else x_lora, lora_A.t(), _KIND_OF[lora_A.dtype])
    if strategy == "dequant_matmul":
        # Y = X @ W^T by torch (cuBLAS on a GPU) on a dequantized copy of W, then the fused
        # forward's epilogue: the LoRA term and bias in fp32 with the same operands as the kernels.
        w = dequantized_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
                               x.dtype)
        y = lora_epilogue(torch.mm(x, w.t()), t, lora_B.t(), scale, bias)
        return y, t
    args = weight_args(packed, absmax, nested_absmax, nested_code, offset, quant_type)
    return fwd_gemm(x, t, args, blocksize, shape, lora_B, scale, bias), t


SMALL_M = 16


def dx_gemm(dy, u, packed_args, blocksize, shape, lora_A, scale, out_dtype, cfg: Optional[GemmConfig] = None):
    m = dy.shape[0]
    n, k = int(shape[0]), int(shape[1])
    cfg = cfg or pick_config(m, dy.dtype, lora_A.dtype, shape, blocksize, dx=True, cc_major=cc_major(dy.device))
    dx = empty((m, k), out_dtype, dy.device)
    has_lora = u is not None
    grid = (triton.cdiv(m, cfg.BM) * triton.cdiv(k, cfg.BK),)
    _dx_kernel[grid](
        dy, *packed_args, u if has_lora else dy, lora_A, dx,
        m, n, k, lora_A.shape[0], float(scale),
        dy.stride(0), dy.stride(1), u.stride(0) if has_lora else 0, lora_A.stride(0), lora_A.stride(1), dx.stride(0),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, RP=lora_rank_pad(lora_A.shape[0]),
        NESTED=packed_args[2] is not packed_args[5], **weight_layout(shape, blocksize, cfg.BK, dy.dtype),
        HAS_LORA=has_lora, X_KIND=_KIND_OF[dy.dtype], L_KIND=_KIND_OF[lora_A.dtype],
        Y_BF16=out_dtype == torch.bfloat16, INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return dx


def qlora_linear_bwd(
    grad_out, x_lora, t, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
    lora_A, lora_B, scale, compute_dx, lora_dx,
):
    _check_inputs(x_lora, lora_A, lora_B, shape)
    if grad_out.shape[0] == 0:
        return x_lora.new_empty((0, int(shape[1]))), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    u = lora_down(grad_out, lora_B, _KIND_OF[lora_A.dtype])  # U = dY @ B, fp32 [M, r]
    if not compute_dx:
        dx = x_lora.new_empty((0, int(shape[1])))
    elif choose_strategy(grad_out.shape[0], grad_out.device) == "dequant_matmul":
        w = dequantized_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
                               grad_out.dtype)
        dx = torch.mm(grad_out, w)
        if lora_dx:  # + s * U @ A
            lora_epilogue(dx, u, lora_A, scale)
        dx = dx.to(x_lora.dtype)
    else:
        args = weight_args(packed, absmax, nested_absmax, nested_code, offset, quant_type)
        dx = dx_gemm(grad_out, u if lora_dx else None, args, blocksize, shape, lora_A, scale, x_lora.dtype)
    da, db = lora_weight_grads(grad_out, x_lora, t, u, lora_A, lora_B, scale)
    return dx, da, db


def lora_input_grad(grad_out, lora_A, lora_B, scale, dtype):
    """The op lora_input_grad: s * (dY @ B) @ A [M, K] in `dtype`, U = dY @ B in fp32 and the
    product accumulated in fp32 (lora_A's dtype as operands), written once, no fp32 copies."""
    if grad_out.dim() != 2 or lora_B.shape[0] != grad_out.shape[1] or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)}, lora_A {tuple(lora_A.shape)} and lora_B "
                         f"{tuple(lora_B.shape)} do not chain")
    m, k = grad_out.shape[0], lora_A.shape[1]
    if m == 0:
        return grad_out.new_empty((0, k), dtype=dtype)
    u = lora_down(grad_out, lora_B, _KIND_OF[lora_A.dtype])
    return lora_epilogue(empty((m, k), dtype, grad_out.device), u, lora_A, scale, accumulate=False)


IMPLS = {"qlora_linear_fwd": qlora_linear_fwd, "qlora_linear_bwd": qlora_linear_bwd,
         "lora_input_grad": lora_input_grad}


# Single-byte global loads allowed where the packed weight loads in vectors (the u8 double-quantized
# scales of a tile's rows: the vectorized decode has 2-3, a byte-at-a-time one 27-40).
GEMM_MAX_BYTE_LOADS = 8
# The int arguments that a real model's launch makes multiples of 16 or 1, per kernel.
_REAL_SHAPE_INTS = {
    "qlora_fwd": (("N", "K", "stride_xm", "stride_ym"), ("stride_xk", "stride_br")),
    "qlora_dx": (("N", "K", "stride_dym", "stride_ar", "stride_dxm"), ("stride_dyn", "stride_ak")),
    "qlora_fwd_small_m": (("N", "K", "T_CHUNK", "stride_xm", "stride_xlm", "stride_ar", "stride_ym"),
                          ("stride_xk", "stride_xlk", "stride_ak", "stride_br")),
}


def real_shape_variant(spec: KernelSpec) -> KernelSpec:
    """A GEMM/GEMV spec as Triton specializes it for a model's shapes (N, K and row strides
    multiples of 16, unit inner strides), with the packed weight required to load in vectors."""
    div16, ones = _REAL_SHAPE_INTS[spec.name.split("[", 1)[0]]
    return launch_variant(spec, div16, ones, max_byte_loads=GEMM_MAX_BYTE_LOADS)


def compile_specs() -> list[KernelSpec]:
    """Every tile config of the two GEMM kernels for each activation/LoRA dtype pair, in the usual
    weight layout (double-quantized, K a multiple of the blocksize), plus one spec per other layout
    path (blocks crossing rows; odd K) and per blocksize regime (NSB) of dequant_tile; each usual-
    layout spec also as it runs on a real model's shapes (real_shape_variant)."""
    specs: list[KernelSpec] = []
    w_sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nabsmax_ptr": "*fp32", "ncode_ptr": "*fp32",
             "offset_ptr": "*fp32", "code_ptr": "*fp32"}

    def fwd_spec(cfg_name, cfg, xdt, ldt, blocksize, paired, aligned, archs=None):
        xt, lt = _TYPE_NAME[xdt], _TYPE_NAME[ldt]
        return KernelSpec(
            name=f"qlora_fwd[{cfg_name},x={xt},lora={lt},bs={blocksize},paired={paired},aligned={aligned}]",
            fn=_fwd_kernel,
            signature={"x_ptr": f"*{xt}", **w_sig, "t_ptr": "*fp32", "b_ptr": f"*{lt}", "bias_ptr": f"*{xt}",
                       "y_ptr": f"*{xt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scale": "fp32",
                       "stride_xm": "i32", "stride_xk": "i32", "stride_tm": "i32", "stride_bn": "i32",
                       "stride_br": "i32", "stride_ym": "i32"},
            constexprs={"BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK, "GROUP_M": cfg.GROUP_M, "RP": 16,
                        "BLOCKSIZE": blocksize, "NSB": max(1, cfg.BK // blocksize), "NESTED": True,
                        "PAIRED": paired, "ALIGNED": aligned, "HAS_LORA": True, "HAS_BIAS": True,
                        "X_KIND": _KIND_OF[xdt], "L_KIND": _KIND_OF[ldt], "Y_BF16": xdt == torch.bfloat16,
                        "INTERPRET": False},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, needs_tensor_cores=True, exact_fp32=True, archs=archs,
        )

    def dx_spec(cfg_name, cfg, xdt, ldt, blocksize, paired, aligned, archs=None):
        xt, lt = _TYPE_NAME[xdt], _TYPE_NAME[ldt]
        return KernelSpec(
            name=f"qlora_dx[{cfg_name},x={xt},lora={lt},bs={blocksize},paired={paired},aligned={aligned}]",
            fn=_dx_kernel,
            signature={"dy_ptr": f"*{xt}", **w_sig, "u_ptr": "*fp32", "a_ptr": f"*{lt}", "dx_ptr": f"*{xt}",
                       "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scale": "fp32",
                       "stride_dym": "i32", "stride_dyn": "i32", "stride_um": "i32", "stride_ar": "i32",
                       "stride_ak": "i32", "stride_dxm": "i32"},
            constexprs={"BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK, "GROUP_M": cfg.GROUP_M, "RP": 16,
                        "BLOCKSIZE": blocksize, "NSB": max(1, cfg.BK // blocksize), "NESTED": True,
                        "PAIRED": paired, "ALIGNED": aligned, "HAS_LORA": True,
                        "X_KIND": _KIND_OF[xdt], "L_KIND": _KIND_OF[ldt], "Y_BF16": xdt == torch.bfloat16,
                        "INTERPRET": False},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, needs_tensor_cores=True, exact_fp32=True, archs=archs,
        )

    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    # (x dtype, LoRA dtype, blocksize, PAIRED, ALIGNED) that pick_config sends to each config kind.
    variants = {
        False: [(bf, bf, 64, True, True), (f16, f16, 64, True, True), (bf, bf, 32, True, True),
                (bf, bf, 256, True, True)],
        True: [(f32, f32, 64, True, True), (f32, f32, 32, True, True), (f32, f32, 64, False, False),
               (bf, f32, 64, True, True), (bf, bf, 64, True, False), (bf, f32, 64, True, False),
               (bf, bf, 64, False, False)],
    }
    # Configs sm_90 replaces (SM90_CONFIGS) are compiled for the older chips only, and the
    # replacements for sm_90 only.
    pre90 = (80, 86, 89)
    for make, configs, sm90 in ((fwd_spec, GPU_CONFIGS, SM90_CONFIGS), (dx_spec, DX_GPU_CONFIGS, SM90_DX_CONFIGS)):
        kinds = [(name, cfg, pre90 if name in sm90 else None) for name, cfg in configs.items()]
        kinds += [(f"{name}_sm90", cfg, (90,)) for name, cfg in sm90.items()]
        for cfg_name, cfg, archs in kinds:
            for xdt, ldt, blocksize, paired, aligned in variants[cfg_name.startswith("narrow")]:
                # As the launchers decide it (paired_decode: even K, and not fp32 on Triton 3.2).
                paired = paired and paired_decode(2, xdt)
                spec = make(cfg_name, cfg, xdt, ldt, blocksize, paired, aligned, archs)
                specs.append(spec)
                if paired and aligned:
                    specs.append(real_shape_variant(spec))
    for ldt in (torch.bfloat16, torch.float32, torch.float16):
        lt = _TYPE_NAME[ldt]
        for pt in ("bf16", "fp32", "fp16"):
            down = KernelSpec(
                name=f"qlora_lora_down[p={pt},q={lt}]", fn=_lora_down_kernel,
                signature={"p_ptr": f"*{pt}", "q_ptr": f"*{lt}", "c_ptr": "*fp32", "M": "i32", "L": "i32",
                           "R": "i32", "L_PER_SPLIT": "i32", "stride_pm": "i32", "stride_pl": "i32",
                           "stride_ql": "i32", "stride_qr": "i32"},
                constexprs={"BM": LORA_DOWN_BM, "BL": LORA_DOWN_BL, "RP": 16, "KIND": _KIND_OF[ldt], "INTERPRET": False},
                num_warps=LORA_DOWN_WARPS, needs_tensor_cores=True,
            )
            specs.append(down)
            if pt != lt:
                # As the LoRA weight gradients launch it (lora_weight_grads): P = X^T or dY^T, a
                # transposed view (unit row stride), Q = s * U or s * T, fp32 and contiguous.
                specs.append(dataclasses.replace(launch_variant(
                    down, ("M", "L_PER_SPLIT", "stride_pl"), ("stride_pm", "stride_qr")),
                    name=f"qlora_lora_down[p={pt}^T,q={lt}]@ints16",
                    signature={**down.signature, "q_ptr": "*fp32"}))
        for xt, accumulate in itertools.product(("bf16", "fp16", "fp32"), (True, False)):
            specs.append(KernelSpec(
                name=f"qlora_lora_epilogue[y={xt},lora={lt},{'add' if accumulate else 'set'}]",
                fn=_lora_epilogue_kernel,
                signature={"y_ptr": f"*{xt}", "t_ptr": "*fp32", "b_ptr": f"*{lt}", "bias_ptr": f"*{xt}", "M": "i32",
                           "N": "i32", "R": "i32", "scale": "fp32", "stride_ym": "i32", "stride_tm": "i32",
                           "stride_bn": "i32", "stride_br": "i32"},
                constexprs={"BM": LORA_EPILOGUE_BM, "BN": LORA_EPILOGUE_BN, "RP": 16, "L_KIND": _KIND_OF[ldt],
                            "HAS_LORA": True, "HAS_BIAS": accumulate, "ACCUMULATE": accumulate,
                            "Y_BF16": xt == "bf16", "INTERPRET": False},
                num_warps=LORA_EPILOGUE_WARPS, needs_tensor_cores=True, exact_fp32=True,
            ))
    return specs
