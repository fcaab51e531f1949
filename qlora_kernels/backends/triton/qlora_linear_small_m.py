"""Triton kernel: the QLoRA linear forward for small M (decode, M <= 16) in ONE launch. Spec:
reference.qlora_linear_forward. Used by qlora_linear.qlora_linear_fwd when M <= SMALL_M; returns
(Y, T) as that op does.

At small M the packed weight is nearly all the bytes (4.127 bits per weight against 16 bits per
activation element times M), and a decode step's GPU time is a few microseconds, so a second or
third launch (T = X A^T, zeroing a split-K buffer, a final cast) would cost as much as the weight
stream itself. One grid therefore holds two kinds of programs:

  T items    (pids 0 .. N_T-1): T_j = X_lora[:, chunk j] @ A[:, chunk j]^T over a K chunk, stored
             as an fp32 partial. The last T item to finish (a counter) sums the partials in chunk
             order into T [M, r] (returned: the backward saves it) and raises the "T ready" count.
  GEMV items (the rest): a BN-wide slice of the outputs for all rows and a 1/SPLIT_K share of the
             K range, streaming that part of W once. With SPLIT_K > 1 each stores its fp32 partial
             and the last of a tile's splits to finish (a per-tile counter) sums the partials in
             split order. The program that finishes a tile waits for T, adds s * T @ B^T and the
             bias in fp32 and rounds once to the output dtype.

Sums run in a fixed order whoever finishes last, so the result is deterministic (no fp32 atomics
on data) for a given SPLIT_K. The counters (sync_counters) return to zero by the end of every
launch: the last T item resets its counter, the last split of a tile resets the tile's, and each
tile's finisher takes one off the "T ready" count, which the last T item set to the number of
tiles. Waiting cannot deadlock: only tile finishers wait, for T items, which never wait and have
lower program ids, so the GPU dispatched them first (the in-order dispatch CUB's single-pass scan
also relies on); the interpreter runs programs one after another in pid order.

What a GEMV item does with its share of W:
  M <= 2 (DECODE = M, where decode_eligible allows): _decode_sums, no tensor cores. A decode step
      touches each weight once, so the instructions spent per weight, not the bytes, can bound it
      (bench/sass_budget.py): on sm_90, 3.6 per weight at M = 1 (one shift, one shuffle that looks
      the code up exactly, one fma; a scale per 8 weights) and 5.2 at M = 2, against about 5.0 an
      H100 can issue at full HBM bandwidth. The tensor-core tiles spend 8.0 (15.2 with gathered
      codes), which would cap M = 1 and 2 at 62% of an H100's bandwidth (33% before).
  M = 3..16: the tensor-core tiles. tl.dot needs 16 rows, so M is padded to 16 with masked loads;
      the cost per weight does not grow with M, so from M = 3 the tiles spend less than the decode
      path would (an fma per weight and row).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch_counters import launch_counters
from . import qlora_linear
from .._device import sm_count
from ._common import code_table, word_codes
from ._utils import KernelSpec, interpreting
from .qlora_linear import (
    _KIND_OF,
    _TYPE_NAME,
    load_scale,
    lora_and_bias,
    lora_down_range,
    lora_rank_pad,
    paired_decode,
    store_out,
    weight_layout,
    x_wt_tiles,
)

BM = 16
# K columns per step of a T item: its [16, T_BK] x [T_BK, RP] dot (tf32x3 for fp32 adapters, three
# dots) sets the kernel's register count when it is the larger branch.
T_BK = 32
# Counter slots of sync_counters: T items finished, "T ready" count, then one per N tile.
SYNC_T_DONE, SYNC_T_READY, SYNC_TILES = 0, 1, 2


@triton.jit
def _t_item(
    j, xl_ptr, a_ptr, tpart_ptr, t_ptr, sync_ptr, M, K, R, T_CHUNK, N_T, n_tiles,
    stride_xlm, stride_xlk, stride_ar, stride_ak,
    BM: tl.constexpr, T_BK: tl.constexpr, RP: tl.constexpr, L_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    """T item j: the fp32 partial X_lora[:, chunk] @ A[:, chunk]^T; the last one sums them into T."""
    offs_m = tl.arange(0, BM)
    offs_r = tl.arange(0, RP)
    m_ok = offs_m < M
    r_ok = offs_r < R
    k_lo = j * T_CHUNK
    # A^T [K, R] is A read with its strides swapped.
    acc = lora_down_range(xl_ptr, a_ptr, offs_m, M, R, k_lo, tl.minimum(K, k_lo + T_CHUNK),
                          stride_xlm, stride_xlk, stride_ak, stride_ar, BM, T_BK, RP, L_KIND, INTERPRET)
    part = offs_m[:, None] * RP + offs_r[None, :]  # partial j is [M, RP] at tpart + j * M * RP
    tl.store(tpart_ptr + j.to(tl.int64) * M * RP + part, acc, mask=m_ok[:, None])
    tl.debug_barrier()  # every thread's partial is stored before the release below
    if tl.atomic_add(sync_ptr + 0, 1, sem="acq_rel") == N_T - 1:  # SYNC_T_DONE
        tl.atomic_xchg(sync_ptr + 0, 0, sem="relaxed")
        t = tl.zeros((BM, RP), dtype=tl.float32)
        for i in range(0, N_T):
            # .cg: read at L2, where the other programs' stores are, not a stale L1 line.
            t += tl.load(tpart_ptr + i * M * RP + part, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
        tl.store(t_ptr + offs_m[:, None] * R + offs_r[None, :], t, mask=m_ok[:, None] & r_ok[None, :])
        tl.debug_barrier()
        tl.atomic_xchg(sync_ptr + 1, n_tiles, sem="release")  # SYNC_T_READY


@triton.jit
def _finish_tile(
    acc, offs_m, offs_n, t_ptr, b_ptr, bias_ptr, y_ptr, sync_ptr, M, N, R, scale, stride_bn, stride_br, stride_ym,
    RP: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, L_KIND: tl.constexpr,
    Y_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Wait for T, add the LoRA term and bias to a tile's full fp32 sum, store it rounded once."""
    if HAS_LORA:
        ready = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")  # SYNC_T_READY
        while ready <= 0:
            ready = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        tl.debug_barrier()
    acc = lora_and_bias(acc, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, R, R, stride_bn, stride_br,
                        scale, RP, L_KIND, HAS_LORA, HAS_BIAS, INTERPRET)
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    store_out(y, acc, (offs_m < M)[:, None] & (offs_n < N)[None, :], Y_BF16, INTERPRET)
    if HAS_LORA:
        tl.atomic_add(sync_ptr + 1, -1, sem="relaxed")  # this tile is done with T


