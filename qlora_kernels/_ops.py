"""Every torch.library op of the package: schema, fake (meta) implementation, device dispatch.

One place for all of them (as bitsandbytes does), so a newcomer finds every op's signature here,
its spec in reference.py and its kernels under backends/. The real implementation registered for
CPU and CUDA asks backends.get_impl which backend runs (forced or automatic).

Ops (namespace "qlora"):
  quantize_4bit(A, blocksize, quant_type) -> (packed uint8 [ceil(n/2), 1], absmax fp32 [nb])
  dequantize_4bit(packed, absmax, nested_absmax?, nested_code?, offset?, blocksize, quant_type,
                  shape, dtype) -> Tensor[shape] of dtype   (absmax uint8 when nested, else fp32)
  quantize_blockwise(A, code, blocksize) -> (q uint8 like A, absmax fp32 [nb])
  dequantize_blockwise(A, absmax, code, blocksize, dtype) -> Tensor like A of dtype
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backends import get_impl

LIB_NAME = "qlora"
_lib = torch.library.Library(LIB_NAME, "DEF")

SCHEMAS = {
    "quantize_4bit": "(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)",
    "dequantize_4bit": (
        "(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
        "int blocksize, str quant_type, SymInt[] shape, ScalarType dtype) -> Tensor"
    ),
    "quantize_blockwise": "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_blockwise": "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
}

for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _on_device(device: torch.device, fn, args):
    """fn(*args) with `device` current: Triton launches on the current device and its current
    stream, whatever device the tensors are on (the cuda backend guards itself too).

    Autocast is off inside: every op here fixes its own dtypes (e.g. the linear's T = X A^T in
    fp32), and the torch calls some backends make (the reference's matmuls, the dequant + cuBLAS
    strategy) would otherwise be recast by an enclosing autocast region in eager mode but not in a
    compiled graph, where the op is opaque: one op, two results."""
    if torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            return _on_device(device, fn, args)
    if device.type != "cuda":
        return fn(*args)
    with torch.cuda.device(device):
        return fn(*args)


def _dispatching(op: str):
    def impl(*args):
        device = args[0].device
        _, fn = get_impl(op, device)
        return _on_device(device, fn, args)

    impl.__name__ = f"{op}_dispatch"
    return impl


for _name in SCHEMAS:
    _lib.impl(_name, _dispatching(_name), "CPU")
    _lib.impl(_name, _dispatching(_name), "CUDA")


# --- fake implementations (shapes only), for torch.compile and opcheck ---


def _nblocks(n, blocksize: int):
    return (n + blocksize - 1) // blocksize


@torch.library.register_fake(f"{LIB_NAME}::quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = A.new_empty((_nblocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake(f"{LIB_NAME}::dequantize_4bit")
def _(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake(f"{LIB_NAME}::quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((_nblocks(A.numel(), blocksize),), dtype=torch.float32)


@torch.library.register_fake(f"{LIB_NAME}::dequantize_blockwise")
def _(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype):
    return A.new_empty(A.shape, dtype=dtype)


def op_names() -> tuple[str, ...]:
    return tuple(SCHEMAS)




# ---------------------------------------------------------------------------------------------
# QLoRA linear (issue 3): Y = X @ dequant(W)^T + s * (X_lora @ A^T) @ B^T + bias, and backward
# ---------------------------------------------------------------------------------------------
#
#   qlora_linear_fwd(x [M, K], x_lora [M, K]?, packed, absmax, nested_absmax?, nested_code?, offset?,
#                    blocksize, quant_type, shape [N, K], lora_A [r, K], lora_B [N, r], scale, bias [N]?)
#       -> (Y [M, N] of x.dtype, T [M, r] fp32)        T = X_lora @ A^T, X_lora = x when None
#   qlora_linear_bwd(grad_out [M, N], x_lora [M, K], T [M, r], packed, absmax, nested_absmax?,
#                    nested_code?, offset?, blocksize, quant_type, shape, lora_A, lora_B, scale,
#                    compute_dx, lora_dx) -> (dX [M, K] of x_lora.dtype, dA like lora_A, dB like lora_B)
#       dX = dY @ dequant(W) (+ s * (dY @ B) @ A when lora_dx); compute_dx False skips that GEMM
#       (an input that needs no gradient, e.g. the first layer's) and returns dX as [0, K].
#       dbias is dY summed (autograd.py).
#   lora_input_grad(grad_out [M, N], lora_A [r, K], lora_B [N, r], scale, dtype) -> [M, K] of dtype
#       s * (dY @ B) @ A: the LoRA part of dX on its own, for LoRA dropout (lora_dx False above),
#       where autograd routes it through the dropout mask.
# Spec: reference.qlora_linear_forward / qlora_linear_backward / lora_input_grad. x is 2-D: callers
# flatten.

_W_ARGS = (
    "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
    "int blocksize, str quant_type, SymInt[] shape"
)
QLORA_LINEAR_SCHEMAS = {
    "qlora_linear_fwd": (
        f"(Tensor x, Tensor? x_lora, {_W_ARGS}, Tensor lora_A, Tensor lora_B, float scale, Tensor? bias)"
        " -> (Tensor, Tensor)"
    ),
    "qlora_linear_bwd": (
        f"(Tensor grad_out, Tensor x_lora, Tensor t, {_W_ARGS}, Tensor lora_A, Tensor lora_B, float scale, "
        "bool compute_dx, bool lora_dx) -> (Tensor, Tensor, Tensor)"
    ),
    "lora_input_grad": "(Tensor grad_out, Tensor lora_A, Tensor lora_B, float scale, ScalarType dtype) -> Tensor",
}

for _name, _schema in QLORA_LINEAR_SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, _dispatching(_name), "CPU")
    _lib.impl(_name, _dispatching(_name), "CUDA")
SCHEMAS.update(QLORA_LINEAR_SCHEMAS)


@torch.library.register_fake(f"{LIB_NAME}::qlora_linear_fwd")
def _(x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
      lora_A, lora_B, scale, bias):
    torch._check(x.dim() == 2, lambda: f"qlora_linear_fwd takes a 2-D x, got {x.dim()}-D")
    m = x.shape[0]
    return x.new_empty((m, shape[0])), x.new_empty((m, lora_A.shape[0]), dtype=torch.float32)


@torch.library.register_fake(f"{LIB_NAME}::qlora_linear_bwd")
def _(grad_out, x_lora, t, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
      shape, lora_A, lora_B, scale, compute_dx, lora_dx):
    dx = grad_out.new_empty((grad_out.shape[0] if compute_dx else 0, shape[1]), dtype=x_lora.dtype)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.register_fake(f"{LIB_NAME}::lora_input_grad")
def _(grad_out, lora_A, lora_B, scale, dtype):
    return grad_out.new_empty((grad_out.shape[0], lora_A.shape[1]), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# AdamW steps (issue 5): in-place, one fused pass over param, grad and states
# ---------------------------------------------------------------------------------------------
#
#   adamw_step_32bit(p!, g, m!, v!, lr, beta1, beta2, eps, weight_decay, step) -> ()
#       p any float dtype; g float of p's shape; m, v fp32 of p's shape; step >= 1 counts this step.
#   adamw_step_8bit(p!, g, m_q!, m_absmax!, v_q!, v_absmax!, lr, beta1, beta2, eps, weight_decay,
#                   step, blocksize) -> ()
#       m_q, v_q uint8 of p's shape (signed / unsigned dynamic map codes), m_absmax, v_absmax fp32
#       [ceil(numel / blocksize)].
# Spec: reference.adamw_step_32bit / reference.adamw_step_8bit. Used by optim.PagedAdamW(8bit).

_ADAMW_HYPER = "float lr, float beta1, float beta2, float eps, float weight_decay, int step"
ADAMW_SCHEMAS = {
    "adamw_step_32bit": f"(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) v, {_ADAMW_HYPER}) -> ()",
    "adamw_step_8bit": (
        "(Tensor(a!) p, Tensor g, Tensor(b!) m_q, Tensor(c!) m_absmax, Tensor(d!) v_q, Tensor(e!) v_absmax, "
        f"{_ADAMW_HYPER}, int blocksize) -> ()"
    ),
}

for _name, _schema in ADAMW_SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, _dispatching(_name), "CPU")
    _lib.impl(_name, _dispatching(_name), "CUDA")
SCHEMAS.update(ADAMW_SCHEMAS)


@torch.library.register_fake(f"{LIB_NAME}::adamw_step_32bit")
def _(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    return None


@torch.library.register_fake(f"{LIB_NAME}::adamw_step_8bit")
def _(p, g, m_q, m_absmax, v_q, v_absmax, lr, beta1, beta2, eps, weight_decay, step, blocksize):
    return None


# Multi-tensor forms: the same step for a list of parameters of one device (one param group, one
# step count), so a backend can update many small tensors (LoRA factors) in a few launches.
#   adamw_step_32bit_multi(p![], g[], m![], v![], lr, beta1, beta2, eps, weight_decay, step) -> ()
#   adamw_step_8bit_multi(p![], g[], m_q![], m_absmax![], v_q![], v_absmax![], ..., step, blocksize)
# Spec: the single-tensor op applied to each index in turn.

ADAMW_MULTI_SCHEMAS = {
    "adamw_step_32bit_multi": f"(Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] m, Tensor(c!)[] v, {_ADAMW_HYPER}) -> ()",
    "adamw_step_8bit_multi": (
        "(Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] m_q, Tensor(c!)[] m_absmax, Tensor(d!)[] v_q, "
        f"Tensor(e!)[] v_absmax, {_ADAMW_HYPER}, int blocksize) -> ()"
    ),
}


def _dispatching_list(op: str):
    def impl(*args):
        device = args[0][0].device
        _, fn = get_impl(op, device)
        return _on_device(device, fn, args)

    impl.__name__ = f"{op}_dispatch"
    return impl


for _name, _schema in ADAMW_MULTI_SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, _dispatching_list(_name), "CPU")
    _lib.impl(_name, _dispatching_list(_name), "CUDA")
SCHEMAS.update(ADAMW_MULTI_SCHEMAS)


@torch.library.register_fake(f"{LIB_NAME}::adamw_step_32bit_multi")
def _(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    return None


@torch.library.register_fake(f"{LIB_NAME}::adamw_step_8bit_multi")
def _(p, g, m_q, m_absmax, v_q, v_absmax, lr, beta1, beta2, eps, weight_decay, step, blocksize):
    return None
