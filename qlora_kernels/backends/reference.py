"""The reference backend: reference.py's functions behind the op signatures of _ops.py."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference as ref


def available(device: torch.device) -> tuple[bool, str]:
    return True, ""


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
    if nested_absmax is not None:
        absmax = ref.double_dequantize(absmax, nested_absmax, nested_code, offset)
    return ref.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)


IMPLS = {
    "quantize_4bit": ref.quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "quantize_blockwise": ref.quantize_blockwise,
    "dequantize_blockwise": ref.dequantize_blockwise,
}


# --- QLoRA linear (issue 3): compute in fp32 by reference.qlora_linear_*, cast like the kernels ---


def qlora_linear_fwd(
    x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
    lora_A, lora_B, scale, bias,
):
    w = ref.dequantize_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape)
    y, t = ref.qlora_linear_forward(x, w, lora_A, lora_B, scale, bias, x_lora, torch.float32)
    return y.to(x.dtype), t


def qlora_linear_bwd(
    grad_out, x_lora, t, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
    lora_A, lora_B, scale, compute_dx, lora_dx,
):
    w = ref.dequantize_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape)
    dx, da, db, _ = ref.qlora_linear_backward(grad_out, x_lora, t, w, lora_A, lora_B, scale, lora_dx, torch.float32)
    if not compute_dx:
        dx = dx[:0]
    return dx.to(x_lora.dtype), da.to(lora_A.dtype), db.to(lora_B.dtype)


def lora_input_grad(grad_out, lora_A, lora_B, scale, dtype):
    return ref.lora_input_grad(grad_out, lora_A, lora_B, scale, torch.float32).to(dtype)


IMPLS.update({"qlora_linear_fwd": qlora_linear_fwd, "qlora_linear_bwd": qlora_linear_bwd,
              "lora_input_grad": lora_input_grad})


# --- AdamW steps (issue 5): reference.adamw_step_* mutate their arguments in place ---

IMPLS.update({"adamw_step_32bit": ref.adamw_step_32bit, "adamw_step_8bit": ref.adamw_step_8bit})


def adamw_step_32bit_multi(ps, gs, ms, vs, lr, beta1, beta2, eps, weight_decay, step):
    for p, g, m, v in zip(ps, gs, ms, vs, strict=True):
        ref.adamw_step_32bit(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)


def adamw_step_8bit_multi(ps, gs, m_qs, m_absmaxs, v_qs, v_absmaxs, lr, beta1, beta2, eps, weight_decay, step, blocksize):
    for args in zip(ps, gs, m_qs, m_absmaxs, v_qs, v_absmaxs, strict=True):
        ref.adamw_step_8bit(*args, lr, beta1, beta2, eps, weight_decay, step, blocksize)


IMPLS.update({"adamw_step_32bit_multi": adamw_step_32bit_multi, "adamw_step_8bit_multi": adamw_step_8bit_multi})
