"""Triton kernels: fused AdamW steps with fp32 states and with blockwise 8-bit states.

Spec: reference.adamw_step_32bit / reference.adamw_step_8bit (op order and float32 constants in
reference.adamw_scalars). Ops: qlora::adamw_step_32bit, qlora::adamw_step_8bit (_ops.py). Used by
optim.PagedAdamW / PagedAdamW8bit. Tests: python_tests/test_optim.py.

One pass over memory: each program reads its slice of param, grad and states once and writes
param and states once. The 8-bit kernel works on whole 256-element blocks (its program owns the
blocks' absmax), dequantizes, updates in fp32, and requantizes with the LUT encoder of
blockwise_8bit.py, so its states are bit-identical to reference.quantize_blockwise.

Launched with enable_fp_fusion=False and IEEE sqrt/division (sqrt_rn, div_rn): the spec rounds
after every operation, and an FMA or an approximate sqrt/divide would change the last bit of the
parameter (and, through absmax, the 8-bit codes of a whole block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import DYNAMIC_LUT_SIZE, get_code, num_blocks
from ...reference import ADAMW_8BIT_BLOCKSIZE, adamw_scalars, cached_lut
from ._common import lut_quantize_rows, store_cast
from ._utils import KernelSpec, interpreting

BLOCK_32BIT = 1024
ELEMS_PER_PROG_8BIT = 1024
WARPS = 4
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_SET = frozenset(FLOAT_DTYPES)


@triton.jit
def _adamw_math(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps):
    p = p * decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.math.div_rn(step_size * m, denom)
    return p, m, v


@triton.jit
def _adamw_32bit_body(
    p_ptr, g_ptr, m_ptr, v_ptr, offs, mask,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    P_BF16: tl.constexpr, INTERPRET: tl.constexpr, FULL: tl.constexpr = False,
):
    """FULL: every offset is in range, so loads and stores go unmasked (vectorised)."""
    if FULL:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p, m, v = _adamw_math(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps)
    if FULL:
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
        store_cast(p_ptr + offs, p, None, P_BF16, INTERPRET)
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        store_cast(p_ptr + offs, p, mask, P_BF16, INTERPRET)


@triton.jit
def _adamw_32bit_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    BLOCK: tl.constexpr, P_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adamw_32bit_body(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n,
                      decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                      P_BF16, INTERPRET)


@triton.jit
def _adamw_8bit_body(
    p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, code_m_ptr, code_v_ptr, lut_m_ptr, lut_v_ptr, n, block,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    BLOCKSIZE: tl.constexpr, LUT_SIZE: tl.constexpr, P_BF16: tl.constexpr, INTERPRET: tl.constexpr,
    FULL: tl.constexpr = False,
):
    """Blocks `block` (int64 [BLOCKS_PER_PROG]) of one tensor of n elements. FULL: all of them
    lie wholly inside the tensor, so memory accesses go unmasked (vectorised)."""
    offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = offs < n
    block_ok = block < (n + BLOCKSIZE - 1) // BLOCKSIZE

    if FULL:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        # Codes as int32 offsets (uint8 ones sign-extend under Triton 3.2: _utils.py's module doc).
        m = tl.load(code_m_ptr + tl.load(mq_ptr + offs).to(tl.int32)) * tl.load(mabs_ptr + block)[:, None]
        v = tl.load(code_v_ptr + tl.load(vq_ptr + offs).to(tl.int32)) * tl.load(vabs_ptr + block)[:, None]
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(code_m_ptr + tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)) * tl.load(mabs_ptr + block, mask=block_ok, other=0.0)[:, None]
        v = tl.load(code_v_ptr + tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)) * tl.load(vabs_ptr + block, mask=block_ok, other=0.0)[:, None]
        # Past the end the reference pads a block with zeros before taking its absmax; zero lanes
        # also stay zero through the update (code_m[0] is -1, which would make them -absmax / eps).
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)

    p, m, v = _adamw_math(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps)
    qm, am = lut_quantize_rows(m, lut_m_ptr, LUT_SIZE)
    qv, av = lut_quantize_rows(v, lut_v_ptr, LUT_SIZE)

    if FULL:
        tl.store(mq_ptr + offs, qm)
        tl.store(mabs_ptr + block, am)
        tl.store(vq_ptr + offs, qv)
        tl.store(vabs_ptr + block, av)
        store_cast(p_ptr + offs, p, None, P_BF16, INTERPRET)
    else:
        tl.store(mq_ptr + offs, qm, mask=mask)
        tl.store(mabs_ptr + block, am, mask=block_ok)
        tl.store(vq_ptr + offs, qv, mask=mask)
        tl.store(vabs_ptr + block, av, mask=block_ok)
        store_cast(p_ptr + offs, p, mask, P_BF16, INTERPRET)


@triton.jit
def _adamw_8bit_kernel(
    p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, code_m_ptr, code_v_ptr, lut_m_ptr, lut_v_ptr, n,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, LUT_SIZE: tl.constexpr,
    P_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    _adamw_8bit_body(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, code_m_ptr, code_v_ptr, lut_m_ptr, lut_v_ptr,
                     n, block, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                     BLOCKSIZE, LUT_SIZE, P_BF16, INTERPRET)


# --- multi-tensor kernels: one launch for a list of tensors of the same dtypes ---
#
# A LoRA model trains hundreds of small tensors; one launch (plus Python dispatch) per tensor costs
# more than the update. The launcher passes a table of raw addresses (int64) and a chunk map: program
# c updates chunk c - first[t] of tensor t = chunk_tensor[c], CHUNK_ITERS tiles of the single-tensor
# kernel's size, with exactly the single-tensor kernel's arithmetic (bit-identical results).


@triton.jit
def _adamw_32bit_multi_kernel(
    table_ptr, chunk_tensor_ptr, ntensors,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    BLOCK: tl.constexpr, CHUNK_ITERS: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    P_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    # table: [p addr | g addr | m addr | v addr | numel | first chunk], ntensors int64 each.
    # The launcher sends only 16-byte aligned tensors. The hints sit on the integer and on the
    # pointer, in this body (not in a helper: a hint on a call's result is lost when it is
    # inlined); checked on sm_90 PTX, only then do full tiles load and store as v4.
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c).to(tl.int64)
    p_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + t), 16).to(tl.pointer_type(P_DTYPE)), 16)
    g_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + ntensors + t), 16).to(tl.pointer_type(G_DTYPE)), 16)
    m_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + 2 * ntensors + t), 16).to(tl.pointer_type(tl.float32)), 16)
    v_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + 3 * ntensors + t), 16).to(tl.pointer_type(tl.float32)), 16)
    n = tl.load(table_ptr + 4 * ntensors + t)
    start = (c - tl.load(table_ptr + 5 * ntensors + t)) * (BLOCK * CHUNK_ITERS)
    for i in tl.static_range(CHUNK_ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if start + (i + 1) * BLOCK <= n:
            _adamw_32bit_body(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n,
                              decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                              P_BF16, INTERPRET, True)
        else:
            _adamw_32bit_body(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n,
                              decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                              P_BF16, INTERPRET, False)


@triton.jit
def _adamw_8bit_multi_kernel(
    table_ptr, chunk_tensor_ptr, ntensors, code_m_ptr, code_v_ptr, lut_m_ptr, lut_v_ptr,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, CHUNK_ITERS: tl.constexpr, LUT_SIZE: tl.constexpr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, P_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    # table: [p | g | m_q | m_absmax | v_q | v_absmax addr | numel | first chunk], ntensors each.
    # Alignment hints as in _adamw_32bit_multi_kernel.
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c).to(tl.int64)
    p_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + t), 16).to(tl.pointer_type(P_DTYPE)), 16)
    g_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + ntensors + t), 16).to(tl.pointer_type(G_DTYPE)), 16)
    mq_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + 2 * ntensors + t), 16).to(tl.pointer_type(tl.uint8)), 16)
    mabs_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + 3 * ntensors + t), 16).to(tl.pointer_type(tl.float32)), 16)
    vq_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + 4 * ntensors + t), 16).to(tl.pointer_type(tl.uint8)), 16)
    vabs_ptr = tl.multiple_of(tl.multiple_of(tl.load(table_ptr + 5 * ntensors + t), 16).to(tl.pointer_type(tl.float32)), 16)
    n = tl.load(table_ptr + 6 * ntensors + t)
    first_block = (c - tl.load(table_ptr + 7 * ntensors + t)) * (BLOCKS_PER_PROG * CHUNK_ITERS)
    for i in tl.static_range(CHUNK_ITERS):
        block = first_block + i * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
        if (first_block + (i + 1) * BLOCKS_PER_PROG) * BLOCKSIZE <= n:
            _adamw_8bit_body(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, code_m_ptr, code_v_ptr, lut_m_ptr,
                             lut_v_ptr, n, block, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size,
                             bc2_sqrt, eps, BLOCKSIZE, LUT_SIZE, P_BF16, INTERPRET, True)
        else:
            _adamw_8bit_body(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, code_m_ptr, code_v_ptr, lut_m_ptr,
                             lut_v_ptr, n, block, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size,
                             bc2_sqrt, eps, BLOCKSIZE, LUT_SIZE, P_BF16, INTERPRET, False)


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: that is a JIT function, and calling it from Python costs ~20 us.
    return -(-a // b)


def _scalar_args(lr, beta1, beta2, eps, weight_decay, step) -> list[float]:
    s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    return [s["decay"], s["beta1"], s["one_minus_beta1"], s["beta2"], s["one_minus_beta2"],
            s["step_size"], s["bc2_sqrt"], s["eps"]]


def _check(p: torch.Tensor, g: torch.Tensor, states: dict[str, tuple[torch.Tensor, torch.dtype, int]]) -> None:
    if p.dtype not in FLOAT_DTYPES or g.dtype not in FLOAT_DTYPES:
        raise TypeError(f"AdamW kernels take fp32/bf16/fp16 params and grads, got {p.dtype} and {g.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
    for name, (t, dtype, numel) in states.items():
        if t.dtype != dtype or t.numel() != numel or not t.is_contiguous() or t.device != p.device:
            raise ValueError(
                f"AdamW state {name} must be a contiguous {dtype} tensor of {numel} elements on {p.device}, "
                f"got {t.dtype} with {t.numel()} elements on {t.device}"
            )


class _ContiguousParam:
    """The parameter as the kernel needs it (dense), written back on exit when it was a copy."""

    def __init__(self, p: torch.Tensor):
        self.p = p
        self.work = p if p.is_contiguous() else p.contiguous()

    def __enter__(self) -> torch.Tensor:
        return self.work

    def __exit__(self, *exc) -> None:
        if self.work is not self.p and exc[0] is None:
            self.p.copy_(self.work)


def adamw_step_32bit(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    n = p.numel()
    _check(p, g, {"m": (m, torch.float32, n), "v": (v, torch.float32, n)})
    if n == 0:
        return
    scalars = _scalar_args(lr, beta1, beta2, eps, weight_decay, step)
    with _ContiguousParam(p) as pc:
        _adamw_32bit_kernel[(_cdiv(n, BLOCK_32BIT),)](
            pc, g.contiguous(), m, v, n, *scalars,
            BLOCK=BLOCK_32BIT, P_BF16=p.dtype == torch.bfloat16, INTERPRET=interpreting(),
            num_warps=WARPS, enable_fp_fusion=False,
        )


def _blocks_per_program(blocksize: int) -> int:
    return max(1, ELEMS_PER_PROG_8BIT // blocksize)


def adamw_step_8bit(p, g, m_q, m_absmax, v_q, v_absmax, lr, beta1, beta2, eps, weight_decay, step, blocksize) -> None:
    if isinstance(blocksize, bool) or blocksize < 16 or blocksize & (blocksize - 1):
        raise ValueError(f"the Triton 8-bit AdamW step needs a power-of-two blocksize >= 16, got {blocksize}")
    n = p.numel()
    nb = num_blocks(n, blocksize)
    _check(p, g, {"m_q": (m_q, torch.uint8, n), "m_absmax": (m_absmax, torch.float32, nb),
                  "v_q": (v_q, torch.uint8, n), "v_absmax": (v_absmax, torch.float32, nb)})
    if n == 0:
        return
    code_m = get_code("dynamic", p.device)
    code_v = get_code("dynamic_unsigned", p.device)
    scalars = _scalar_args(lr, beta1, beta2, eps, weight_decay, step)
    bpp = _blocks_per_program(blocksize)
    with _ContiguousParam(p) as pc:
        _adamw_8bit_kernel[(_cdiv(nb, bpp),)](
            pc, g.contiguous(), m_q, m_absmax, v_q, v_absmax, code_m, code_v, cached_lut(code_m), cached_lut(code_v), n,
            *scalars,
            BLOCKSIZE=blocksize, BLOCKS_PER_PROG=bpp, LUT_SIZE=DYNAMIC_LUT_SIZE,
            P_BF16=p.dtype == torch.bfloat16, INTERPRET=interpreting(),
            num_warps=WARPS, enable_fp_fusion=False,
        )


# --- multi-tensor launchers ---

MULTI_CHUNK_ITERS = 4
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_chunk_maps: dict[tuple[torch.device, tuple[int, ...]], tuple[torch.Tensor, list[int]]] = {}
_CHUNK_MAP_CACHE = 32


def _chunk_map(device: torch.device, chunks: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """(chunk -> tensor index, int32 on device; first chunk of each tensor). Cached: an optimizer
    asks for the same tensor sizes every step."""
    key = (device, chunks)
    hit = _chunk_maps.get(key)
    if hit is None:
        firsts, total = [], 0
        for c in chunks:
            firsts.append(total)
            total += c
        owner = torch.repeat_interleave(torch.arange(len(chunks), dtype=torch.int32), torch.tensor(chunks))
        hit = (owner.to(device), firsts)
        if len(_chunk_maps) >= _CHUNK_MAP_CACHE:
            _chunk_maps.pop(next(iter(_chunk_maps)))
        _chunk_maps[key] = hit
    if device.type == "cuda":
        # Used on whatever stream steps now: an evicted map's memory must not be reused before
        # that stream's kernels have read it.
        hit[0].record_stream(torch.cuda.current_stream(device))
    return hit


def _group(ps, gs, states, state_dtypes, blocksize=None):
    """Check every tensor, then split the indices into single launches (a non-contiguous or
    unaligned tensor) and groups of equal (param dtype, grad dtype). states: lists parallel to ps; state_dtypes: the
    dtype of each list; a list of dtype fp32 with blocksize set holds per-block absmax."""
    dev = ps[0].get_device()
    singles, groups = [], {}
    for i, (p, g) in enumerate(zip(ps, gs)):
        n = p.numel()
        nb = num_blocks(n, blocksize) if blocksize else n
        sts = [lst[i] for lst in states]
        # A few attribute reads per tensor (hundreds of tensors a step); _check has the messages.
        ok = (p.dtype in _FLOAT_SET and g.dtype in _FLOAT_SET and g.shape == p.shape
              and p.get_device() == dev and g.get_device() == dev)
        for t, dtype in zip(sts, state_dtypes):
            ok = ok and t.dtype == dtype and t.is_contiguous() and t.get_device() == dev and t.numel() == (
                nb if (blocksize and dtype == torch.float32) else n)
        if not ok:
            names = ("m_q", "m_absmax", "v_q", "v_absmax") if blocksize else ("m", "v")
            _check(p, g, {name: (t, dtype, nb if (blocksize and dtype == torch.float32) else n)
                          for name, t, dtype in zip(names, sts, state_dtypes)})
            raise ValueError(f"multi-tensor AdamW step: tensor {i} is on another device than tensor 0 ({ps[0].device})")
        if n == 0:
            continue
        # The multi-tensor kernels promise the compiler 16-byte aligned tensors (vector access);
        # anything else (a non-contiguous or oddly offset view) takes the single-tensor kernel.
        aligned = (p.data_ptr() % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in sts)
                   and (not g.is_contiguous() or g.data_ptr() % 16 == 0))
        if not p.is_contiguous() or not aligned:
            singles.append(i)
        else:
            groups.setdefault((p.dtype, g.dtype), []).append(i)
    return singles, groups


def _upload_table(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of `values` on device. On CUDA through pinned memory, asynchronously: a
    pageable copy would make every optimizer step wait for the GPU to drain (the pinned block is
    kept by torch's host allocator until the copy has run)."""
    table = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _check_lengths(*lists) -> None:
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"multi-tensor AdamW step: list lengths differ: {[len(x) for x in lists]}")


