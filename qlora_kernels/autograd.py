"""QLoRALinearFunction: autograd for the QLoRA linear, forward and backward through the
torch.library ops qlora::qlora_linear_fwd / qlora::qlora_linear_bwd (spec: reference.py).

Saved for the backward: X_lora [M, K] (X itself, or dropout(X)) and T = X_lora @ A^T [M, r] fp32,
plus references to the frozen packed weight and its scales (no copies, no dequantized W).
The frozen weight gets no gradient.
"""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (registers torch.ops.qlora.*)


class QLoRALinearFunction(torch.autograd.Function):
    """Y [M, N] = X @ dequant(W)^T + s * (X_lora @ A^T) @ B^T (+ bias), X 2-D [M, K].

    apply(x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
          shape, lora_A, lora_B, scale, bias)
    x_lora None: the LoRA input is x (the fused path: one kernel gives all of dX). Otherwise
    (LoRA dropout) the LoRA input is x_lora = dropout(x), and its gradient s * (dY B) A is returned
    separately so autograd routes it through the dropout mask.
    """

    @staticmethod
    def forward(ctx, x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
                shape, lora_A, lora_B, scale, bias):
        y, t = torch.ops.qlora.qlora_linear_fwd(
            x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
            lora_A, lora_B, scale, bias,
        )
        ctx.save_for_backward(x if x_lora is None else x_lora, t, packed, absmax, nested_absmax, nested_code,
                              offset, lora_A, lora_B)
        ctx.separate_lora_input = x_lora is not None
        ctx.w_meta = (blocksize, quant_type, list(shape))
        ctx.scale = scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(t)
        return y, t

    @staticmethod
    def backward(ctx, grad_y, grad_t):
        x_l, t, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B = ctx.saved_tensors
        blocksize, quant_type, shape = ctx.w_meta
        s = ctx.scale
        # No input gradient wanted (e.g. the first layer, fed by frozen embeddings): skip the dX
        # GEMM, which costs as much as the forward.
        dx, da, db = torch.ops.qlora.qlora_linear_bwd(
            grad_y, x_l, t, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
            lora_A, lora_B, s, ctx.needs_input_grad[0], not ctx.separate_lora_input,
        )
        dx_lora = None
        if ctx.separate_lora_input and ctx.needs_input_grad[1]:
            # s * (dY B) A on its own (the fused dX kernel left it out), for autograd to route
            # through the dropout mask.
            dx_lora = torch.ops.qlora.lora_input_grad(grad_y, lora_A, lora_B, s, x_l.dtype)
        dbias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[13]:
            dbias = grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype)  # no fp32 copy of dY
        return (dx if ctx.needs_input_grad[0] else None, dx_lora, None, None, None, None, None, None, None, None,
                da if ctx.needs_input_grad[10] else None, db if ctx.needs_input_grad[11] else None, None, dbias)
