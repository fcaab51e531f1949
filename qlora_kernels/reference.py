"""Pure-PyTorch specification of every op in the package.

Readable on purpose: no performance tricks. Every kernel (Triton, CUDA C++) is tested against these
functions, bit for bit where the op is exact (quantization) and by DESIGN.md section 6's tolerance
rule where it is not (matmuls). All arithmetic that defines a rounding is done in float32, one
operation at a time, exactly in the order written; kernels must not fuse (FMA) across those steps.

Shapes use n = numel of the weight, B = blocksize, nb = ceil(n / B).
"""

from __future__ import annotations

import math
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
    rank = (scaled.unsqueeze(-1) > midpoints).sum(-1)
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
    q = unpack_4bit(packed, n)
    code = get_code(quant_type, packed.device)
    block = torch.arange(n, device=packed.device) // blocksize
    values = code[q] * absmax.float()[block]
    return values.to(dtype).reshape(shape)


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
    lut = dynamic_map_lut(code)
    q = lut[lut_index(normed)]
    q = torch.where(is_zero[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


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


def double_quantize(absmax: torch.Tensor, nested_blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [nb], nested_absmax fp32 [ceil(nb/256)], offset fp32 0-d).

    offset = mean(absmax) (torch.mean in fp32, as bitsandbytes); absmax - offset is quantized
    blockwise (blocks of 256) with the signed dynamic map.
    """
    offset = absmax.float().mean()
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
