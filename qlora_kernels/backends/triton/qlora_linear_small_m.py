"""Triton kernel: the QLoRA linear forward for small M (decode, M <= 16). Spec:
reference.qlora_linear_forward. Used by qlora_linear.qlora_linear_fwd when M <= SMALL_M.

At small M the packed weight is nearly all the bytes (4.127 bits per weight against 16 bits per
activation element times M), so the kernel streams W exactly once: each program owns a BN-wide
slice of the outputs for all (up to 16) rows and a 1/SPLIT_K share of the K range. When the
N slices alone cannot fill the GPU (few programs per SM hide little memory latency), SPLIT_K > 1
programs add their partial sums with fp32 atomics into a zeroed fp32 buffer; the split-0 program
adds the LoRA term and bias once. The LoRA down-projection T = X A^T comes precomputed (it reads A
once; recomputing it per program would read A once per program).

tl.dot needs 16 rows, so M is padded to 16 with masked loads: at M = 1 the tensor cores idle 15/16
of the time, which costs nothing in a kernel bound by memory and by the dequantization ALU work.
Atomics make the low bits of a split-K result depend on the order programs finish; SPLIT_K = 1
(chosen when there are enough N tiles, and always under torch.use_deterministic_algorithms(True))
is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import qlora_linear
from ._utils import KernelSpec, interpreting, sm_count
from .qlora_linear import (
    _KIND_OF,
    _TYPE_NAME,
    as_operand,
    dequant_tile,
    dot_acc,
    lora_and_bias,
    lora_rank_pad,
    paired_decode,
    store_out,
    weight_layout,
)

BM = 16


@triton.jit
def _small_m_kernel(
    x_ptr, packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset_ptr, code_ptr,
    t_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_tm, stride_bn, stride_br, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, RP: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NSB: tl.constexpr,
    NESTED: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_KIND: tl.constexpr, L_KIND: tl.constexpr, Y_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Y [M <= BM, N] = X @ dequant(W)^T (+ s * T @ B^T) (+ bias); y is fp32 when SPLIT_K > 1."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * stride_xk, mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        w = dequant_tile(packed_ptr, absmax_ptr, nabsmax_ptr, ncode_ptr, offset, code_ptr, pid_n * BN, k0, N, K,
                         BN, BK, BLOCKSIZE, NSB, NESTED, PAIRED, ALIGNED)
        acc = dot_acc(as_operand(x, X_KIND, INTERPRET), tl.trans(as_operand(w, X_KIND, INTERPRET)), acc, X_KIND)
    mask = m_ok[:, None] & (offs_n < N)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        acc = lora_and_bias(acc, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_bn, stride_br,
                            scale, RP, L_KIND, HAS_LORA, HAS_BIAS, INTERPRET)
        store_out(y, acc, mask, Y_BF16, INTERPRET)
    else:
        if pid_k == 0:  # the split-K partials are summed by atomics: the epilogue is added once
            acc = lora_and_bias(acc, t_ptr, b_ptr, bias_ptr, offs_m, offs_n, M, N, R, stride_tm, stride_bn,
                                stride_br, scale, RP, L_KIND, HAS_LORA, HAS_BIAS, INTERPRET)
        tl.atomic_add(y, acc, mask=mask)


@dataclass(frozen=True)
class SmallMConfig:
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 4


# 32x64 weight tiles, 4 stages: ~80-96 registers and ~30 KB of shared memory per program in the
# usual layout, so several programs share an SM. 32x128 (3 stages) spilled under triton 3.6 (the
# GPU machine's) in the split-K and odd-K variants; 64x256 used all 255 registers.
GPU_CONFIG = SmallMConfig(BN=32, BK=64, num_warps=4, num_stages=4)
INTERPRET_CONFIG = SmallMConfig(BN=64, BK=64)
# Programs wanted in flight: enough per SM to keep loads outstanding while others dequantize.
PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 16


def pick_split_k(n: int, k: int, cfg: SmallMConfig, device: torch.device) -> int:
    """SPLIT_K for an [N, K] weight: 1 off the GPU and under torch.use_deterministic_algorithms
    (atomics make the low bits of a split-K sum depend on timing), else enough K splits for
    PROGRAMS_PER_SM programs per SM."""
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return 1
    sms = sm_count(device)
    n_tiles = triton.cdiv(n, cfg.BN)
    want = triton.cdiv(PROGRAMS_PER_SM * sms, n_tiles)
    k_tiles = triton.cdiv(k, cfg.BK)
    split = min(MAX_SPLIT_K, triton.next_power_of_2(want), max(1, k_tiles // 2))
    return max(1, split)


def small_m_fwd(x, t, packed_args, blocksize, shape, lora_B, scale, bias, split_k: Optional[int] = None,
                cfg: Optional[SmallMConfig] = None):
    """Y [M, N] for M <= 16 (see module doc). split_k None: chosen from the shape and the GPU."""
    m = x.shape[0]
    if m > BM:
        raise ValueError(f"the small-M kernel takes M <= {BM}, got {m}")
    n, k = int(shape[0]), int(shape[1])
    cfg = cfg or (INTERPRET_CONFIG if interpreting() else GPU_CONFIG)
    split = split_k or pick_split_k(n, k, cfg, x.device)
    if split > 1:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        y = qlora_linear.empty((m, n), x.dtype, x.device)
    has_lora = t is not None
    grid = (triton.cdiv(n, cfg.BN), split)
    _small_m_kernel[grid](
        x, *packed_args, t if has_lora else x, lora_B, bias if bias is not None else x, y,
        m, n, k, lora_B.shape[1], float(scale),
        x.stride(0), x.stride(1), t.stride(0) if has_lora else 0, lora_B.stride(0), lora_B.stride(1), y.stride(0),
        BM=BM, BN=cfg.BN, BK=cfg.BK, SPLIT_K=split, RP=lora_rank_pad(lora_B.shape[1]),
        NESTED=packed_args[2] is not packed_args[5], **weight_layout(shape, blocksize, cfg.BK, x.dtype),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        X_KIND=_KIND_OF[x.dtype], L_KIND=_KIND_OF[lora_B.dtype],
        Y_BF16=(split == 1 and x.dtype == torch.bfloat16), INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return y.to(x.dtype) if split > 1 else y


IMPLS: dict = {}  # reached through qlora_linear.qlora_linear_fwd (M <= 16), not an op of its own


def compile_specs() -> list[KernelSpec]:
    """The GPU config for each activation/LoRA dtype pair and each SPLIT_K mode, in the usual weight
    layout (also as it runs on a model's shapes: qlora_linear.real_shape_variant), plus the other
    dequant_tile layout paths. The tensor cores here run mma with 16 rows
    (wgmma needs 64): not required of a memory-bound kernel, so needs_tensor_cores stays False."""
    cfg = GPU_CONFIG
    specs = []
    w_sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nabsmax_ptr": "*fp32", "ncode_ptr": "*fp32",
             "offset_ptr": "*fp32", "code_ptr": "*fp32"}
    cases = []
    for xdt, ldt in [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                     (torch.float16, torch.float16), (torch.float32, torch.float32)]:
        for split in (1, 2):
            cases.append((xdt, ldt, split, 64, True, True))
    for blocksize in (32, 512):
        cases.append((torch.bfloat16, torch.bfloat16, 1, blocksize, True, True))
    for paired in (True, False):
        cases.append((torch.bfloat16, torch.bfloat16, 1, 64, paired, False))
        cases.append((torch.float32, torch.float32, 2, 64, paired, False))
    for xdt, ldt, split, blocksize, paired, aligned in cases:
        paired = paired and paired_decode(2, xdt)  # as the launcher decides it
        xt, lt = _TYPE_NAME[xdt], _TYPE_NAME[ldt]
        yt = "fp32" if split > 1 else xt
        specs.append(KernelSpec(
            name=f"qlora_fwd_small_m[x={xt},lora={lt},split={split},bs={blocksize},paired={paired},aligned={aligned}]",
            fn=_small_m_kernel,
            signature={"x_ptr": f"*{xt}", **w_sig, "t_ptr": "*fp32", "b_ptr": f"*{lt}", "bias_ptr": f"*{xt}",
                       "y_ptr": f"*{yt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scale": "fp32",
                       "stride_xm": "i32", "stride_xk": "i32", "stride_tm": "i32", "stride_bn": "i32",
                       "stride_br": "i32", "stride_ym": "i32"},
            constexprs={"BM": BM, "BN": cfg.BN, "BK": cfg.BK, "SPLIT_K": split, "RP": 16,
                        "BLOCKSIZE": blocksize, "NSB": max(1, cfg.BK // blocksize), "NESTED": True,
                        "PAIRED": paired, "ALIGNED": aligned, "HAS_LORA": True, "HAS_BIAS": True,
                        "X_KIND": _KIND_OF[xdt], "L_KIND": _KIND_OF[ldt],
                        "Y_BF16": split == 1 and xdt == torch.bfloat16, "INTERPRET": False},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, exact_fp32=True,
        ))
        if paired and aligned:
            specs.append(qlora_linear.real_shape_variant(specs[-1]))
    return specs
