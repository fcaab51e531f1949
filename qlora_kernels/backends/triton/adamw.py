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
from ...reference import ADAMW_8BIT_BLOCKSIZE, adamw_scalars
from ._common import store_cast
from ._utils import KernelSpec, interpreting
from .blockwise_8bit import _lut_for

BLOCK_32BIT = 1024
ELEMS_PER_PROG_8BIT = 1024
WARPS = 4
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _adamw_math(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps):
    p = p * decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.math.div_rn(step_size * m, denom)
    return p, m, v


@triton.jit
def _adamw_32bit_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    BLOCK: tl.constexpr, P_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p, m, v = _adamw_math(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    store_cast(p_ptr + offs, p, mask, P_BF16, INTERPRET)


@triton.jit
def _requantize_blocks(x, lut_ptr, LUT_SIZE: tl.constexpr):
    """(codes uint8, absmax fp32 per row) of x [blocks, BLOCKSIZE]: reference.quantize_blockwise,
    with padding elements already zero."""
    absmax = tl.max(tl.abs(x), axis=1)
    is_zero = absmax == 0.0
    inv = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(is_zero, 1.0, absmax))
    v = x * inv[:, None]
    v = tl.where(v == v, v, -1.0)  # NaN -> index 0 as the reference (a NaN -> int cast is undefined)
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    t = (v + 1.0) * 0.5
    t = t * (LUT_SIZE - 1.0)
    t = t + 0.5
    q = tl.load(lut_ptr + t.to(tl.int32))
    q = tl.where(is_zero[:, None], 0, q)
    return q, absmax


@triton.jit
def _adamw_8bit_kernel(
    p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, code_m_ptr, code_v_ptr, lut_m_ptr, lut_v_ptr, n,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, LUT_SIZE: tl.constexpr,
    P_BF16: tl.constexpr, INTERPRET: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = offs < n
    block_ok = block < (n + BLOCKSIZE - 1) // BLOCKSIZE

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(code_m_ptr + tl.load(mq_ptr + offs, mask=mask, other=0)) * tl.load(mabs_ptr + block, mask=block_ok, other=0.0)[:, None]
    v = tl.load(code_v_ptr + tl.load(vq_ptr + offs, mask=mask, other=0)) * tl.load(vabs_ptr + block, mask=block_ok, other=0.0)[:, None]
    # Past the end the reference pads a block with zeros before taking its absmax; zero lanes also
    # stay zero through the update (code_m[0] is -1, which would make them -absmax / eps).
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)

    p, m, v = _adamw_math(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps)
    qm, am = _requantize_blocks(m, lut_m_ptr, LUT_SIZE)
    qv, av = _requantize_blocks(v, lut_v_ptr, LUT_SIZE)

    tl.store(mq_ptr + offs, qm, mask=mask)
    tl.store(mabs_ptr + block, am, mask=block_ok)
    tl.store(vq_ptr + offs, qv, mask=mask)
    tl.store(vabs_ptr + block, av, mask=block_ok)
    store_cast(p_ptr + offs, p, mask, P_BF16, INTERPRET)


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
        _adamw_32bit_kernel[(triton.cdiv(n, BLOCK_32BIT),)](
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
        _adamw_8bit_kernel[(triton.cdiv(nb, bpp),)](
            pc, g.contiguous(), m_q, m_absmax, v_q, v_absmax, code_m, code_v, _lut_for(code_m), _lut_for(code_v), n,
            *scalars,
            BLOCKSIZE=blocksize, BLOCKS_PER_PROG=bpp, LUT_SIZE=DYNAMIC_LUT_SIZE,
            P_BF16=p.dtype == torch.bfloat16, INTERPRET=interpreting(),
            num_warps=WARPS, enable_fp_fusion=False,
        )


IMPLS = {"adamw_step_32bit": adamw_step_32bit, "adamw_step_8bit": adamw_step_8bit}

_TNAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_SCALAR_NAMES = ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps")


def compile_specs() -> list[KernelSpec]:
    """Every (param dtype, grad dtype) pair the optimizers launch; 8-bit at blocksize 256 only."""
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
    return specs
