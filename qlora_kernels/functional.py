"""Public functions: argument checks, then the torch.library ops of _ops.py.

    quantize_4bit(w, quant_type="nf4", blocksize=64, double_quant=True, quant_storage=torch.uint8)
        -> (packed, QuantState)
    dequantize_4bit(packed, state, dtype=None) -> Tensor
    quantize_blockwise(x, code=None, blocksize=256) -> (q uint8, absmax fp32)
    dequantize_blockwise(q, absmax, code=None, blocksize=256, dtype=torch.float32) -> Tensor

Spec of every op: reference.py. Kernels: backends/. Which one runs: backends.use_backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops  # noqa: F401  (registers torch.ops.qlora.*)
from . import reference as ref
from .formats import (
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    QuantState,
    check_blocksize,
    check_quant_type,
    get_code,
    packed_numel,
    values_readable,
)


def _check_float_tensor(x, what: str, check_finite: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        kind = "complex" if x.is_complex() else ("integer/bool" if not x.is_floating_point() else str(x.dtype))
        raise TypeError(f"{what} must be float32, bfloat16 or float16; got {x.dtype} ({kind})")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); nothing to quantize")
    if x.is_sparse or x.layout != torch.strided:
        raise TypeError(f"{what} must be a dense (strided) tensor, got layout {x.layout}")
    if check_finite and values_readable(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf; pass check_finite=False to quantize it anyway")


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    check_finite: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` blockwise to 4 bits (NF4 or FP4), bit-identical to bitsandbytes.

    Returns (packed [ceil(n/2) / itemsize, 1] of `quant_storage`, QuantState). With double_quant
    the per-block absmax are themselves quantized to 8 bits (QLoRA's DQ: 4.127 bits per weight at
    blocksize 64). check_finite=False skips the NaN/Inf scan (a device sync on GPUs).
    """
    _check_float_tensor(w, "weight", check_finite)
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch.dtype, got {type(quant_storage).__name__}")
    nbytes = packed_numel(w.numel())
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if nbytes % itemsize:
        raise ValueError(
            f"{nbytes} packed bytes do not fill whole {quant_storage} elements ({itemsize} bytes); "
            "use quant_storage=torch.uint8 for this shape"
        )

    packed, absmax = torch.ops.qlora.quantize_4bit(w.contiguous(), blocksize, quant_type)
    code = get_code(quant_type, w.device)
    if double_quant:
        offset = ref.double_quant_offset(absmax)
        qabsmax, nested_absmax = torch.ops.qlora.quantize_blockwise(
            absmax - offset, get_code("dynamic", w.device), NESTED_BLOCKSIZE
        )
        state = QuantState(
            absmax=qabsmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type,
            code=code, offset=offset, nested_absmax=nested_absmax,
            nested_code=get_code("dynamic", w.device).clone(),
        )
    else:
        state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                           quant_type=quant_type, code=code)
    if quant_storage != torch.uint8:
        packed = packed.reshape(-1).view(quant_storage).reshape(-1, 1)
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Decode a 4-bit packed tensor to `dtype` (default: the dtype the weight had), shape state.shape."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qlora_kernels QuantState, got {type(state).__name__}")
    state.validate(packed)
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    raw = packed.reshape(-1).view(torch.uint8) if packed.is_contiguous() else packed.contiguous().reshape(-1).view(torch.uint8)
    return torch.ops.qlora.dequantize_4bit(
        raw, state.absmax, state.nested_absmax, state.nested_code, state.offset,
        state.blocksize, state.quant_type, list(state.shape), dtype,
    )


def _check_blockwise_size(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize!r}")


def _check_blockwise_code(code, device: torch.device, what: str, need_sorted: bool) -> None:
    """A 256-entry fp32 map on `device`; sorted ascending when it is to encode (the encoder finds
    a value's entry by its rank among the midpoints of neighbouring entries)."""
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be a torch.Tensor, got {type(code).__name__}")
    order = " sorted" if need_sorted else ""
    if code.shape != (256,) or code.dtype != torch.float32 or code.device != device:
        raise ValueError(
            f"code must be a float32 tensor of 256{order} entries on the {what}'s device ({device}), "
            f"got {code.dtype} {tuple(code.shape)} on {code.device}"
        )
    if not need_sorted or not values_readable(code):
        return
    # The shipped maps are sorted; recognised by identity, as reference.cached_lut does (no sync).
    if any(code is get_code(name, code.device) for name in ("dynamic", "dynamic_unsigned")):
        return
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("code must be sorted ascending without NaN (e.g. formats.create_dynamic_map()); "
                         "got an unsorted one")