def adamw_step_32bit_multi(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step) -> None:
    _check_lengths(ps, gs, ms, vs)
    if not ps:
        return
    singles, groups = _group(ps, gs, (ms, vs), (torch.float32, torch.float32))
    for i in singles:
        adamw_step_32bit(ps[i], gs[i], ms[i], vs[i], lr, beta1, beta2, eps, weight_decay, step)
    scalars = _scalar_args(lr, beta1, beta2, eps, weight_decay, step)
    elems = BLOCK_32BIT * MULTI_CHUNK_ITERS
    device = ps[0].device
    for (pdt, gdt), idx in groups.items():
        grads = [gs[i].contiguous() for i in idx]  # kept alive until the launch is queued
        numels = [ps[i].numel() for i in idx]
        chunk_owner, firsts = _chunk_map(device, tuple(_cdiv(n, elems) for n in numels))
        table = _upload_table(
            [ps[i].data_ptr() for i in idx] + [g.data_ptr() for g in grads] + [ms[i].data_ptr() for i in idx]
            + [vs[i].data_ptr() for i in idx] + numels + firsts,
            device,
        )
        _adamw_32bit_multi_kernel[(chunk_owner.numel(),)](
            table, chunk_owner, len(idx), *scalars,
            BLOCK=BLOCK_32BIT, CHUNK_ITERS=MULTI_CHUNK_ITERS, P_DTYPE=_TL_DTYPE[pdt], G_DTYPE=_TL_DTYPE[gdt],
            P_BF16=pdt == torch.bfloat16, INTERPRET=interpreting(), num_warps=WARPS, enable_fp_fusion=False,
        )


