"""The CUDA C++ backend: csrc/ kernels through ctypes (libqlora_kernels.so, see _lib.py).

Launchers have exactly the signatures of backends/reference.py. Each allocates its outputs with
torch on the input's device, makes that device current, and launches on torch's current stream of
it (`torch.cuda.current_stream(device).cuda_stream`), so the kernels order with surrounding torch
work and never run on an implicit default stream.

Importing this module never needs a GPU or the library; available() says why it cannot run.

Ops claimed per shape: qlora_linear_fwd runs csrc's small-M kernel for M <= GEMV_MAX_M (decode)
and hands larger M to the Triton implementation (backends.get_impl picks a backend per op, not per
shape; csrc has no large-M GEMM). The _multi AdamW ops and qlora_linear_bwd are not claimed, so
the automatic choice takes Triton's for them.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch

from ... import reference as ref
from ...formats import check_blocksize, check_quant_type, get_code, num_blocks
from .._device import sm_count
from ..launch_counters import launch_counters
from ..linear_strategy import choose as choose_strategy
from . import _lib

DTYPE_CODES = {
    torch.float32: _lib.CONSTANTS["QK_DTYPE_FLOAT32"],
    torch.bfloat16: _lib.CONSTANTS["QK_DTYPE_BFLOAT16"],
    torch.float16: _lib.CONSTANTS["QK_DTYPE_FLOAT16"],
}
QUANT_CODES = {"nf4": _lib.CONSTANTS["QK_QUANT_NF4"], "fp4": _lib.CONSTANTS["QK_QUANT_FP4"]}
NESTED_BLOCKSIZE = 256
LUT_SIZE = 65536

_device_ok: dict[int, tuple[bool, str]] = {}


def available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the cuda backend runs CUDA tensors only (got device type {device.type!r})"
    lib, why = _lib.try_lib()
    if lib is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_ok:
        status = lib.qk_check_device(index)
        _device_ok[index] = (True, "") if status == 0 else (False, f"libqlora_kernels cannot run on cuda:{index}: {_lib.last_error()}")
    return _device_ok[index]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _dtype_code(dtype: torch.dtype, what: str) -> int:
    if dtype not in DTYPE_CODES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {dtype}")
    return DTYPE_CODES[dtype]


def _on(device: torch.device, t: torch.Tensor, what: str) -> None:
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, expected {device}")


def _check_pow2(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"the cuda backend needs a power-of-two blocksize >= 2, got {blocksize!r}")


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    code = _dtype_code(w.dtype, "the weight")
    x = w.contiguous()
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=x.device)
    if n:
        lib = _lib.get_lib()
        with torch.cuda.device(x.device):
            _lib.check(
                lib.qk_quantize_4bit(x.data_ptr(), code, n, blocksize, QUANT_CODES[quant_type], packed.data_ptr(),
                                     absmax.data_ptr(), _stream(x.device)),
                "qk_quantize_4bit",
            )
    return packed, absmax


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
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    out_code = _dtype_code(dtype, "dtype")
    device = packed.device
    n = math.prod(shape)
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if n == 0:
        return out
    raw, a, ptrs, _keep = _weight_pointers(packed, absmax, nested_absmax, nested_code, offset, n, blocksize, device)
    lib = _lib.get_lib()
    with torch.cuda.device(device):
        _lib.check(
            lib.qk_dequantize_4bit(raw.data_ptr(), a.data_ptr(), *ptrs, n, blocksize, QUANT_CODES[quant_type],
                                   out.data_ptr(), out_code, _stream(device)),
            "qk_dequantize_4bit",
        )
    return out


def dynamic_map_lut(code: torch.Tensor) -> torch.Tensor:
    """reference.dynamic_map_lut computed on the device (uint8 [65536] on code's device)."""
    c = code.float().contiguous()
    if not 2 <= c.numel() <= 256:
        raise ValueError(f"code must have 2..256 entries, got {c.numel()}")
    lut = torch.empty(LUT_SIZE, dtype=torch.uint8, device=c.device)
    lib = _lib.get_lib()
    with torch.cuda.device(c.device):
        _lib.check(lib.qk_dynamic_map_lut(c.data_ptr(), c.numel(), lut.data_ptr(), _stream(c.device)), "qk_dynamic_map_lut")
    return lut


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pow2(blocksize)
    in_code = _dtype_code(x.dtype, "the input")
    _on(x.device, code, "code")
    xc = x.contiguous()
    n = xc.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=x.device)
    if n == 0:
        return q, absmax
    # Rebuilt per call (one tiny kernel): a cache keyed on the code tensor could go stale.
    lut = dynamic_map_lut(code)
    lib = _lib.get_lib()
    with torch.cuda.device(x.device):
        _lib.check(
            lib.qk_quantize_blockwise(xc.data_ptr(), in_code, n, blocksize, lut.data_ptr(), q.data_ptr(),
                                      absmax.data_ptr(), _stream(x.device)),
            "qk_quantize_blockwise",
        )
    return q, absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    _check_pow2(blocksize)
    out_code = _dtype_code(dtype, "dtype")
    if q.dtype != torch.uint8:
        raise TypeError(f"q must be uint8, got {q.dtype}")
    device = q.device
    _on(device, absmax, "absmax")
    _on(device, code, "code")
    qc = q.contiguous()
    n = qc.numel()
    out = torch.empty(q.shape, dtype=dtype, device=device)
    if n == 0:
        return out
    a = absmax.float().contiguous()
    c = code.float().contiguous()
    if c.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {c.numel()}")
    if a.numel() < -(-n // blocksize):
        raise ValueError(f"absmax has {a.numel()} entries, {-(-n // blocksize)} needed")
    lib = _lib.get_lib()
    with torch.cuda.device(device):
        _lib.check(
            lib.qk_dequantize_blockwise(qc.data_ptr(), a.data_ptr(), c.data_ptr(), n, blocksize, out.data_ptr(),
                                        out_code, _stream(device)),
            "qk_dequantize_blockwise",
        )
    return out


# --- unified memory (for the paged optimizer) ---


def pluggable_allocator_args() -> tuple[str, str, str]:
    """(library path, alloc symbol, free symbol) for torch.cuda.memory.CUDAPluggableAllocator."""
    _lib.get_lib()
    return str(_lib.library_path()), "qk_managed_alloc", "qk_managed_free"


def prefetch(t: torch.Tensor, device: Optional[int] = None) -> None:
    """Migrate contiguous managed tensor `t` to GPU `device` (default: its own; -1: host memory),
    ordered on the current stream of t's device (the paged optimizer's state buffers)."""
    if not t.is_contiguous():
        raise ValueError("prefetch needs a contiguous tensor (it moves the bytes from data_ptr on)")
    dev = t.device.index if device is None else device
    lib = _lib.get_lib()
    with torch.cuda.device(t.device):
        _lib.check(lib.qk_prefetch(t.data_ptr(), t.numel() * t.element_size(), dev, _stream(t.device)), "qk_prefetch")


# --- small-M QLoRA linear forward (decode) ---

GEMV_MAX_M = 16
# Below this many chunks (32 weights) per split per row, splitting K costs more than it gains.
_GEMV_MIN_CHUNKS_PER_SPLIT = 64
# The same for the tensor-core kernel (tile_rows 16), which walks K in spans of 128 weights.
_GEMV_MIN_SPANS_PER_SPLIT = 4
_GEMV_MAX_SPLITS = 32


def gemv_splits(n: int, k: int, device: torch.device, tile_rows: int = 1) -> int:
    """How many parts each row's K range is cut into: enough warps (one per tile_rows rows and
    part; lib.qk_gemv_4bit_tile_rows says how many rows the kernel that runs gives a warp) for
    about two 8-warp CTAs per SM, never parts under _GEMV_MIN_CHUNKS_PER_SPLIT chunks (or
    _GEMV_MIN_SPANS_PER_SPLIT spans). Splits cost an fp32 round trip of the partial sums (added by
    each row's last split, in the same launch), so a 4096-row decode GEMV on the one-row-per-warp
    kernel runs unsplit, and on the 16-row one in about 8 parts."""
    want = -(-(sm_count(device) * 16) // max(-(-n // max(tile_rows, 1)), 1))
    if tile_rows > 1:
        most = max(1, (k // 128) // _GEMV_MIN_SPANS_PER_SPLIT)
    else:
        most = max(1, -(-k // 32) // _GEMV_MIN_CHUNKS_PER_SPLIT)
    return max(1, min(want, most, _GEMV_MAX_SPLITS))


_realign_warned = False


def _realign_copy(raw: torch.Tensor) -> torch.Tensor:
    """A fresh (so aligned) copy of packed bytes the kernels cannot read 16 bytes at a time, with a
    warning the first time: a per-call copy of the weight can cost more than the kernel itself."""
    global _realign_warned
    if not _realign_warned:
        _realign_warned = True
        warnings.warn(
            "qlora_kernels: a packed 4-bit weight is not contiguous and 16-byte aligned (a view into a "
            "larger tensor?), so the cuda backend copies it on every call; keep it in a tensor of its own "
            "(packed.clone()) to avoid the copy", stacklevel=4)
    return raw.clone()


def _weight_pointers(packed, absmax, nested_absmax, nested_code, offset, n_weights: int, blocksize: int, device):
    """(packed bytes 16-byte aligned, absmax, (nested_absmax, nested_code, offset) pointers or
    Nones, tensors to keep alive) checked against the weight's size."""
    nb = -(-n_weights // blocksize)
    raw = packed.reshape(-1).view(torch.uint8)
    if raw.numel() < (n_weights + 1) // 2:
        raise ValueError(f"packed holds {raw.numel()} bytes, the weight needs {(n_weights + 1) // 2}")
    if not raw.is_contiguous() or raw.data_ptr() % 16:
        raw = _realign_copy(raw)
    _on(device, raw, "packed")
    _on(device, absmax, "absmax")
    if nested_absmax is not None:
        if nested_code is None or offset is None:
            raise ValueError("double-quantized absmax needs nested_code and offset")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"double-quantized absmax must be uint8, got {absmax.dtype}")
        a = absmax.contiguous()
        a2 = nested_absmax.float().contiguous()
        code2 = nested_code.float().contiguous()
        off = offset.to(device=device, dtype=torch.float32).reshape(1).contiguous()
        _on(device, a2, "nested_absmax")
        _on(device, code2, "nested_code")
        if code2.numel() != 256:
            raise ValueError(f"nested_code must have 256 entries, got {code2.numel()}")
        if a2.numel() < -(-nb // NESTED_BLOCKSIZE):
            raise ValueError(f"nested_absmax has {a2.numel()} entries, {-(-nb // NESTED_BLOCKSIZE)} needed")
        ptrs = (a2.data_ptr(), code2.data_ptr(), off.data_ptr())
        keep = (raw, a, a2, code2, off)
    else:
        a = absmax.float().contiguous()
        ptrs = (None, None, None)
        keep = (raw, a)
    if a.numel() < nb:
        raise ValueError(f"absmax has {a.numel()} entries, {nb} needed at blocksize {blocksize}")
    return raw, a, ptrs, keep


def gemv_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None,
    lora_scale: float = 1.0,
    x_lora: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    splits: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(Y [M, N] of x.dtype, T fp32 [M, r] or None) in one launch (csrc/gemv_4bit.cu):
    T = x_lora [M, K] @ lora_a [r, K]^T (x_lora None: x) and Y = x [M <= 16, K] @ dequant(W [N, K])^T
    (+ lora_scale * T @ lora_b [N, r]^T) (+ bias), accumulated in fp32 and rounded once.
    splits None: gemv_splits()."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    x_code = _dtype_code(x.dtype, "x")
    n, k = int(shape[0]), int(shape[1])
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    m = x.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"the csrc GEMV takes M <= {GEMV_MAX_M}, got {m}")
    device = x.device
    _require_cuda(x, "x")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b go together")
    a_l = b_l = xl = bias_c = None
    r = a_code = b_code = bias_code = 0
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != k or lora_b.shape[0] != n \
                or lora_b.shape[1] != lora_a.shape[0] or lora_a.shape[0] < 1:
            raise ValueError(f"lora_a must be [r, {k}] and lora_b [{n}, r], got {tuple(lora_a.shape)} and "
                             f"{tuple(lora_b.shape)}")
        r = lora_a.shape[0]
        a_code = _dtype_code(lora_a.dtype, "lora_a")
        b_code = _dtype_code(lora_b.dtype, "lora_b")
        a_l, b_l = lora_a.contiguous(), lora_b.contiguous()
        _on(device, a_l, "lora_a")
        _on(device, b_l, "lora_b")
        xl = x if x_lora is None else x_lora
        if xl.shape != x.shape or xl.dtype != x.dtype:
            raise ValueError(f"x_lora must be like x ({tuple(x.shape)}, {x.dtype}), got {tuple(xl.shape)}, {xl.dtype}")
        xl = xl.contiguous()
        _on(device, xl, "x_lora")
    if bias is not None:
        bias_code = _dtype_code(bias.dtype, "bias")
        bias_c = bias.reshape(-1).contiguous()
        _on(device, bias_c, "bias")
        if bias_c.numel() != n:
            raise ValueError(f"bias must have {n} entries, got {bias_c.numel()}")
    y = torch.empty((m, n), dtype=x.dtype, device=device)
    t = torch.empty((m, r), dtype=torch.float32, device=device) if r else None
    if m == 0 or n == 0 or k == 0:  # nothing to stream: T = 0 and the epilogue alone
        if t is not None:
            t.zero_()
        acc = torch.zeros((m, n), dtype=torch.float32, device=device)
        if bias_c is not None:
            acc = acc + bias_c.float()
        y.copy_(acc)
        return y, t
    xc = x.contiguous()
    raw, a, ptrs, _keep = _weight_pointers(packed, absmax, nested_absmax, nested_code, offset, n * k, blocksize, device)
    lib = _lib.get_lib()
    if splits is None:
        splits = gemv_splits(n, k, device, lib.qk_gemv_4bit_tile_rows(x_code, m, k, blocksize))
    splits = int(splits)
    ws_floats = lib.qk_gemv_4bit_workspace(m, n, k, r, splits)
    if ws_floats < 0:
        raise ValueError(f"qk_gemv_4bit_workspace rejected m={m}, n={n}, k={k}, r={r}, splits={splits}")
    workspace = torch.empty(ws_floats, dtype=torch.float32, device=device) if ws_floats else None
    counters = launch_counters(device, 2 + (n if splits > 1 else 0)) if (r or splits > 1) else None
    with torch.cuda.device(device):
        _lib.check(
            lib.qk_gemv_4bit(xc.data_ptr(), x_code, m, raw.data_ptr(), a.data_ptr(), *ptrs, n, k, blocksize,
                             QUANT_CODES[quant_type], xl.data_ptr() if r else None, a_l.data_ptr() if r else None,
                             b_l.data_ptr() if r else None, a_code, b_code, r,
                             float(lora_scale), t.data_ptr() if r else None,
                             bias_c.data_ptr() if bias_c is not None else None, bias_code, splits,
                             workspace.data_ptr() if workspace is not None else None,
                             counters.data_ptr() if counters is not None else None, y.data_ptr(), _stream(device)),
            "qk_gemv_4bit",
        )
    return y, t


def _triton_qlora_linear_fwd(device: torch.device):
    from .. import BackendUnavailableError, availability

    ok, why = availability("triton", device)
    if not ok:
        raise BackendUnavailableError(
            f"the cuda backend runs qlora_linear_fwd only for M <= {GEMV_MAX_M} and hands larger M to "
            f"Triton, which cannot run here: {why}"
        )
    from ..triton.qlora_linear import qlora_linear_fwd as fwd

    return fwd


def qlora_linear_fwd(
    x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
    lora_A, lora_B, scale, bias,
):
    """The op qlora_linear_fwd: csrc's GEMV for M <= 16, one launch that also computes T = X_lora A^T
    (which the op returns) in fp32 and adds s * T B^T in its fp32 accumulator before the one
    rounding, as the Triton kernels do. Larger M, or the dequant_matmul linear strategy
    (linear_strategy.py): Triton's implementation, which runs that strategy."""
    if x.dim() == 2 and (x.shape[0] > GEMV_MAX_M or choose_strategy(x.shape[0], x.device) == "dequant_matmul"):
        return _triton_qlora_linear_fwd(x.device)(
            x, x_lora, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
            lora_A, lora_B, scale, bias)
    n, k = int(shape[0]), int(shape[1])
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != k or lora_B.shape[0] != n \
            or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not fit W {n}x{k}")
    return gemv_4bit(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
                     lora_a=lora_A, lora_b=lora_B, lora_scale=float(scale), x_lora=x_lora, bias=bias)


# --- AdamW steps ---

_ADAMW_ORDER = ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps")
_state_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def _adamw_scalars(lr, beta1, beta2, eps, weight_decay, step) -> list[float]:
    s = ref.adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    return [s[k] for k in _ADAMW_ORDER]


def _require_cuda(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"the cuda backend takes CUDA tensors only, got {what} on {t.device}")


def _check_adamw(p: torch.Tensor, g: torch.Tensor, states: dict) -> None:
    _require_cuda(p, "a parameter")
    _dtype_code(p.dtype, "the parameter")
    _dtype_code(g.dtype, "the gradient")
    if g.shape != p.shape:
        raise ValueError(f"grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
    _on(p.device, g, "the gradient")
    for name, (t, dtype, numel) in states.items():
        if t.dtype != dtype or t.numel() != numel or not t.is_contiguous() or t.device != p.device:
            raise ValueError(
                f"AdamW state {name} must be a contiguous {dtype} tensor of {numel} elements on {p.device}, "
                f"got {t.dtype} with {t.numel()} elements on {t.device}"
            )


def adamw_step_32bit(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    n = p.numel()
    _check_adamw(p, g, {"m": (m, torch.float32, n), "v": (v, torch.float32, n)})
    scalars = _adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    if n == 0:
        return
    pc = p if p.is_contiguous() else p.contiguous()
    gc = g.contiguous()
    lib = _lib.get_lib()
    with torch.cuda.device(p.device):
        _lib.check(
            lib.qk_adamw_step_32bit(pc.data_ptr(), DTYPE_CODES[p.dtype], gc.data_ptr(), DTYPE_CODES[g.dtype],
                                    m.data_ptr(), v.data_ptr(), n, *scalars, _stream(p.device)),
            "qk_adamw_step_32bit",
        )
    if pc is not p:
        p.copy_(pc)


def _adamw_8bit_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """(code_m, code_v, lut_m, lut_v) of the state maps on `device`, built once per device."""
    if device not in _state_tables:
        code_m = get_code("dynamic", device).float().contiguous()
        code_v = get_code("dynamic_unsigned", device).float().contiguous()
        tables = (code_m, code_v, dynamic_map_lut(code_m), dynamic_map_lut(code_v))
        if device.type == "cuda":
            # Built on the caller's stream but kept for every later step, on any stream: wait
            # until they are written, once.
            torch.cuda.current_stream(device).synchronize()
        _state_tables[device] = tables
    return _state_tables[device]


def adamw_step_8bit(p, g, m_q, m_absmax, v_q, v_absmax, lr, beta1, beta2, eps, weight_decay, step, blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 8 <= blocksize <= 4096 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"the cuda 8-bit AdamW step needs a power-of-two blocksize in 8..4096, got {blocksize!r}")
    n = p.numel()
    nb = num_blocks(n, blocksize)
    _check_adamw(p, g, {"m_q": (m_q, torch.uint8, n), "m_absmax": (m_absmax, torch.float32, nb),
                        "v_q": (v_q, torch.uint8, n), "v_absmax": (v_absmax, torch.float32, nb)})
    scalars = _adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    if n == 0:
        return
    code_m, code_v, lut_m, lut_v = _adamw_8bit_tables(p.device)
    pc = p if p.is_contiguous() else p.contiguous()
    gc = g.contiguous()
    lib = _lib.get_lib()
    with torch.cuda.device(p.device):
        _lib.check(
            lib.qk_adamw_step_8bit(pc.data_ptr(), DTYPE_CODES[p.dtype], gc.data_ptr(), DTYPE_CODES[g.dtype],
                                   m_q.data_ptr(), m_absmax.data_ptr(), v_q.data_ptr(), v_absmax.data_ptr(), n,
                                   blocksize, code_m.data_ptr(), code_v.data_ptr(), lut_m.data_ptr(),
                                   lut_v.data_ptr(), *scalars, _stream(p.device)),
            "qk_adamw_step_8bit",
        )
    if pc is not p:
        p.copy_(pc)


IMPLS = {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
    "qlora_linear_fwd": qlora_linear_fwd,
    "adamw_step_32bit": adamw_step_32bit,
    "adamw_step_8bit": adamw_step_8bit,
}