@triton.jit
def _unpack_pairs(pairs, X_KIND: tl.constexpr):
    """(first, second) fp32 elements of int32 words each holding two bf16 (X_KIND 1) or fp16 values,
    the first in the low half (little-endian). bf16 widens by moving its bits up, exactly."""
    if X_KIND == 1:
        first = (pairs << 16).to(tl.float32, bitcast=True)
        second = (pairs & -65536).to(tl.float32, bitcast=True)
    else:
        first = (pairs & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        second = ((pairs >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return first, second


@triton.jit
def _decode_sums(
    pid_n, pid_k, x_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr, N, K,
    stride_xm, stride_xk,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr, EVEN_K: tl.constexpr, X_PAIRS: tl.constexpr, X_KIND: tl.constexpr, MB: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """[BM, BN] fp32: rows r < MB = x[r, split's K range] @ dequant(W)[tile rows]^T, other rows 0.
    M = MB (1 or 2), K a multiple of 32 and of the blocksize, packed 4-byte aligned (small_m_fwd
    checks).

    No tensor cores: at M = 1 the dot fills 1/16 of them, and its operands cost more to build than
    the products. Each thread reads 32-bit words of packed bytes, looks the 8 codes up exactly in
    fp32 (_common.word_codes) and adds code * x by fma; each word's sum is scaled by its block's absmax
    once, into a [BN, BK / 8] accumulator per row, summed over words at the end. Instructions per
    weight (bench/sass_budget.py): one shift (7 of 8) and one shuffle, then per row one fma and 1/8
    for the scale."""
    BKW: tl.constexpr = BK // 8
    WPB: tl.constexpr = BLOCKSIZE // 8  # words per block
    NSB: tl.constexpr = BK // BLOCKSIZE if BK > BLOCKSIZE else 1
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1)  # the tail tile re-reads row N - 1 (never stored): no masks
    offs_w = tl.arange(0, BKW)
    kw = (K // 32) * 4  # words per row, written so the compiler sees a multiple of 4 (16-byte loads)
    words_ptr = (packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
                 + (rows.to(tl.int64) * kw)[:, None] + offs_w[None, :])
    if X_PAIRS:  # 16-bit x, unit stride, 4-byte aligned: [BKW, 4] words of two elements each
        xs = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs_w[:, None] * 4 + tl.arange(0, 4)[None, :]
    else:
        xs = x_ptr + (offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]) * stride_xk  # [BKW, 8]
    table = code_table(code_ptr, offs_n[:, None] + offs_w[None, :], INTERPRET)
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    blk_row = rows * (K // BLOCKSIZE)  # int32: small_m_fwd checks that the block count fits
    all_rows = tl.full((BN,), 1, tl.int1)  # rows are clamped: every scale load is in bounds
    acc0 = tl.zeros((BN, BKW), dtype=tl.float32)
    acc1 = tl.zeros((BN, BKW), dtype=tl.float32)  # row 1 (MB = 2)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        if EVEN_K:
            words = tl.load(words_ptr + k0 // 8)
        else:
            w_ok = (k0 // 8 + offs_w) < kw
            words = tl.load(words_ptr + k0 // 8, mask=w_ok[None, :], other=0)
        c0, c1, c2, c3, c4, c5, c6, c7 = word_codes(words, table, code_ptr, INTERPRET)
        blk = blk_row + k0 // BLOCKSIZE
        s = load_scale(absmax_ptr, nabsmax_ptr, ncode_ptr, offset, blk, all_rows, NESTED)
        s_w = tl.broadcast_to(s[:, None], (BN, BKW))
        for j in tl.static_range(1, NSB):  # BK spans NSB blocks: word w is in block w // WPB
            s_j = load_scale(absmax_ptr, nabsmax_ptr, ncode_ptr, offset, blk + j,
                             all_rows & (k0 + j * BLOCKSIZE < K), NESTED)
            s_w = tl.where((offs_w >= j * WPB)[None, :], s_j[:, None], s_w)
        for r in tl.static_range(MB):
            # Row r's x in pairs (X_PAIRS: the element offset halves) or elements.
            x_at = (r * stride_xm + k0) // 2 if X_PAIRS else r * stride_xm + k0 * stride_xk
            if EVEN_K:
                xv = tl.load(xs + x_at)
            else:
                xv = tl.load(xs + x_at, mask=w_ok[:, None], other=0)
            # x[8w + t] for t = 0..7, each [BKW]: split the last axis of [BKW, 2, 2, 2] three times
            # (as pairs, [BKW, 2, 2] of (even, odd) elements).
            if X_PAIRS:
                x_even, x_odd = _unpack_pairs(xv, X_KIND)
                x_even = tl.reshape(x_even, (BKW, 2, 2))
                x_odd = tl.reshape(x_odd, (BKW, 2, 2))
            else:
                x_even, x_odd = tl.split(tl.reshape(xv.to(tl.float32), (BKW, 2, 2, 2)))
            x_04, x_26 = tl.split(x_even)
            x_15, x_37 = tl.split(x_odd)
            x0, x4 = tl.split(x_04)
            x2, x6 = tl.split(x_26)
            x1, x5 = tl.split(x_15)
            x3, x7 = tl.split(x_37)
            part = c0 * x0[None, :]
            part = tl.fma(c1, x1[None, :], part)
            part = tl.fma(c2, x2[None, :], part)
            part = tl.fma(c3, x3[None, :], part)
            part = tl.fma(c4, x4[None, :], part)
            part = tl.fma(c5, x5[None, :], part)
            part = tl.fma(c6, x6[None, :], part)
            part = tl.fma(c7, x7[None, :], part)
            if r == 0:
                acc0 = tl.fma(part, s_w, acc0)
            else:
                acc1 = tl.fma(part, s_w, acc1)
    rows_out = tl.arange(0, BM)[:, None]
    out = tl.where(rows_out == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
    if MB == 2:
        out = tl.where(rows_out == 1, tl.sum(acc1, axis=1)[None, :], out)
    return out


@triton.jit
def _small_m_kernel(
    x_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr,
    xl_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, t_ptr, tpart_ptr, ypart_ptr, sync_ptr,
    M, N, K, R, scale, T_CHUNK, N_T,
    stride_xm, stride_xk, stride_xlm, stride_xlk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, RP: tl.constexpr,
    T_BK: tl.constexpr, BLOCKSIZE: tl.constexpr, NSB: tl.constexpr,
    NESTED: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DECODE: tl.constexpr, EVEN_K: tl.constexpr,
    X_PAIRS: tl.constexpr,
    X_KIND: tl.constexpr, L_KIND: tl.constexpr, B_KIND: tl.constexpr, Y_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Y [M <= BM, N] = X @ dequant(W)^T (+ s * T @ B^T) (+ bias), T = X_lora @ A^T written to t_ptr.
    Grid: N_T T items (HAS_LORA) then cdiv(N, BN) * SPLIT_K GEMV items (module doc). L_KIND: A's
    operand kind (T), B_KIND: B's (the epilogue), as the separate kernels of larger M use them."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BN)
    if HAS_LORA:
        if pid < N_T:
            _t_item(pid, xl_ptr, a_ptr, tpart_ptr, t_ptr, sync_ptr, M, K, R, T_CHUNK, N_T, n_tiles,
                    stride_xlm, stride_xlk, stride_ar, stride_ak, BM, T_BK, RP, L_KIND, INTERPRET)
        else:
            _gemv_item(pid - N_T, n_tiles, x_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr,
                       code_ptr, b_ptr, bias_ptr, y_ptr, t_ptr, ypart_ptr, sync_ptr, M, N, K, R, scale,
                       stride_xm, stride_xk, stride_bn, stride_br, stride_ym, BM, BN, BK, SPLIT_K, RP, BLOCKSIZE,
                       NSB, NESTED, PAIRED, ALIGNED, HAS_LORA, HAS_BIAS, DECODE, EVEN_K, X_PAIRS, X_KIND, B_KIND, Y_BF16,
                       INTERPRET)
    else:
        _gemv_item(pid, n_tiles, x_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr,
                   code_ptr, b_ptr, bias_ptr, y_ptr, t_ptr, ypart_ptr, sync_ptr, M, N, K, R, scale,
                   stride_xm, stride_xk, stride_bn, stride_br, stride_ym, BM, BN, BK, SPLIT_K, RP, BLOCKSIZE,
                   NSB, NESTED, PAIRED, ALIGNED, HAS_LORA, HAS_BIAS, DECODE, EVEN_K, X_PAIRS, X_KIND, B_KIND, Y_BF16,
                   INTERPRET)


@triton.jit
def _gemv_item(
    pid, n_tiles, x_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr,
    b_ptr, bias_ptr, y_ptr, t_ptr, ypart_ptr, sync_ptr, M, N, K, R, scale,
    stride_xm, stride_xk, stride_bn, stride_br, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, RP: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NSB: tl.constexpr,
    NESTED: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DECODE: tl.constexpr, EVEN_K: tl.constexpr,
    X_PAIRS: tl.constexpr,
    X_KIND: tl.constexpr, L_KIND: tl.constexpr, Y_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """GEMV item `pid`: tile pid % n_tiles of N, split pid // n_tiles of K; the tile's finisher
    (the only split, or the last to arrive) completes it."""
    pid_n = pid % n_tiles
    pid_k = pid // n_tiles
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    if DECODE:
        acc = _decode_sums(pid_n, pid_k, x_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr,
                           N, K, stride_xm, stride_xk, BM, BN, BK, SPLIT_K, BLOCKSIZE, NESTED, EVEN_K, X_PAIRS, X_KIND,
                           DECODE, INTERPRET)
    else:
        acc = x_wt_tiles(tl.zeros((BM, BN), dtype=tl.float32), x_ptr, offs_m, M, stride_xm, stride_xk, packed_ptr,
                         absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr, pid_n * BN, pid_k * BK, BK * SPLIT_K,
                         N, K, BN, BK, BLOCKSIZE, NSB, NESTED, PAIRED, ALIGNED, X_KIND, INTERPRET)
    if SPLIT_K == 1:
        _finish_tile(acc, offs_m, offs_n, t_ptr, b_ptr, bias_ptr, y_ptr, sync_ptr, M, N, R, scale, stride_bn,
                     stride_br, stride_ym, RP, HAS_LORA, HAS_BIAS, L_KIND, Y_BF16, INTERPRET)
    else:
        # Partial s of tile n is [M, BN] at ypart + (s * M) * NP + n * BN, NP = n_tiles * BN.
        np_ = n_tiles * BN
        part = offs_m[:, None] * np_ + offs_n[None, :]
        tl.store(ypart_ptr + pid_k.to(tl.int64) * M * np_ + part, acc, mask=m_ok[:, None])
        tl.debug_barrier()  # every thread's partial is stored before the release below
        tile_count = sync_ptr + 2 + pid_n  # SYNC_TILES
        if tl.atomic_add(tile_count, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.atomic_xchg(tile_count, 0, sem="relaxed")
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(0, SPLIT_K):
                acc += tl.load(ypart_ptr + s * M * np_ + part, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            _finish_tile(acc, offs_m, offs_n, t_ptr, b_ptr, bias_ptr, y_ptr, sync_ptr, M, N, R, scale, stride_bn,
                         stride_br, stride_ym, RP, HAS_LORA, HAS_BIAS, L_KIND, Y_BF16, INTERPRET)


@dataclass(frozen=True)
class SmallMConfig:
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 4


# The tensor-core tiles (M = 2..16; M = 1 takes DECODE_GPU_CONFIG): 64x64 weight tiles, 2 stages,
# 8.0 instructions per weight in the weight loop on sm_90 (bench/sass_budget.py's count; 32x64 with
# 4 stages: 10.9, most of it per-trip overhead spread over 16 weights per thread), 72 registers in
# the usual layout, no spills in any variant under triton 3.6 and 3.7. 128x64 spilled 4-24 B in the
# split-K, fp32 and no-LoRA variants. Blocks crossing rows (K not a multiple of the blocksize) decode
# two scales per row: with 4 stages that spilled on sm_90 once the T items joined the kernel, so
# they keep 32x64 with 3 stages.
GPU_CONFIG = SmallMConfig(BN=64, BK=64, num_warps=4, num_stages=2)
GPU_CONFIG_BLOCKS_CROSS_ROWS = SmallMConfig(BN=32, BK=64, num_warps=4, num_stages=3)
INTERPRET_CONFIG = SmallMConfig(BN=64, BK=64)
# The M = 1 path (_decode_sums): 256 rows x 128 columns per trip, 256 weights per thread, 128-168
# registers (the LoRA epilogue's tl.dot sets the top), little shared memory, so three or four
# programs fit an SM. Triton's pipeliner leaves these loads alone (nothing feeds a dot), so
# num_stages only matters to the epilogue; occupancy hides the loads' latency.
DECODE_GPU_CONFIG = SmallMConfig(BN=256, BK=128, num_warps=4, num_stages=1)
# M = 2: each code lookup serves both rows, so a weight costs one fma more (about 5 instructions).
# 256x128 reached 254 registers there; 128x128 stays near the M = 1 path's count.
DECODE_GPU_CONFIG_M2 = SmallMConfig(BN=128, BK=128, num_warps=4, num_stages=1)
DECODE_INTERPRET_CONFIG = SmallMConfig(BN=64, BK=64)
DECODE_MAX_M = 2
# Programs wanted in flight: enough per SM to keep loads outstanding while others dequantize.
PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 16
# T items: at least this many BK tiles of K each (about a GEMV item's bytes of A in fp32 at r=16),
# and at most MAX_T_ITEMS of them (the last one sums every partial).
T_CHUNK_MIN_TILES = 4
MAX_T_ITEMS = 32


def gpu_config(k: int, blocksize: int) -> SmallMConfig:
    """The GPU launch config for W with K columns."""
    return GPU_CONFIG if k % blocksize == 0 else GPU_CONFIG_BLOCKS_CROSS_ROWS


def pick_split_k(n: int, k: int, cfg: SmallMConfig, device: torch.device) -> int:
    """SPLIT_K for an [N, K] weight: 1 off the GPU, else enough K splits for PROGRAMS_PER_SM
    programs per SM. The split sums are deterministic (module doc), so this holds under
    torch.use_deterministic_algorithms too."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    n_tiles = triton.cdiv(n, cfg.BN)
    want = triton.cdiv(PROGRAMS_PER_SM * sms, n_tiles)
    k_tiles = triton.cdiv(k, cfg.BK)
    split = min(MAX_SPLIT_K, triton.next_power_of_2(want), max(1, k_tiles // 2))
    return max(1, split)


def t_chunk(k: int, bk: int) -> int:
    """K columns per T item: a multiple of BK, T_CHUNK_MIN_TILES tiles or more, MAX_T_ITEMS items at most."""
    return bk * max(T_CHUNK_MIN_TILES, triton.cdiv(triton.cdiv(k, bk), MAX_T_ITEMS))


def sync_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for one launch, slots SYNC_* (backends/launch_counters.py: per stream
    on a GPU, since the kernel leaves them zero). n_tiles: 0 when SPLIT_K == 1, which has no tile
    counts."""
    return launch_counters(device, SYNC_TILES + n_tiles)


_DECODE_PATH = [True]  # the innermost decode_path() setting


@contextlib.contextmanager
def decode_path(enabled: bool):
    """Within: launches that leave `decode` to small_m_fwd take the M = 1 path where it can run
    (True, the default) or the tensor-core tiles (False): the bench measures both side by side."""
    _DECODE_PATH.append(bool(enabled))
    try:
        yield
    finally:
        _DECODE_PATH.pop()


def decode_eligible(m: int, n: int, k: int, blocksize: int, packed: torch.Tensor) -> bool:
    """Whether _decode_sums can run: 1..DECODE_MAX_M rows, whole 32-bit words of packed bytes per
    row and per block (K a multiple of 32 and of the blocksize), the packed bytes 4-byte aligned,
    block indices within int32."""
    return (1 <= m <= DECODE_MAX_M and k % 32 == 0 and k % blocksize == 0 and packed.data_ptr() % 4 == 0
            and n * (k // blocksize) < 2**31)


def x_pairs(x: torch.Tensor) -> bool:
    """X_PAIRS of _decode_sums: x read as 32-bit words of two 16-bit elements (every row)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and x.stride(1) == 1 and x.data_ptr() % 4 == 0
            and (x.shape[0] == 1 or x.stride(0) % 2 == 0))


def small_m_fwd(x, x_lora, lora_A, packed_args, blocksize, shape, lora_B, scale, bias,
                split_k: Optional[int] = None, cfg: Optional[SmallMConfig] = None,
                t_chunk_cols: Optional[int] = None, decode: Optional[bool] = None):
    """(Y [M, N] in x's dtype, T = X_lora @ A^T fp32 [M, r]) for M <= 16 in one launch (module doc).
    lora_A None: no LoRA term (T is None). split_k / t_chunk_cols None: chosen from the shape and
    the GPU. decode: the decode path (_decode_sums, M <= 2) instead of the tensor-core tiles; None takes it
    wherever decode_eligible says it can run (unless decode_path(False) is in force), True insists
    (ValueError where it cannot)."""
    m = x.shape[0]
    if m > BM:
        raise ValueError(f"the small-M kernel takes M <= {BM}, got {m}")
    n, k = int(shape[0]), int(shape[1])
    eligible = decode_eligible(m, n, k, blocksize, packed_args[0])
    if decode and not eligible:
        raise ValueError(f"the decode path needs M <= {DECODE_MAX_M}, K a multiple of 32 and of the blocksize and "
                         f"4-byte aligned packed bytes; got M={m}, K={k}, blocksize={blocksize}, packed at "
                         f"{packed_args[0].data_ptr() % 4} mod 4")
    decode = eligible and _DECODE_PATH[-1] if decode is None else decode
    if decode:
        cfg = cfg or (DECODE_INTERPRET_CONFIG if interpreting() else DECODE_GPU_CONFIG if m == 1
                      else DECODE_GPU_CONFIG_M2)
    cfg = cfg or (INTERPRET_CONFIG if interpreting() else gpu_config(k, blocksize))
    split = split_k or pick_split_k(n, k, cfg, x.device)
    n_tiles = triton.cdiv(n, cfg.BN)
    has_lora = lora_A is not None
    r = lora_A.shape[0] if has_lora else 0
    rp = lora_rank_pad(max(r, 1))
    xl = x if x_lora is None else x_lora
    if has_lora:
        chunk = t_chunk_cols or t_chunk(k, cfg.BK)
        if chunk % cfg.BK:
            raise ValueError(f"t_chunk_cols must be a multiple of BK={cfg.BK}, got {chunk}")
        n_t = triton.cdiv(k, chunk)
        t = qlora_linear.empty((m, r), torch.float32, x.device)
        tpart = torch.empty((n_t, m, rp), dtype=torch.float32, device=x.device)
    else:
        chunk, n_t, t, tpart = cfg.BK, 0, None, x
    ypart = torch.empty((split, m, n_tiles * cfg.BN), dtype=torch.float32, device=x.device) if split > 1 else x
    sync = sync_counters(x.device, n_tiles if split > 1 else 0) if (has_lora or split > 1) else x
    y = qlora_linear.empty((m, n), x.dtype, x.device)
    _small_m_kernel[(n_t + n_tiles * split,)](
        x, *packed_args, xl, lora_A if has_lora else x, lora_B if has_lora else x,
        bias if bias is not None else x, y, t if has_lora else x, tpart, ypart, sync,
        m, n, k, r, float(scale), chunk, n_t,
        x.stride(0), x.stride(1), xl.stride(0), xl.stride(1),
        lora_A.stride(0) if has_lora else 0, lora_A.stride(1) if has_lora else 0,
        lora_B.stride(0) if has_lora else 0, lora_B.stride(1) if has_lora else 0, y.stride(0),
        BM=BM, BN=cfg.BN, BK=cfg.BK, SPLIT_K=split, RP=rp, T_BK=min(T_BK, cfg.BK),
        NESTED=packed_args[2] is not packed_args[5], **weight_layout(shape, blocksize, cfg.BK, x.dtype),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, DECODE=m if decode else 0, EVEN_K=k % cfg.BK == 0,
        X_PAIRS=decode and x_pairs(x),
        X_KIND=_KIND_OF[x.dtype], L_KIND=_KIND_OF[lora_A.dtype] if has_lora else _KIND_OF[x.dtype],
        B_KIND=_KIND_OF[lora_B.dtype] if has_lora else _KIND_OF[x.dtype],
        Y_BF16=x.dtype == torch.bfloat16, INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return y, t


IMPLS: dict = {}  # reached through qlora_linear.qlora_linear_fwd (M <= 16), not an op of its own


def compile_specs() -> list[KernelSpec]:
    """The GPU config for each activation/LoRA dtype pair and each SPLIT_K mode, in the usual weight
    layout (also as it runs on a model's shapes: qlora_linear.real_shape_variant), plus the other
    dequant_tile layout paths and the no-LoRA kernel (no T items, no wait). The tensor cores here
    run mma with 16 rows (wgmma needs 64): not required of a memory-bound kernel, so
    needs_tensor_cores stays False."""
    specs = []
    w_sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nabsmax_ptr": "*fp32", "ncode_ptr": "*fp32",
             "offset_ptr": "*fp32", "code_ptr": "*fp32"}
    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    # (x dtype, LoRA dtype or None, SPLIT_K, blocksize, PAIRED, ALIGNED, DECODE (rows; 0: tiles), EVEN_K)
    cases = []
    for xdt, ldt in [(bf, bf), (bf, f32), (f16, f16), (f32, f32)]:
        for split in (1, 4):
            cases.append((xdt, ldt, split, 64, True, True, 0, True))
            cases.append((xdt, ldt, split, 64, True, True, 1, True))
    for split in (1, 4):
        cases.append((bf, None, split, 64, True, True, 0, True))
        cases.append((bf, None, split, 64, True, True, 1, True))
    for blocksize in (32, 512):
        cases.append((bf, bf, 1, blocksize, True, True, 0, True))
        cases.append((bf, bf, 1, blocksize, True, True, 1, True))
    cases.append((bf, bf, 4, 64, True, True, 1, False))  # the decode path's K tail (K % BK != 0)
    for xdt, ldt, split in [(bf, bf, 1), (f16, f16, 4), (f32, f32, 4)]:  # the decode path at M = 2
        cases.append((xdt, ldt, split, 64, True, True, 2, True))
    cases.append((bf, bf, 4, 32, True, True, 2, False))
    for paired in (True, False):
        cases.append((bf, bf, 1, 64, paired, False, 0, True))
        cases.append((f32, f32, 4, 64, paired, False, 0, True))
    for xdt, ldt, split, blocksize, paired, aligned, decode, even_k in cases:
        paired = paired and paired_decode(2, xdt)  # as the launcher decides it
        cfg = (DECODE_GPU_CONFIG_M2 if decode == 2 else DECODE_GPU_CONFIG if decode else GPU_CONFIG if aligned
               else GPU_CONFIG_BLOCKS_CROSS_ROWS)
        xt = _TYPE_NAME[xdt]
        lt = _TYPE_NAME[ldt] if ldt is not None else xt
        path = (f"decode{'' if decode == 1 else ',m2'}" + ("" if even_k else ",k_tail") if decode
                else f"paired={paired},aligned={aligned}")
        specs.append(KernelSpec(
            name=f"qlora_fwd_small_m[x={xt},lora={lt if ldt is not None else 'none'},split={split},bs={blocksize},"
                 f"{path}]",
            fn=_small_m_kernel,
            signature={"x_ptr": f"*{xt}", **w_sig, "xl_ptr": f"*{xt}", "a_ptr": f"*{lt}", "b_ptr": f"*{lt}",
                       "bias_ptr": f"*{xt}", "y_ptr": f"*{xt}", "t_ptr": "*fp32", "tpart_ptr": "*fp32",
                       "ypart_ptr": "*fp32", "sync_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                       "scale": "fp32", "T_CHUNK": "i32", "N_T": "i32", "stride_xm": "i32", "stride_xk": "i32",
                       "stride_xlm": "i32", "stride_xlk": "i32", "stride_ar": "i32", "stride_ak": "i32",
                       "stride_bn": "i32", "stride_br": "i32", "stride_ym": "i32"},
            constexprs={"BM": BM, "BN": cfg.BN, "BK": cfg.BK, "SPLIT_K": split, "RP": 16, "T_BK": T_BK,
                        "BLOCKSIZE": blocksize, "NSB": max(1, cfg.BK // blocksize), "NESTED": True,
                        "PAIRED": paired, "ALIGNED": aligned, "HAS_LORA": ldt is not None, "HAS_BIAS": True,
                        "DECODE": decode, "EVEN_K": even_k, "X_PAIRS": decode > 0 and xdt != f32,
                        "X_KIND": _KIND_OF[xdt], "L_KIND": _KIND_OF[ldt if ldt is not None else xdt],
                        "B_KIND": _KIND_OF[ldt if ldt is not None else xdt],
                        "Y_BF16": xdt == bf, "INTERPRET": False},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, exact_fp32=True,
            # _decode_sums: per row, 7 product fma per 8 weights and 1 scale fma per word of 8.
            explicit_fma=decode * cfg.BN * cfg.BK // (32 * cfg.num_warps),
        ))
        if paired and aligned:
            specs.append(qlora_linear.real_shape_variant(specs[-1]))
    return specs