def adamw_step_8bit_multi(ps, gs, m_qs, m_absmaxs, v_qs, v_absmaxs, lr, beta1, beta2, eps, weight_decay, step,
                          blocksize) -> None:
    _check_lengths(ps, gs, m_qs, m_absmaxs, v_qs, v_absmaxs)
    if not ps:
        return
    if isinstance(blocksize, bool) or blocksize < 16 or blocksize & (blocksize - 1):
        raise ValueError(f"the Triton 8-bit AdamW step needs a power-of-two blocksize >= 16, got {blocksize}")

    singles, groups = _group(ps, gs, (m_qs, m_absmaxs, v_qs, v_absmaxs),
                             (torch.uint8, torch.float32, torch.uint8, torch.float32), blocksize)
    for i in singles:
        adamw_step_8bit(ps[i], gs[i], m_qs[i], m_absmaxs[i], v_qs[i], v_absmaxs[i],
                        lr, beta1, beta2, eps, weight_decay, step, blocksize)
    device = ps[0].device
    code_m, code_v = get_code("dynamic", device), get_code("dynamic_unsigned", device)
    scalars = _scalar_args(lr, beta1, beta2, eps, weight_decay, step)
    bpp = _blocks_per_program(blocksize)
    blocks_per_chunk = bpp * MULTI_CHUNK_ITERS
    for (pdt, gdt), idx in groups.items():
        grads = [gs[i].contiguous() for i in idx]
        numels = [ps[i].numel() for i in idx]
        chunks = tuple(_cdiv(num_blocks(n, blocksize), blocks_per_chunk) for n in numels)
        chunk_owner, firsts = _chunk_map(device, chunks)
        table = _upload_table(
            [ps[i].data_ptr() for i in idx] + [g.data_ptr() for g in grads]
            + [m_qs[i].data_ptr() for i in idx] + [m_absmaxs[i].data_ptr() for i in idx]
            + [v_qs[i].data_ptr() for i in idx] + [v_absmaxs[i].data_ptr() for i in idx] + numels + firsts,
            device,
        )
        _adamw_8bit_multi_kernel[(chunk_owner.numel(),)](
            table, chunk_owner, len(idx), code_m, code_v, cached_lut(code_m), cached_lut(code_v), *scalars,
            BLOCKSIZE=blocksize, BLOCKS_PER_PROG=bpp, CHUNK_ITERS=MULTI_CHUNK_ITERS, LUT_SIZE=DYNAMIC_LUT_SIZE,
            P_DTYPE=_TL_DTYPE[pdt], G_DTYPE=_TL_DTYPE[gdt], P_BF16=pdt == torch.bfloat16, INTERPRET=interpreting(),
            num_warps=WARPS, enable_fp_fusion=False,
        )