def quantize_blockwise(
    x: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a 256-entry dynamic map (default: the signed one)."""
    _check_float_tensor(x, "input", check_finite=False)
    _check_blockwise_size(blocksize)
    code = get_code("dynamic", x.device) if code is None else code
    _check_blockwise_code(code, x.device, "input", need_sorted=True)
    return torch.ops.qlora.quantize_blockwise(x.contiguous(), code, blocksize)


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of quantize_blockwise: code[q] * absmax[block] in fp32, cast to `dtype`."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != torch.uint8:
        raise TypeError(f"q must be uint8, got {q.dtype}")
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"absmax must be a torch.Tensor, got {type(absmax).__name__}")
    _check_blockwise_size(blocksize)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    code = get_code("dynamic", q.device) if code is None else code
    _check_blockwise_code(code, q.device, "q", need_sorted=False)
    nb = -(-q.numel() // blocksize)
    if absmax.shape != (nb,):
        raise ValueError(f"absmax has shape {tuple(absmax.shape)}, expected [{nb}]")
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32 (as quantize_blockwise returns it), got {absmax.dtype}")
    if absmax.device != q.device:
        raise ValueError(f"absmax is on {absmax.device} but q is on {q.device}")
    return torch.ops.qlora.dequantize_blockwise(q.contiguous(), absmax, code, blocksize, dtype)


# --- QLoRA linear (issue 3) ---

from .autograd import QLoRALinearFunction  # noqa: E402  (autograd sits below functional)


def qlora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """Y [..., N] = x @ dequant(W)^T + scale * (dropout(x) @ lora_A^T) @ lora_B^T (+ bias).

    x [..., K] (any leading dims) in float32/bfloat16/float16; W [N, K] = state.shape, frozen 4-bit;
    lora_A [r, K], lora_B [N, r] (same dtype, float32/bfloat16/float16; r <= 128 on Triton); bias [N].
    Differentiable in x, lora_A, lora_B and bias (never in W).

    dropout > 0 and training: the LoRA input dropout(x) differs from the base input x, so the fused
    backward cannot produce all of dX in one kernel; this path still runs the fused forward (with T
    from the dropped input) and the fused dY @ W kernel, and adds the LoRA part of dX with separate
    matmuls through the dropout mask. dropout == 0 or eval: the fully fused path.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qlora_kernels QuantState, got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"qlora_linear needs a 2-D weight, the quant state has shape {tuple(state.shape)}")
    n, k = int(state.shape[0]), int(state.shape[1])
    for what, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{what} must be a float32/bfloat16/float16 tensor")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (its last holds the {k} features), got a 0-d tensor")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != k or lora_B.shape[0] != n \
            or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(
            f"lora_A must be [r, {k}] and lora_B [{n}, r]; got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES):
        raise TypeError("bias must be a float32/bfloat16/float16 tensor")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    state.validate(packed)
    # The kernels take raw pointers: a tensor on another device would be read as garbage (or, on
    # meta, as uninitialised memory) instead of failing. Fake tensors under torch.compile all
    # report the device they stand in for, so this holds while tracing too.
    others = [("packed", packed), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)]
    others += [(f"state.{name}", getattr(state, name)) for name in ("absmax", "nested_absmax", "code", "nested_code", "offset")]
    for what, t in others:
        if t is not None and t.device != x.device:
            raise ValueError(f"{what} is on {t.device} but x is on {x.device}; qlora_linear needs every tensor on one device")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    x_lora = torch.nn.functional.dropout(x2, dropout, training=True) if (dropout > 0.0 and training) else None
    raw = packed.reshape(-1).view(torch.uint8) if packed.is_contiguous() else packed.contiguous().reshape(-1).view(torch.uint8)
    y, _ = QLoRALinearFunction.apply(
        x2, x_lora, raw, state.absmax, state.nested_absmax, state.nested_code, state.offset,
        state.blocksize, state.quant_type, [n, k], lora_A, lora_B, float(scale), bias,
    )
    return y.reshape(*lead, n)
