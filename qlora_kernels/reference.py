"""Pure-PyTorch specification of every op in the package.

Readable on purpose: no performance tricks. Every kernel (Triton, CUDA C++) is tested against these
functions, bit for bit where the op is exact (quantization) and by DESIGN.md section 6's tolerance
rule where it is not (matmuls). All arithmetic that defines a rounding is done in float32, one
operation at a time, exactly in the order written; kernels must not fuse (FMA) across those steps.

Shapes use n = numel of the weight, B = blocksize, nb = ceil(n / B).
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

import torch

from .formats import DYNAMIC_LUT_SIZE, get_code, num_blocks

# ---------------------------------------------------------------------------------------------
# 4-bit (NF4 / FP4) blockwise quantization
# ---------------------------------------------------------------------------------------------


def sorted_levels(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints [15] fp32, order [16] int64) for encoding a 4-bit code.

    The levels sorted ascending (a stable sort, so of FP4's two zeros index 0 comes before index 8;
    a value in (-0.0026, 0] encodes 0, one in (0, 0.0026] encodes 8), the 15 midpoints between neighbours, and `order[k]` = the code index of the k-th
    smallest level. NF4 is already sorted, so its order is the identity.
    """
    code = get_code(quant_type, device)
    values, order = torch.sort(code, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2
    return midpoints, order


def encode_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Code index (int64) of the level nearest to each value of `scaled` (fp32, in [-1, 1]).

    Nearest by midpoint thresholds with a strict `>`: a value exactly on a midpoint gets the
    lower level.
    """
    midpoints, order = sorted_levels(quant_type, scaled.device)
    # bucketize (right=False) counts the midpoints strictly below each value: the rank of its level.
    rank = torch.bucketize(scaled, midpoints)
    # NaN (reachable only with check_finite=False) is below no midpoint: rank 0, as in the kernels.
    rank = torch.where(torch.isnan(scaled), 0, rank)
    return order[rank]


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of `w` (any shape, fp32/bf16/fp16).

    Returns (packed uint8 [ceil(n/2), 1], absmax fp32 [nb]).
    Blocks are runs of B elements of w flattened row-major (a block may cross rows). Per block:
    absmax = max|x| in fp32; scaled = x * (1 / absmax) -- except in a final partial block, where
    bitsandbytes divides (x / absmax); an all-zero block scales by 1/1e-38 and so encodes 0.0.
    Packing: byte j = (q[2j] << 4) | q[2j+1], the first element in the HIGH nibble; for odd n the
    last low nibble encodes the value 0.0 (NF4 index 7, FP4 index 0).
    """
    x = w.reshape(-1).float()
    n = x.numel()
    nb = num_blocks(n, blocksize)
    full = (n // blocksize) * blocksize

    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    scaled = torch.empty(n, dtype=torch.float32, device=x.device)
    if full:
        blocks = x[:full].reshape(-1, blocksize)
        block_max = blocks.abs().amax(dim=1)
        absmax[: full // blocksize] = block_max
        inv = 1.0 / block_max.clamp(min=1e-38)
        scaled[:full] = (blocks * inv[:, None]).reshape(-1)
    if full < n:
        tail = x[full:]
        tail_max = tail.abs().amax()
        absmax[-1] = tail_max
        scaled[full:] = tail / tail_max.clamp(min=1e-38)
    scaled = scaled.clamp(-1.0, 1.0)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])

    q = encode_4bit(scaled, quant_type).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed.reshape(-1, 1), absmax


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Code indices (int64 [n]) from packed bytes: high nibble first."""
    p = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
    return q[:n]


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decode: out[i] = code[q[i]] * absmax[i // B] in fp32, then cast to `dtype` (round to nearest
    even). `absmax` is the fp32 per-block scale (decode double-quantized scales first)."""
    n = math.prod(shape)
    code = get_code(quant_type, packed.device)
    # Byte b decodes to the pair (code[b >> 4], code[b & 15]): one gather per byte.
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # [256, 2]
    values = pairs.index_select(0, packed.reshape(-1).view(torch.uint8).int()).reshape(-1)
    nb = absmax.numel()
    # One block per row; a partial last block (or an odd count's padding nibble) padded to full width.
    if values.numel() != nb * blocksize:
        values = torch.nn.functional.pad(values, (0, nb * blocksize - values.numel()))
    values = values.reshape(nb, blocksize).mul_(absmax.float()[:, None])  # values is our own buffer
    return values.reshape(-1)[:n].to(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise quantization with a dynamic map (double quantization; optimizer states)
# ---------------------------------------------------------------------------------------------


def dynamic_map_lut(code: torch.Tensor) -> torch.Tensor:
    """The lookup table the 8-bit encoder uses: uint8 [65536].

    Entry i is the code index nearest to the grid value v_i = -1 + (2 i) / 65535 (fp32 ops), found
    as the number of code midpoints m_j = 0.5 * (c_j + c_{j+1}) with m_j < v_i. This is how
    bitsandbytes 0.50 encodes on the CPU (its bit-exactness oracle here); it equals exact
    nearest-entry rounding except within half a grid step (1.5e-5) of a midpoint, which matters
    only for the densely spaced entries near zero.
    """
    c = code.float().cpu()
    midpoints = 0.5 * (c[:-1] + c[1:])
    i = torch.arange(DYNAMIC_LUT_SIZE, dtype=torch.float32)
    grid = -1.0 + (2.0 * i) / float(DYNAMIC_LUT_SIZE - 1)
    lut = (midpoints[None, :] < grid[:, None]).sum(1)
    return lut.to(torch.uint8).to(code.device)


def lut_index(normed: torch.Tensor) -> torch.Tensor:
    """Grid index (int64) of a normalised fp32 value: trunc((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5).

    NaN (only reachable with check_finite=False) maps to index 0.
    """
    v = torch.nan_to_num(normed, nan=-1.0).clamp(-1.0, 1.0)
    t = (v + 1.0) * 0.5
    t = t * float(DYNAMIC_LUT_SIZE - 1)
    t = t + 0.5
    return t.to(torch.int64)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of `x` with a 256-entry sorted `code`.

    Returns (q uint8, same shape as x; absmax fp32 [nb]). Per block: absmax = max|x| (fp32); an
    all-zero block stores index 0 (it decodes to 0 * code[0] = 0); else inv = 1 / absmax and
    q = lut[lut_index(x * inv)] with lut = dynamic_map_lut(code).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = num_blocks(n, blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    is_zero = absmax == 0
    inv = 1.0 / torch.where(is_zero, torch.ones_like(absmax), absmax)
    normed = padded * inv[:, None]
    q = cached_lut(code)[lut_index(normed)]
    q = torch.where(is_zero[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def cached_lut(code: torch.Tensor) -> torch.Tensor:
    """dynamic_map_lut(code), built once per device for the shipped maps (recognised by identity:
    get_code returns one tensor per device); any other code gets a fresh table. Building one costs
    ~0.4 s on a CPU, and an 8-bit optimizer requantizes every step."""
    for name in ("dynamic", "dynamic_unsigned"):
        if code is get_code(name, code.device):
            key = (name, code.device)
            if key not in _LUTS:
                _LUTS[key] = dynamic_map_lut(code)
            return _LUTS[key]
    return dynamic_map_lut(code)


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """out[i] = code[q[i]] * absmax[i // B] in fp32, cast to `dtype`."""
    flat = q.reshape(-1).to(torch.int64)
    block = torch.arange(flat.numel(), device=q.device) // blocksize
    return (code.float()[flat] * absmax.float()[block]).to(dtype).reshape(q.shape)


# ---------------------------------------------------------------------------------------------
# Double quantization of the 4-bit absmax (QLoRA's "DQ")
# ---------------------------------------------------------------------------------------------


def double_quant_offset(absmax: torch.Tensor) -> torch.Tensor:
    """The offset of double quantization, fp32 0-d: mean(absmax) by torch.mean in fp32, as
    bitsandbytes (its bits are part of the format). Only where that fp32 sum overflows although the
    mean is representable (finite weights near float32's limit), the mean taken in float64: an inf
    offset would decode every absmax to inf/NaN. Non-finite absmax keep the non-finite fp32 mean.
    A select, not a branch, so no device sync."""
    offset = absmax.float().mean()
    wide = absmax.double().mean().float()
    return torch.where(torch.isfinite(offset) | ~torch.isfinite(wide), offset, wide)


def double_quantize(absmax: torch.Tensor, nested_blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [nb], nested_absmax fp32 [ceil(nb/256)], offset fp32 0-d).

    offset = double_quant_offset(absmax); absmax - offset is quantized blockwise (blocks of 256)
    with the signed dynamic map.
    """
    offset = double_quant_offset(absmax)
    q, nested_absmax = quantize_blockwise(absmax.float() - offset, get_code("dynamic", absmax.device), nested_blocksize)
    return q, nested_absmax, offset


def double_dequantize(
    q: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """fp32 absmax: code2[q[i]] * nested_absmax[i // 256], then + offset (two fp32 roundings)."""
    return dequantize_blockwise(q, nested_absmax, nested_code, nested_blocksize, torch.float32) + offset.float()


# ---------------------------------------------------------------------------------------------
# QLoRA linear: Y = X @ dequant(W)^T + s * (X_lora @ A^T) @ B^T + bias, and its backward
# ---------------------------------------------------------------------------------------------
#
# Shapes: X [M, K] (callers flatten leading dims), W [N, K] stored 4-bit (packed uint8 + absmax,
# optionally double-quantized), A [r, K], B [N, r], bias [N], s a Python float.
# X_lora is X itself, or dropout(X) when LoRA dropout is active (then the LoRA input is not X).
# W is never trained: there is no gradient for it.


def dequantize_weight(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
) -> torch.Tensor:
    """The fp32 weight [N, K] a QLoRA linear multiplies by: double-dequantize the absmax (when
    nested_absmax is given, absmax is uint8), then dequantize_4bit in fp32."""
    if nested_absmax is not None:
        absmax = double_dequantize(absmax, nested_absmax, nested_code, offset)
    return dequantize_4bit(packed, absmax, blocksize, quant_type, shape, torch.float32)


def qlora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y [M, N], T [M, r]) in `compute_dtype`, every operand upcast to it first.

    weight: the dequantized W [N, K] (dequantize_weight). T = X_lora @ A^T is what the backward
    needs besides X; Y = X @ W^T + s * (T @ B^T) + bias.
    """
    cd = compute_dtype
    xl = x if x_lora is None else x_lora
    t = xl.to(cd) @ lora_A.to(cd).t()
    y = x.to(cd) @ weight.to(cd).t() + scale * (t @ lora_B.to(cd).t())
    if bias is not None:
        y = y + bias.to(cd)
    return y, t


def qlora_linear_backward(
    grad_out: torch.Tensor,
    x_lora: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    lora_dx: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX [M, K], dA [r, K], dB [N, r], dbias [N]) in `compute_dtype`, from dY = grad_out [M, N].

    With U = dY @ B [M, r]:
        dX = dY @ W + s * U @ A     (the LoRA term only when lora_dx; with dropout the caller
                                     routes s * U @ A through the dropout's backward instead)
        dA = s * U^T @ X_lora,   dB = s * dY^T @ T,   dbias = sum of dY over rows.
    """
    cd = compute_dtype
    dy = grad_out.to(cd)
    u = dy @ lora_B.to(cd)
    dx = dy @ weight.to(cd)
    if lora_dx:
        dx = dx + scale * (u @ lora_A.to(cd))
    da = scale * (u.t() @ x_lora.to(cd))
    db = scale * (dy.t() @ t.to(cd))
    return dx, da, db, dy.sum(0)


def lora_input_grad(
    grad_out: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """s * (dY @ B) @ A [M, K] in `compute_dtype`: the LoRA part of dX on its own (LoRA dropout)."""
    cd = compute_dtype
    return scale * ((grad_out.to(cd) @ lora_B.to(cd)) @ lora_A.to(cd))


# ---------------------------------------------------------------------------------------------
# AdamW (issue 5): one optimizer step with fp32 states or blockwise 8-bit states
# ---------------------------------------------------------------------------------------------
#
# Semantics of torch.optim.AdamW (decoupled weight decay, bias correction, no amsgrad), with the
# per-element arithmetic in the order torch's single-tensor path uses, so a run matches torch to
# float32 rounding. Hyperparameters are combined in Python float64 and each combination is rounded
# once to float32 (adamw_scalars): kernels receive exactly those float32 numbers.
#
# Per element, all float32, one rounding per operation, in this order (t = step >= 1):
#     p = p * decay                            decay = 1 - lr * weight_decay
#     m = m * beta1 + g * (1 - beta1)
#     v = v * beta2 + (g * g) * (1 - beta2)
#     denom = sqrt(v) / bc2_sqrt + eps         bc2_sqrt = sqrt(1 - beta2^t)
#     p = p - (step_size * m) / denom          step_size = lr / (1 - beta1^t)
# sqrt and the divisions are IEEE round-to-nearest (here via float64, see _sqrt_rn; kernels use
# sqrt_rn / div_rn), and nothing is fused (no FMA).
# The parameter is read and written in its own dtype (fp32/bf16/fp16; written back rounded to
# nearest even); the gradient may be any of those dtypes; states are fp32 or 8-bit.
#
# 8-bit states (the memory-saving variant): m and v are stored as quantize_blockwise codes of the
# signed ("dynamic", m) and unsigned ("dynamic_unsigned", v) maps, blocks of 256 contiguous
# elements, one fp32 absmax per block each. A step dequantizes both, runs the fp32 update above
# (the parameter sees the fresh fp32 m and v, not their requantized values), then requantizes
# with the same 65536-entry LUT encoder as quantize_blockwise. Tensors of fewer than
# ADAMW_8BIT_MIN_NUMEL elements keep fp32 states: their scales would cost more than they save and
# small tensors (biases, norms) are the ones most hurt by quantization noise.

ADAMW_8BIT_BLOCKSIZE = 256
ADAMW_8BIT_MIN_NUMEL = 4096


def _fp32(x: float) -> float:
    """The float32 nearest to x (round to nearest even), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", float(x)))[0]
    except OverflowError:  # beyond float32's range: what a float32 cast gives
        return math.copysign(math.inf, x)


def adamw_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> dict[str, float]:
    """The eight float32 constants of one AdamW step (exactly representable Python floats)."""
    if step < 1:
        raise ValueError(f"AdamW step count starts at 1, got {step}")
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return {
        "decay": _fp32(1.0 - lr * weight_decay),
        "beta1": _fp32(beta1),
        "one_minus_beta1": _fp32(1.0 - beta1),
        "beta2": _fp32(beta2),
        "one_minus_beta2": _fp32(1.0 - beta2),
        "step_size": _fp32(lr / bias_correction1),
        "bc2_sqrt": _fp32(bias_correction2**0.5),
        "eps": _fp32(eps),
    }


def adamw_update(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, m, v) after one step, all new fp32 tensors; `s` from adamw_scalars."""
    c = {k: torch.tensor(val, dtype=torch.float32, device=p.device) for k, val in s.items()}
    p = p.float() * c["decay"]
    g = g.float()
    m = m.float() * c["beta1"] + g * c["one_minus_beta1"]
    v = v.float() * c["beta2"] + (g * g) * c["one_minus_beta2"]
    denom = _div_rn(_sqrt_rn(v), c["bc2_sqrt"]) + c["eps"]
    p = p - _div_rn(c["step_size"] * m, denom)
    return p, m, v


# torch's float32 sqrt on AVX-512 CPUs is not correctly rounded (1 ulp off for ~0.7% of inputs,
# checked with torch 2.13), and its CUDA division by a scalar multiplies by the reciprocal. Both
# are computed in float64 and rounded once: for sqrt and division of float32 operands that double
# rounding still gives the correctly rounded float32 result (53 >= 2 * 24 + 2 bits).


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x.double()).float()


def _div_rn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() / b.double()).float()


def adamw_step_32bit(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> None:
    """One AdamW step in place: p (any float dtype), m and v fp32 of p's shape; step >= 1 is the
    count including this step."""
    s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    new_p, new_m, new_v = adamw_update(p, g, m, v, s)
    m.copy_(new_m)
    v.copy_(new_v)
    p.copy_(new_p.to(p.dtype))


def adamw_step_8bit(
    p: torch.Tensor, g: torch.Tensor,
    m_q: torch.Tensor, m_absmax: torch.Tensor, v_q: torch.Tensor, v_absmax: torch.Tensor,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
    blocksize: int = ADAMW_8BIT_BLOCKSIZE,
) -> None:
    """One AdamW step in place with 8-bit states: m_q, v_q uint8 of p's shape, m_absmax, v_absmax
    fp32 [ceil(numel / blocksize)]. Fresh states are all zeros (codes and absmax)."""
    code_m = get_code("dynamic", p.device)
    code_v = get_code("dynamic_unsigned", p.device)
    m = dequantize_blockwise(m_q, m_absmax, code_m, blocksize)
    v = dequantize_blockwise(v_q, v_absmax, code_v, blocksize)
    s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    new_p, m, v = adamw_update(p, g, m, v, s)
    q, absmax = quantize_blockwise(m, code_m, blocksize)
    m_q.copy_(q)
    m_absmax.copy_(absmax)
    q, absmax = quantize_blockwise(v, code_v, blocksize)
    v_q.copy_(q)
    v_absmax.copy_(absmax)
    p.copy_(new_p.to(p.dtype))