IMPLS = {
    "adamw_step_32bit": adamw_step_32bit,
    "adamw_step_8bit": adamw_step_8bit,
    "adamw_step_32bit_multi": adamw_step_32bit_multi,
    "adamw_step_8bit_multi": adamw_step_8bit_multi,
}

_TNAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_SCALAR_NAMES = ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps")


def compile_specs() -> list[KernelSpec]:
    """Every (param dtype, grad dtype) pair the optimizers launch, single- and multi-tensor; 8-bit
    at blocksize 256 only."""
    specs = []
    scalars = {k: "fp32" for k in _SCALAR_NAMES}
    for pdt in FLOAT_DTYPES:
        for gdt in FLOAT_DTYPES:
            pt, gt = _TNAMES[pdt], _TNAMES[gdt]
            specs.append(KernelSpec(
                name="adamw_step_32bit", fn=_adamw_32bit_kernel,
                signature={"p_ptr": f"*{pt}", "g_ptr": f"*{gt}", "m_ptr": "*fp32", "v_ptr": "*fp32", "n": "i32",
                           **scalars},
                constexprs={"BLOCK": BLOCK_32BIT, "P_BF16": pdt == torch.bfloat16, "INTERPRET": False},
                num_warps=WARPS, exact_fp32=True,
            ))
            specs.append(KernelSpec(
                name="adamw_step_8bit", fn=_adamw_8bit_kernel,
                signature={"p_ptr": f"*{pt}", "g_ptr": f"*{gt}", "mq_ptr": "*u8", "mabs_ptr": "*fp32",
                           "vq_ptr": "*u8", "vabs_ptr": "*fp32", "code_m_ptr": "*fp32", "code_v_ptr": "*fp32",
                           "lut_m_ptr": "*u8", "lut_v_ptr": "*u8", "n": "i32", **scalars},
                constexprs={"BLOCKSIZE": ADAMW_8BIT_BLOCKSIZE, "BLOCKS_PER_PROG": _blocks_per_program(ADAMW_8BIT_BLOCKSIZE),
                            "LUT_SIZE": DYNAMIC_LUT_SIZE, "P_BF16": pdt == torch.bfloat16, "INTERPRET": False},
                num_warps=WARPS, exact_fp32=True,
            ))
    for pdt in FLOAT_DTYPES:
        for gdt in FLOAT_DTYPES:
            table = {"table_ptr": "*i64", "chunk_tensor_ptr": "*i32", "ntensors": "i32"}
            kinds = {"P_DTYPE": _TL_DTYPE[pdt], "G_DTYPE": _TL_DTYPE[gdt], "P_BF16": pdt == torch.bfloat16}
            specs.append(KernelSpec(
                name="adamw_step_32bit_multi", fn=_adamw_32bit_multi_kernel,
                signature={**table, **scalars},
                constexprs={"BLOCK": BLOCK_32BIT, "CHUNK_ITERS": MULTI_CHUNK_ITERS, **kinds, "INTERPRET": False},
                num_warps=WARPS, exact_fp32=True,
            ))
            specs.append(KernelSpec(
                name="adamw_step_8bit_multi", fn=_adamw_8bit_multi_kernel,
                signature={**table, "code_m_ptr": "*fp32", "code_v_ptr": "*fp32", "lut_m_ptr": "*u8",
                           "lut_v_ptr": "*u8", **scalars},
                constexprs={"BLOCKSIZE": ADAMW_8BIT_BLOCKSIZE, "BLOCKS_PER_PROG": _blocks_per_program(ADAMW_8BIT_BLOCKSIZE),
                            "CHUNK_ITERS": MULTI_CHUNK_ITERS, "LUT_SIZE": DYNAMIC_LUT_SIZE, **kinds, "INTERPRET": False},
                num_warps=WARPS, exact_fp32=True,
            ))
    return specs
