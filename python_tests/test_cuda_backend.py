"""The CUDA C++ backend (csrc via ctypes) against reference.py, bit for bit. With a CUDA GPU and the
built library the kernels run there (bench/device_check.sh on a lent GPU); without one the same
tests run the same launchers, C API and kernel sources on the CPU under the csrc emulation
(csrc_emulation.py: libqlora_kernels_emu.so, every CUDA thread a fiber). The few tests of what only
a GPU has (streams, managed memory, the automatic backend choice) are skipped there, saying so.

The reference runs on the CPU (the spec's arithmetic), the kernels on the GPU; inputs are fresh
random data per case, with crafted blocks (exact midpoints, all-zero blocks), ragged sizes, and
misaligned (sliced) inputs that take the kernels' scalar paths. Outputs are poisoned before the
kernels write them (the caching allocator hands back a block just filled with 0xFF).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from qlora_kernels import reference as ref
from qlora_kernels.backends import cuda as C
from qlora_kernels.backends import use_backend
from qlora_kernels.backends.cuda import _lib
from qlora_kernels.backends.linear_strategy import use_linear_strategy
from qlora_kernels.formats import BLOCKSIZES_4BIT, get_code

from csrc_emulation import emulated_cuda_backend, guarded_copy
from helpers import check_counters, graph_and_two_stream_runs, guarded_counters

_GPU_OK, _GPU_WHY = C.available(torch.device("cuda"))
EMULATED = not _GPU_OK
DEV = "cpu" if EMULATED else "cuda"
gpu_only = pytest.mark.skipif(EMULATED, reason=f"needs the library on a GPU ({_GPU_WHY}); the CPU emulation has "
                                                "no streams, managed memory or CUDA device")


@pytest.fixture(scope="module", autouse=True)
def kernels_here(tmp_path_factory):
    """The real library on the GPU (None), or the emulated one patched into the backend on the
    CPU (its torch proxy)."""
    if not EMULATED:
        yield None
        return
    with emulated_cuda_backend(tmp_path_factory.mktemp("qk_emu")) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def _output_guards(kernels_here):
    """Under the emulation: after each test, no kernel wrote outside an output it was given."""
    yield
    if kernels_here is not None:
        kernels_here.check_guards()


# Inputs go to DEV as copies (dev, dev_empty): on the CPU a plain .to() would alias the
# reference's own tensors (the in-place optimizer steps would update one tensor twice), and under
# the emulation each copy ends at an unreadable page, so a kernel reading or writing past the end
# of an input faults (csrc_emulation.guarded_copy).


def dev(t: torch.Tensor) -> torch.Tensor:
    return guarded_copy(t) if EMULATED else t.to(DEV, copy=True)


def dev_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    return guarded_copy(torch.zeros(n, dtype=dtype)) if EMULATED else torch.empty(n, dtype=dtype, device=DEV)


def sync() -> None:
    if not EMULATED:
        torch.cuda.synchronize()

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_REF_LUT = ref.dynamic_map_lut


@pytest.fixture(autouse=True)
def _memo_reference_lut(monkeypatch):
    # reference.quantize_blockwise rebuilds its 65536-entry table on every call (about 0.25 s on
    # the CPU); the cases use three codes, so remember each table (same function, same result).
    cache: dict[bytes, torch.Tensor] = {}

    def memo(code: torch.Tensor) -> torch.Tensor:
        key = code.float().cpu().numpy().tobytes()
        if key not in cache:
            cache[key] = _REF_LUT(code)
        return cache[key].to(code.device)

    monkeypatch.setattr(ref, "dynamic_map_lut", memo)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.uint8: torch.uint8}


def poison(nbytes: int) -> None:
    """Fill a cached block of this size with 0xFF and free it: the next allocation gets it back.
    (Under the emulation the backend's torch.empty poisons every output itself.)"""
    if EMULATED:
        return
    t = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device="cuda")
    del t


def assert_bits_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    got, expected = got.cpu(), expected.cpu()
    assert got.dtype == expected.dtype and got.shape == expected.shape, (what, got.dtype, got.shape, expected.shape)
    g = got.reshape(-1).view(INT_VIEW[got.dtype])
    e = expected.reshape(-1).view(INT_VIEW[expected.dtype])
    same = g == e
    if got.is_floating_point():
        same |= torch.isnan(got.reshape(-1)) & torch.isnan(expected.reshape(-1))
    if not bool(same.all()):
        bad = (~same).nonzero().reshape(-1)
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} of {same.numel()} differ; first at {i}: "
                             f"got {got.reshape(-1)[i].item()!r}, expected {expected.reshape(-1)[i].item()!r}")


def crafted_weight(n: int, blocksize: int, quant_type: str, gen: torch.Generator) -> torch.Tensor:
    """Random normal, with block 0 = exact midpoints (and neighbours) times 4 and block 1 = 0."""
    w = torch.randn(n, generator=gen)
    mids, _ = ref.sorted_levels(quant_type)
    m4 = mids * 4.0
    special = torch.cat([torch.tensor([4.0]), m4, torch.nextafter(m4, torch.full_like(m4, 9.0)),
                         torch.nextafter(m4, torch.full_like(m4, -9.0))])
    k = min(special.numel(), blocksize, n)
    w[:k] = special[:k]
    if n >= 2 * blocksize:
        w[blocksize : 2 * blocksize] = 0.0
    return w


def scale_and_weight_args(absmax: torch.Tensor, nested: bool):
    """(fp32 per-block scale the reference decodes with, the kernels' (absmax, nested_absmax,
    nested_code, offset) on DEV): double-quantized by the reference when nested."""
    if not nested:
        return absmax, (dev(absmax), None, None, None)
    qa, a2, off = ref.double_quantize(absmax)
    dyn = get_code("dynamic")
    return ref.double_dequantize(qa, a2, dyn, off), (dev(qa), dev(a2), dev(dyn), dev(off))


def sizes_4bit(blocksize: int) -> list[int]:
    return [1, 7, 3 * blocksize + 5, 64 * blocksize + 37]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit(quant_type, blocksize, dtype):
    gen = torch.Generator().manual_seed(blocksize * 7 + DTYPES.index(dtype))
    for n in sizes_4bit(blocksize):
        w = crafted_weight(n, blocksize, quant_type, gen).to(dtype)
        exp_packed, exp_absmax = ref.quantize_4bit(w, blocksize, quant_type)
        for offset in (0, 1):  # 1: a sliced input, not 16-byte aligned (the scalar load path)
            src = dev_empty(n + offset, dtype)
            src[offset:] = dev(w)
            x = src[offset:]
            poison((n + 1) // 2)
            packed, absmax = C.quantize_4bit(x, blocksize, quant_type)
            sync()
            assert_bits_equal(absmax, exp_absmax, f"absmax n={n} offset={offset}")
            assert_bits_equal(packed, exp_packed, f"packed n={n} offset={offset}")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_4bit(quant_type, blocksize, nested):
    gen = torch.Generator().manual_seed(blocksize * 3 + nested)
    for n in sizes_4bit(blocksize):
        w = crafted_weight(n, blocksize, quant_type, gen) * 0.02
        packed, absmax = ref.quantize_4bit(w, blocksize, quant_type)
        scale, args = scale_and_weight_args(absmax, nested)
        for dtype in DTYPES:
            expected = ref.dequantize_4bit(packed, scale, blocksize, quant_type, (n,), dtype)
            for offset in (0, 1):  # 1: packed bytes at an odd address (the scalar path)
                raw = dev_empty(packed.numel() + offset, torch.uint8)
                raw[offset:] = dev(packed.reshape(-1))
                poison(n * expected.element_size())
                out = C.dequantize_4bit(raw[offset:], *args, blocksize, quant_type, (n,), dtype)
                sync()
                assert_bits_equal(out, expected, f"dequantize n={n} dtype={dtype} offset={offset}")


@pytest.mark.parametrize("code_name", ["dynamic", "dynamic_unsigned"])
def test_dynamic_map_lut(code_name):
    code = get_code(code_name)
    assert_bits_equal(C.dynamic_map_lut(dev(code)), _REF_LUT(code), code_name)
    random_code = torch.sort(torch.rand(256) * 2 - 1).values
    assert_bits_equal(C.dynamic_map_lut(dev(random_code)), _REF_LUT(random_code), "random code")


BLOCKSIZES_8BIT = (2, 4, 8, 32, 64, 256, 1024, 4096, 8192, 16384)


@pytest.mark.parametrize("blocksize", BLOCKSIZES_8BIT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("code_name", ["dynamic", "dynamic_unsigned"])
def test_quantize_dequantize_blockwise(blocksize, dtype, code_name):
    gen = torch.Generator().manual_seed(blocksize + DTYPES.index(dtype))
    code = get_code(code_name)
    for n in (1, 5, blocksize + 3, 5 * blocksize + 11, 100_003):
        x = torch.randn(n, generator=gen) * 3
        if code_name == "dynamic_unsigned":
            x = x.abs()
        if n >= 2 * blocksize and blocksize >= 256:
            crafted = torch.cat([torch.tensor([1.0]), code, 0.5 * (code[:-1] + code[1:])])
            k = min(crafted.numel(), blocksize)
            x[:k] = crafted[:k]
            x[blocksize : 2 * blocksize] = 0.0
        x = x.to(dtype)
        exp_q, exp_absmax = ref.quantize_blockwise(x, code, blocksize)
        for offset in (0, 1):
            src = dev_empty(n + offset, dtype)
            src[offset:] = dev(x)
            poison(n)
            q, absmax = C.quantize_blockwise(src[offset:], dev(code), blocksize)
            sync()
            assert_bits_equal(absmax, exp_absmax, f"absmax n={n} offset={offset}")
            assert_bits_equal(q, exp_q, f"q n={n} offset={offset}")
        for out_dtype in DTYPES:
            expected = ref.dequantize_blockwise(exp_q, exp_absmax, code, blocksize, out_dtype)
            for offset in (0, 1):
                raw = dev_empty(n + offset, torch.uint8)
                raw[offset:] = dev(exp_q)
                poison(n * expected.element_size())
                out = C.dequantize_blockwise(raw[offset:], dev(exp_absmax), dev(code), blocksize, out_dtype)
                sync()
                assert_bits_equal(out, expected, f"dequantize_blockwise n={n} dtype={out_dtype} offset={offset}")


def test_2d_shapes_and_double_quant_through_the_ops():
    # The public functions with the cuda backend forced, on a 2-D weight whose blocks cross rows.
    # (Double quantization's offset is a torch.mean, whose CUDA and CPU sums may round
    # differently, so the nested state is made by the reference and only decoded by the kernel.)
    import qlora_kernels as qk

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(37, 129, generator=gen).to(torch.bfloat16)
    with use_backend("reference"):
        p_ref, s_ref = qk.quantize_4bit(w, "nf4", 64, double_quant=True)
        d_ref = qk.dequantize_4bit(p_ref, s_ref, torch.bfloat16)
    _, exp_absmax = ref.quantize_4bit(w, 64, "nf4")
    with use_backend("cuda"):
        p, s = qk.quantize_4bit(dev(w), "nf4", 64, double_quant=False)
        d = qk.dequantize_4bit(dev(p_ref), s_ref.to(DEV), torch.bfloat16)
        q8, a8 = qk.quantize_blockwise(dev(exp_absmax) - dev(s_ref.offset), blocksize=256)
    sync()
    assert_bits_equal(p, p_ref, "packed")
    assert_bits_equal(s.absmax, exp_absmax, "absmax")
    assert_bits_equal(d, d_ref, "dequantized through the nested state")
    assert_bits_equal(q8, s_ref.absmax, "double-quantized absmax")
    assert_bits_equal(a8, s_ref.nested_absmax, "nested absmax")


@gpu_only
def test_runs_on_the_current_stream():
    # The kernel's input is written on a side stream after a long sleep there; only a launch on
    # that same stream (torch's current stream) is ordered after the write and sees real bytes.
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(4096 * 64 + 3, generator=gen)
    packed, absmax = ref.quantize_4bit(w, 64, "nf4")
    expected = ref.dequantize_4bit(packed, absmax, 64, "nf4", (w.numel(),), torch.float16)
    p, a = dev(packed), dev(absmax)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        late = torch.full_like(p, 0xFF)
        torch.cuda._sleep(50_000_000)
        late.copy_(p)
        out = C.dequantize_4bit(late, a, None, None, None, 64, "nf4", (w.numel(),), torch.float16)
    side.synchronize()
    assert_bits_equal(out, expected, "dequantize on a side stream")


def test_bad_arguments_raise():
    x = torch.randn(100, device=DEV)
    with pytest.raises(ValueError):
        C.quantize_4bit(x, 48, "nf4")
    with pytest.raises(ValueError):
        C.quantize_blockwise(x, get_code("dynamic", DEV), 3)
    with pytest.raises(TypeError):
        C.quantize_4bit(x.double(), 64, "nf4")
    lib = _lib.get_lib()
    assert lib.qk_dequantize_blockwise(1, 16, 16, 10, 4, 16, 7, None) == _lib.CONSTANTS["QK_ERR_UNSUPPORTED_DTYPE"]

    # The GEMV's LoRA term: the launcher's checks, then the C API's own.
    packed, absmax = ref.quantize_4bit(torch.randn(8, 64), 64, "nf4")
    packed, absmax = dev(packed), dev(absmax)
    wargs = (packed, absmax, None, None, None, 64, "nf4", (8, 64))
    xg, a = torch.randn(1, 64, device=DEV), torch.randn(4, 64, device=DEV)
    with pytest.raises(ValueError, match="go together"):
        C.gemv_4bit(xg, *wargs, lora_a=a)
    with pytest.raises(ValueError, match="lora_b"):
        C.gemv_4bit(xg, *wargs, lora_a=a, lora_b=torch.randn(8, 3, device=DEV))
    with pytest.raises(TypeError):
        C.gemv_4bit(xg, *wargs, lora_a=a, lora_b=torch.randn(8, 4, device=DEV, dtype=torch.float64))
    with pytest.raises(ValueError, match="x_lora"):
        C.gemv_4bit(xg, *wargs, lora_a=a, lora_b=torch.randn(8, 4, device=DEV), x_lora=torch.randn(2, 64, device=DEV))
    b, y, t = torch.randn(8, 4, device=DEV), torch.empty(1, 8, device=DEV), torch.empty(1, 4, device=DEV)
    ws_floats = lib.qk_gemv_4bit_workspace(1, 8, 64, 4, 1)
    assert ws_floats > 0 and lib.qk_gemv_4bit_workspace(1, 8, 64, 4, 0) == -1  # splits 0
    ws, counters = torch.empty(ws_floats, device=DEV), torch.zeros(10, dtype=torch.int32, device=DEV)
    call = (xg.data_ptr(), _lib.CONSTANTS["QK_DTYPE_FLOAT32"], 1, packed.data_ptr(), absmax.data_ptr(), None, None,
            None, 8, 64, 64, _lib.CONSTANTS["QK_QUANT_NF4"], None, a.data_ptr(), b.data_ptr())
    tail = (None, 0, 1, ws.data_ptr(), counters.data_ptr(), y.data_ptr(), None)  # bias, its dtype, splits, ...
    bad, bad_dtype = _lib.CONSTANTS["QK_ERR_INVALID_ARGUMENT"], _lib.CONSTANTS["QK_ERR_UNSUPPORTED_DTYPE"]
    assert lib.qk_gemv_4bit(*call, 0, 0, 0, 1.0, t.data_ptr(), *tail) == bad  # r = 0
    assert lib.qk_gemv_4bit(*call, 0, 0, 4, 1.0, None, *tail) == bad  # no T output
    assert lib.qk_gemv_4bit(*call, 0, 0, 4, 1.0, t.data_ptr(), None, 0, 1, None, counters.data_ptr(), y.data_ptr(),
                            None) == bad  # no workspace
    assert lib.qk_gemv_4bit(*call, 0, 0, 4, 1.0, t.data_ptr(), None, 0, 1, ws.data_ptr(), None, y.data_ptr(),
                            None) == bad  # no counters
    assert lib.qk_gemv_4bit(*call, 9, 0, 4, 1.0, t.data_ptr(), *tail) == bad_dtype  # A's dtype
    assert lib.qk_gemv_4bit(*call, 0, 9, 4, 1.0, t.data_ptr(), *tail) == bad_dtype  # B's dtype
    bias = torch.zeros(8, device=DEV)
    assert lib.qk_gemv_4bit(*call, 0, 0, 4, 1.0, t.data_ptr(), bias.data_ptr(), 9, *tail[2:]) == bad_dtype
    with pytest.raises(TypeError, match="bias"):
        C.gemv_4bit(xg, *wargs, bias=torch.zeros(8, device=DEV, dtype=torch.float64))
    assert lib.qk_gemv_4bit(*call, 0, 0, 4, 1.0, t.data_ptr(), *tail) == _lib.CONSTANTS["QK_OK"]
    sync()
    assert int(counters.abs().sum()) == 0  # the launch leaves its counters zero


@gpu_only
def test_managed_alloc_and_prefetch():
    lib = _lib.get_lib()
    dev = torch.cuda.current_device()
    stream = torch.cuda.current_stream().cuda_stream
    nbytes = 1 << 20  # small on purpose: never ask a lent GPU for much managed memory
    ptr = lib.qk_managed_alloc(nbytes, dev, stream)
    assert ptr, _lib.last_error()
    try:
        assert lib.qk_prefetch(ptr, nbytes, dev, stream) == 0, _lib.last_error()
        assert lib.qk_prefetch(ptr, nbytes, -1, stream) == 0, _lib.last_error()
        sync()
    finally:
        lib.qk_managed_free(ptr, nbytes, dev, stream)


# --- small-M GEMV (qlora_linear_fwd for M <= 16) ---
#
# Held to DESIGN.md section 6's rule against a float64 product of the reference's fp32 weight: max
# error <= 2x that of PyTorch in the activation dtype (W dequantized to it, then x @ W^T) plus
# ATOL_REL of the output's magnitude.

GEMV_ATOL_REL = 2.0**-20
GEMV_SHAPES = [  # (N, K, blocksize, quant_type): ragged N and K, K % blocksize != 0, odd K
    (200, 320, 64, "nf4"),
    (96, 200, 64, "nf4"),
    (64, 321, 32, "fp4"),
    (130, 256, 256, "nf4"),
    (512, 4096, 64, "nf4"),
]


def _gemv_inputs(m, n, k, blocksize, quant_type, dtype, nested, gen):
    w = torch.randn(n, k, generator=gen) * 0.05
    packed, absmax = ref.quantize_4bit(w, blocksize, quant_type)
    scale, wargs = scale_and_weight_args(absmax, nested)
    w32 = ref.dequantize_4bit(packed, scale, blocksize, quant_type, (n, k), torch.float32)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x, packed, wargs, w32


def _gemv_lora_case(x, n, r, nested, bias_dtype, gen):
    """The LoRA term s * T B^T (s = 0.5), T = X_lora A^T computed by the same launch: A [r, k] and
    B [n, r] in x's dtype, or (nested) A in fp32 beside B in x's dtype; X_lora a dropout-like variant
    of x; a bias of bias_dtype. Each operand is read in its own dtype by the kernel, none cast first.
    Returns (lora_a, lora_b, x_lora, T in float64, s * T B^T in float64, bias)."""
    m, k = x.shape
    lora_a = (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(torch.float32 if nested else x.dtype)
    lora_b = (torch.randn(n, r, generator=gen) * 0.1).to(x.dtype)
    x_lora = (x.float() * (torch.rand(m, k, generator=gen) > 0.1)).to(x.dtype)
    t_exact = x_lora.double() @ lora_a.double().t()
    addend = 0.5 * (t_exact @ lora_b.double().t())
    bias = (torch.randn(n, generator=gen) * 0.1).to(bias_dtype)
    return lora_a, lora_b, x_lora, t_exact, addend, bias


def _assert_within_rule(got, x, w32, addend, bias, what):
    exact = x.double() @ w32.double().t()
    low = (dev(x) @ dev(w32.to(x.dtype)).t()).cpu().double()
    if addend is not None:
        exact = exact + addend.double()
        low = low + addend.double()
    if bias is not None:
        exact = exact + bias.double()
        low = low + bias.double()
    assert torch.isfinite(got).all(), what
    err = (got.cpu().double() - exact).abs().max().item()
    err_torch = (low.to(x.dtype).double() - exact).abs().max().item()
    atol = GEMV_ATOL_REL * exact.abs().max().item()
    assert err <= 2 * err_torch + atol, f"{what}: max error {err:.3e} > 2 x PyTorch's {err_torch:.3e} + {atol:.1e}"


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}-bs{s[2]}-{s[3]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_matches_reference_by_the_rule(m, shape, dtype):
    n, k, blocksize, quant_type = shape
    gen = torch.Generator().manual_seed(m * 1000 + n + DTYPES.index(dtype))
    for nested in (False, True):
        x, packed, wargs, w32 = _gemv_inputs(m, n, k, blocksize, quant_type, dtype, nested, gen)
        # The bias in each of the three dtypes across the cases.
        lora_a, lora_b, x_lora, t_exact, addend, bias = _gemv_lora_case(
            x, n, 5, nested, DTYPES[(DTYPES.index(dtype) + nested) % 3], gen)
        for splits in (None, 1, 3):
            for xin in (dev(x), dev(torch.stack([x, x], 2).reshape(m, 2 * k))[:, ::2]):  # contiguous, strided
                poison(m * n * x.element_size())
                y, t = C.gemv_4bit(xin, dev(packed), *wargs, blocksize, quant_type, (n, k),
                                   lora_a=dev(lora_a), lora_b=dev(lora_b), lora_scale=0.5, x_lora=dev(x_lora),
                                   bias=dev(bias), splits=splits)
                sync()
                assert y.dtype == dtype and y.shape == (m, n)
                assert t.dtype == torch.float32 and t.shape == (m, 5)
                assert (t.cpu().double() - t_exact).abs().max().item() <= 1e-5 * t_exact.abs().max().item()
                _assert_within_rule(y, x, w32, addend, bias, f"m={m} nested={nested} splits={splits}")
        # Deterministic: the same call gives the same bits.
        y1, _ = C.gemv_4bit(dev(x), dev(packed), *wargs, blocksize, quant_type, (n, k), splits=3)
        y2, _ = C.gemv_4bit(dev(x), dev(packed), *wargs, blocksize, quant_type, (n, k), splits=3)
        assert_bits_equal(y1, y2, "repeat")


# The tensor-core GEMV (csrc/gemv_4bit.cu: gemv_4bit_mma_kernel) runs for bf16/fp16 X when K is a
# multiple of 128 and of the blocksize and its M * max(1, 128 / blocksize) (X row, block) columns fit
# 1, 2 or 4 column groups of 8 (CG). Cases: each blocks-per-span count (4 at blocksize 32, 2 at 64,
# 1 at 128 and above, blocks over several spans at 512) at each CG, M at each CG's limit and between
# (a group partly filled), N not a multiple of the 16-row tile (and under one tile), and more splits
# than spans.
MMA_GEMV_CASES = [  # (m, n, k, blocksize, quant_type)
    (1, 40, 256, 64, "nf4"),
    (4, 17, 384, 64, "fp4"),
    (2, 33, 512, 32, "nf4"),
    (1, 9, 128, 32, "nf4"),
    (8, 50, 256, 128, "nf4"),
    (3, 24, 1024, 512, "fp4"),
    (5, 40, 256, 64, "nf4"),      # CG 2, group 1 partly filled
    (8, 17, 384, 64, "fp4"),      # CG 2 at its limit
    (12, 9, 128, 128, "nf4"),     # CG 2, one block a span, N under one tile
    (16, 24, 1024, 512, "fp4"),   # CG 2 at M = 16
    (3, 33, 256, 32, "nf4"),      # CG 2, four blocks a span
    (16, 50, 512, 64, "nf4"),     # CG 4 at its limit: a Llama decode batch of 16
    (11, 20, 256, 64, "fp4"),     # CG 4, group 2 partly filled, group 3 empty
    (7, 33, 256, 32, "nf4"),      # CG 4, four blocks a span
]


def test_gemv_tile_rows_says_which_kernel_runs(monkeypatch):
    lib = _lib.get_lib()
    bf16, fp16, fp32 = C._dtype_code(torch.bfloat16, "x"), C._dtype_code(torch.float16, "x"), C._dtype_code(torch.float32, "x")
    for m, _n, k, blocksize, _q in MMA_GEMV_CASES:
        assert lib.qk_gemv_4bit_tile_rows(bf16, m, k, blocksize) == 16
        assert lib.qk_gemv_4bit_tile_rows(fp16, m, k, blocksize) == 16
        assert lib.qk_gemv_4bit_tile_rows(fp32, m, k, blocksize) == 1  # fp32 X: the FMA kernel
    assert lib.qk_gemv_4bit_tile_rows(bf16, 1, 4096, 64) == 16  # a Llama decode step
    assert lib.qk_gemv_4bit_tile_rows(bf16, 16, 4096, 64) == 16  # 16 rows x 2 blocks per span: 4 groups
    assert lib.qk_gemv_4bit_tile_rows(bf16, 16, 4096, 256) == 16  # 16 x 1: 2 groups
    assert lib.qk_gemv_4bit_tile_rows(bf16, 8, 4096, 32) == 16  # 8 x 4: 4 groups
    assert lib.qk_gemv_4bit_tile_rows(bf16, 9, 4096, 32) == 1  # 9 x 4 > 32 columns: the FMA kernel
    assert lib.qk_gemv_4bit_tile_rows(bf16, 1, 320, 64) == 1  # K % 128 != 0
    assert lib.qk_gemv_4bit_tile_rows(bf16, 1, 128, 256) == 1  # K % blocksize != 0: blocks cross rows
    assert lib.qk_gemv_4bit_tile_rows(bf16, 0, 4096, 64) == -1
    assert lib.qk_gemv_4bit_tile_rows(bf16, 1, 4096, 48) == -1
    assert lib.qk_gemv_4bit_tile_rows(7, 1, 4096, 64) == -1
    # Splits follow the kernel: on 132 SMs a 4096 x 4096 decode runs unsplit one row per warp, and in
    # 8 parts (4 spans of 128 each, the floor) with 16-row tiles (256 tiles for 2112 warps wanted).
    monkeypatch.setattr(C, "sm_count", lambda device: 132)
    assert C.gemv_splits(4096, 4096, torch.device(DEV), 1) == 1
    assert C.gemv_splits(4096, 4096, torch.device(DEV), 16) == 8


@pytest.mark.parametrize("case", MMA_GEMV_CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-bs{c[3]}-{c[4]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_tensor_core_kernel_matches_reference_by_the_rule(case, dtype, monkeypatch):
    """The tensor-core GEMV against float64 by the GEMV rule (the codes enter the tensor cores
    rounded to the activation dtype and the block scale multiplies the block's fp32 sum, where the
    FMA kernel scales each weight: both are held to the same rule), with the LoRA term, a bias and
    splits up to more than the K range has spans; every counter zero afterwards."""
    m, n, k, blocksize, quant_type = case
    lib = _lib.get_lib()
    assert lib.qk_gemv_4bit_tile_rows(C._dtype_code(dtype, "x"), m, k, blocksize) == 16, "not the tensor-core case"
    handed = guarded_counters(monkeypatch, C)
    gen = torch.Generator().manual_seed(7 * m + n + k + (dtype == torch.float16))
    launches = 0  # launches that take counters: every LoRA one, and the others when split
    for nested in (False, True):
        x, packed, wargs, w32 = _gemv_inputs(m, n, k, blocksize, quant_type, dtype, nested, gen)
        lora_a, lora_b, x_lora, t_exact, addend, bias = _gemv_lora_case(x, n, 3, nested, dtype, gen)
        for splits in (None, 1, 3, k // 128 + 2):
            poison(m * n * x.element_size())
            y, t = C.gemv_4bit(dev(x), dev(packed), *wargs, blocksize, quant_type, (n, k), lora_a=dev(lora_a),
                               lora_b=dev(lora_b), lora_scale=0.5, x_lora=dev(x_lora), bias=dev(bias), splits=splits)
            sync()
            assert (t.cpu().double() - t_exact).abs().max().item() <= 1e-5 * t_exact.abs().max().item()
            _assert_within_rule(y, x, w32, addend, bias, f"nested={nested} splits={splits}")
            # Without the LoRA term and bias: the weight stream alone.
            y0, _ = C.gemv_4bit(dev(x), dev(packed), *wargs, blocksize, quant_type, (n, k), splits=splits)
            sync()
            _assert_within_rule(y0, x, w32, None, None, f"no LoRA, nested={nested} splits={splits}")
            parts = C.gemv_splits(n, k, torch.device(DEV), 16) if splits is None else splits
            launches += 1 + (parts > 1)
    check_counters(handed, launches)


@pytest.mark.parametrize("splits", [1, 4])
def test_gemv_one_launch_leaves_counters_zero(splits, monkeypatch):
    """The one-launch decode GEMV with 16 T CTAs (K = 4096) and split rows: T and Y right, and every
    counter zero afterwards (a stream reuses one buffer for all its launches)."""
    handed = guarded_counters(monkeypatch, C)
    gen = torch.Generator().manual_seed(21 + splits)
    m, n, k = 3, 40, 4096
    x, packed, wargs, w32 = _gemv_inputs(m, n, k, 64, "nf4", torch.bfloat16, True, gen)
    lora_a = torch.randn(8, k, generator=gen) / math.sqrt(k)
    lora_b = torch.randn(n, 8, generator=gen) * 0.1
    y, t = C.gemv_4bit(dev(x), dev(packed), *wargs, 64, "nf4", (n, k), lora_a=dev(lora_a), lora_b=dev(lora_b),
                       lora_scale=2.0, splits=splits)
    sync()
    t_exact = x.double() @ lora_a.double().t()
    assert (t.cpu().double() - t_exact).abs().max().item() <= 1e-5 * t_exact.abs().max().item()
    _assert_within_rule(y, x, w32, 2.0 * t_exact @ lora_b.double().t(), None, f"splits={splits}")
    check_counters(handed, 1)


@gpu_only
def test_gemv_one_launch_under_cuda_graph_and_two_streams():
    """On the GPU: the one-launch GEMV (T CTAs, split rows, spin-wait on T) replayed from a CUDA
    graph (counters made inside the capture) and run on two streams at once (one counter buffer per
    stream) gives the eager launch's bits, with the split the GPU picks for a narrow N."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 1, 256, 4096
    x, packed, wargs, _ = _gemv_inputs(m, n, k, 64, "nf4", torch.bfloat16, True, gen)
    a = dev((torch.randn(16, k, generator=gen) / math.sqrt(k)).float())
    b = dev((torch.randn(n, 16, generator=gen) * 0.1).float())
    x, packed = dev(x), dev(packed)
    assert C.gemv_splits(n, k, x.device) > 1

    def run(inp):
        return C.gemv_4bit(inp, packed, *wargs, 64, "nf4", (n, k), lora_a=a, lora_b=b, lora_scale=2.0)

    (eager_y, eager_t), (static_y, static_t), outs = graph_and_two_stream_runs(run, x)
    assert_bits_equal(static_y, eager_y, "graph replay Y")
    assert_bits_equal(static_t, eager_t, "graph replay T")
    for y, t in outs:
        assert_bits_equal(y, eager_y, "two-stream decode Y")
        assert_bits_equal(t, eager_t, "two-stream decode T")


def test_gemv_misaligned_packed_and_x(monkeypatch):
    # packed at an odd address (the launcher realigns it, saying once that it copies the weight per
    # call), x at an odd element offset (scalar loads).
    gen = torch.Generator().manual_seed(3)
    x, packed, wargs, w32 = _gemv_inputs(4, 72, 264, 64, "nf4", torch.bfloat16, False, gen)
    raw = dev_empty(packed.numel() + 1, torch.uint8)
    raw[1:] = dev(packed.reshape(-1))
    xs = dev_empty(4 * 264 + 1, torch.bfloat16)
    xs[1:] = dev(x.reshape(-1))
    monkeypatch.setattr(C, "_realign_warned", False)
    with pytest.warns(UserWarning, match="copies it on every call"):
        y, _ = C.gemv_4bit(xs[1:].view(4, 264), raw[1:], *wargs, 64, "nf4", (72, 264))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        C.gemv_4bit(xs[1:].view(4, 264), raw[1:], *wargs, 64, "nf4", (72, 264))
    ref_y, _ = C.gemv_4bit(dev(x), dev(packed), *wargs, 64, "nf4", (72, 264))
    sync()
    assert_bits_equal(y, ref_y, "misaligned inputs")
    _assert_within_rule(y, x, w32, None, None, "misaligned")


def test_qlora_linear_fwd_op_small_m_and_delegation():
    # Through the op with the cuda backend forced: M <= 16 runs csrc (Y by the rule, T as the
    # reference computes it in fp32); M = 17 is handed to Triton (bit-identical to forcing it).
    import math

    gen = torch.Generator().manual_seed(11)
    n, k, r = 200, 320, 16
    w = torch.randn(n, k, generator=gen) * 0.05
    packed, absmax = ref.quantize_4bit(w, 64, "nf4")
    qa, a2, off = ref.double_quantize(absmax)
    dyn = get_code("dynamic")
    w32 = ref.dequantize_4bit(packed, ref.double_dequantize(qa, a2, dyn, off), 64, "nf4", (n, k), torch.float32)
    A = (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(torch.bfloat16)
    B = (torch.randn(n, r, generator=gen) * 0.1).to(torch.bfloat16)
    bias = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
    s = 2.0 / math.sqrt(r)
    wargs = (dev(packed), dev(qa), dev(a2), dev(dyn), dev(off), 64, "nf4", [n, k])
    for m in (1, 16, 17):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        with use_backend("cuda"):
            y, t = torch.ops.qlora.qlora_linear_fwd(dev(x), None, *wargs, dev(A), dev(B), s, dev(bias))
        sync()
        t_exact = x.double() @ A.double().t()
        assert t.dtype == torch.float32 and t.shape == (m, r)
        assert (t.cpu().double() - t_exact).abs().max().item() <= 1e-5 * t_exact.abs().max().item()
        if m > C.GEMV_MAX_M:
            with use_backend("triton"):
                y_tri, t_tri = torch.ops.qlora.qlora_linear_fwd(dev(x), None, *wargs, dev(A), dev(B), s, dev(bias))
            assert_bits_equal(y, y_tri, "M=17 delegated to Triton")
            continue
        lora = s * (t_exact @ B.double().t())
        _assert_within_rule(y, x, w32, lora, bias.float(), f"op m={m}")
    # The dequant_matmul strategy forced: csrc's GEMV steps aside at every M for Triton's
    # implementation of that strategy (dequantize, with csrc's kernel here, then a torch matmul).
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    with use_linear_strategy("dequant_matmul"):
        with use_backend("cuda"):
            y, _ = torch.ops.qlora.qlora_linear_fwd(dev(x), None, *wargs, dev(A), dev(B), s, dev(bias))
        with use_backend("triton"):
            y_tri, _ = torch.ops.qlora.qlora_linear_fwd(dev(x), None, *wargs, dev(A), dev(B), s, dev(bias))
    sync()
    assert_bits_equal(y, y_tri, "M=1 under dequant_matmul handed to Triton")


# --- AdamW steps: bit-identical to reference.adamw_step_* (run on the CPU) ---

HYPER = [(1e-3, 0.9, 0.999, 1e-8, 0.01, 1), (3e-2, 0.8, 0.95, 1e-6, 0.1, 7), (1e-4, 0.0, 0.99999, 1e-12, 0.0, 12345)]


@pytest.mark.parametrize("p_dtype", DTYPES)
@pytest.mark.parametrize("g_dtype", DTYPES)
def test_adamw_32bit_bit_identical(p_dtype, g_dtype):
    gen = torch.Generator().manual_seed(DTYPES.index(p_dtype) * 3 + DTYPES.index(g_dtype))
    for n in (1, 5, 1000, 4099):
        for offset in (0, 1):  # 1: every tensor at an odd element offset (the scalar path)
            p = (torch.randn(n, generator=gen)).to(p_dtype)
            g = (torch.randn(n, generator=gen) * 0.1).to(g_dtype)
            m = torch.randn(n, generator=gen) * 0.01
            v = torch.rand(n, generator=gen) * 1e-3
            gp, gg, gm, gv = (dev(torch.cat([t[:1], t]))[offset : offset + n] if offset else dev(t)
                              for t in (p, g, m, v))
            rp, rg, rm, rv = (dev(t) for t in (p, g, m, v))  # the reference backend on the GPU too
            for hyper in HYPER:
                ref.adamw_step_32bit(p, g, m, v, *hyper)
                ref.adamw_step_32bit(rp, rg, rm, rv, *hyper)
                C.adamw_step_32bit(gp, gg, gm, gv, *hyper)
            sync()
            for name, got, exp, exp_gpu in (("p", gp, p, rp), ("m", gm, m, rm), ("v", gv, v, rv)):
                assert_bits_equal(got, exp, f"{name} n={n} offset={offset}")
                assert_bits_equal(got, exp_gpu, f"{name} n={n} offset={offset} (reference on the GPU)")


@pytest.mark.parametrize("p_dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 2048])
def test_adamw_8bit_bit_identical(p_dtype, blocksize):
    gen = torch.Generator().manual_seed(blocksize + DTYPES.index(p_dtype))
    for n in (5, 3 * blocksize + 17, 40_000):
        nb = -(-n // blocksize)
        p = torch.randn(n, generator=gen).to(p_dtype)
        states = [torch.zeros(n, dtype=torch.uint8), torch.zeros(nb), torch.zeros(n, dtype=torch.uint8), torch.zeros(nb)]
        gpu = [dev(t) for t in [p] + states]
        ref_gpu = [dev(t) for t in [p] + states]  # the reference backend on the GPU too
        for step, hyper in enumerate(HYPER, 1):
            g = (torch.randn(n, generator=gen) * 0.1).to(p_dtype)
            if nb > 2:
                g[blocksize : 2 * blocksize] = 0.0  # a block whose states stay all zero
            ref.adamw_step_8bit(p, g, *states, *hyper[:5], step, blocksize)
            ref.adamw_step_8bit(ref_gpu[0], dev(g), *ref_gpu[1:], *hyper[:5], step, blocksize)
            C.adamw_step_8bit(gpu[0], dev(g), *gpu[1:], *hyper[:5], step, blocksize)
        sync()
        names = ("p", "m_q", "m_absmax", "v_q", "v_absmax")
        for name, got, exp, exp_gpu in zip(names, gpu, [p] + states, ref_gpu):
            assert_bits_equal(got, exp, f"{name} n={n}")
            assert_bits_equal(got, exp_gpu, f"{name} n={n} (reference on the GPU)")


@pytest.mark.parametrize("cls_name", ["PagedAdamW", "PagedAdamW8bit"])
def test_optimizer_with_the_cuda_backend_forced_matches_the_reference(cls_name, monkeypatch):
    """The optimizer's path into csrc: with the cuda backend forced the multi-tensor op is not
    there, so each parameter goes through the single-tensor op; 8-bit states for the large
    parameters, fp32 for the small one (< 4096 elements); three steps, bit for bit."""
    import qlora_kernels as qk

    cls = getattr(qk, cls_name)
    gen = torch.Generator().manual_seed(5)
    shapes = ((96, 50), (37,), (5000,))
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 0.1 for s in shapes] for _ in range(3)]
    calls = []
    for op in ("adamw_step_32bit", "adamw_step_8bit"):
        impl = C.IMPLS[op]
        monkeypatch.setitem(C.IMPLS, op, lambda *a, _impl=impl, _op=op: (calls.append(_op), _impl(*a))[1])
    runs = {}
    for backend, device in (("reference", "cpu"), ("cuda", DEV)):
        params = [torch.nn.Parameter(t.to(device, copy=True)) for t in init]
        opt = cls(params, lr=1e-2, weight_decay=0.1, paged=False)
        with use_backend(backend):
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.to(device, copy=True)
                opt.step()
        sync()
        runs[backend] = (params, opt)
    (ref_params, ref_opt), (params, opt) = runs["reference"], runs["cuda"]
    for a, b in zip(params, ref_params):
        assert_bits_equal(a.detach(), b.detach(), f"param {tuple(a.shape)}")
        for key, t in opt.state[a].items():
            if torch.is_tensor(t):
                assert_bits_equal(t, ref_opt.state[b][key], f"{key} of {tuple(a.shape)}")
    eight = cls_name == "PagedAdamW8bit"
    # csrc ran every update: 3 steps x (2 params of >= 4096 elements with 8-bit states, 1 fp32)
    assert calls.count("adamw_step_8bit") == (6 if eight else 0)
    assert calls.count("adamw_step_32bit") == (3 if eight else 9)
    if eight:
        assert "exp_avg_q" in opt.state[params[0]] and "exp_avg" in opt.state[params[1]]


@gpu_only
def test_adamw_ops_pick_the_cuda_backend():
    # Automatic choice on CUDA tensors: the single-tensor AdamW ops and qlora_linear_fwd come from
    # csrc; the multi-tensor ones are Triton's (not claimed by the cuda backend).
    from qlora_kernels.backends import get_impl

    dev = torch.device("cuda")
    for op in ("adamw_step_32bit", "adamw_step_8bit", "qlora_linear_fwd"):
        assert get_impl(op, dev)[0] == "cuda", op
    assert "adamw_step_32bit_multi" not in C.IMPLS and "qlora_linear_bwd" not in C.IMPLS
