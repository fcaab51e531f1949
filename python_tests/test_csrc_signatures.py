"""The ctypes signature table (backends/cuda/_lib.py) must match csrc/qlora_kernels.h exactly.

Parses the header's QK_API declarations and #define constants; fails on a function missing on
either side, a different argument count, or a different C type. Also checks that the built library
(when there is one) exports every function, which needs no GPU.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from qlora_kernels.backends.cuda import _lib

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "qlora_kernels.h"

_DECL = re.compile(r"\bQK_API\s+([^;(]*?)\b(qk_\w+)\s*\(([^)]*)\)\s*;", re.S)
_DEFINE = re.compile(r"^\s*#\s*define\s+(QK_\w+)\s+(-?\d+)\b", re.M)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def normalize_type(t: str) -> str:
    """'const  uint8_t *' -> 'const uint8_t*'."""
    t = " ".join(t.split())
    t = re.sub(r"\s*\*\s*", "*", t)
    return t.strip()


def _param_type(param: str) -> str:
    param = normalize_type(param)
    # Drop the parameter name: the trailing identifier after a type (a lone type keeps its name).
    m = re.match(r"^(.*?[\w*])\s*\b([A-Za-z_]\w*)$", param)
    if m and m.group(1).strip() and not m.group(1).strip().endswith(("const", "struct")):
        return normalize_type(m.group(1))
    return param


def parse_header(text: str) -> tuple[dict[str, tuple[str, tuple[str, ...]]], dict[str, int]]:
    text = _strip_comments(text)
    funcs: dict[str, tuple[str, tuple[str, ...]]] = {}
    for ret, name, params in _DECL.findall(text):
        params = params.strip()
        args = () if params in ("", "void") else tuple(_param_type(p) for p in params.split(","))
        assert name not in funcs, f"{name} declared twice in the header"
        funcs[name] = (normalize_type(ret), args)
    consts = {k: int(v) for k, v in _DEFINE.findall(text)}
    return funcs, consts


def differences(header_funcs, table) -> list[str]:
    problems = []
    for name in sorted(set(header_funcs) - set(table)):
        problems.append(f"{name} is declared in the header but missing from _lib.SIGNATURES")
    for name in sorted(set(table) - set(header_funcs)):
        problems.append(f"{name} is in _lib.SIGNATURES but not declared in the header")
    for name in sorted(set(table) & set(header_funcs)):
        h_ret, h_args = header_funcs[name]
        t_ret, t_args = table[name][0], tuple(table[name][1])
        if h_ret != t_ret:
            problems.append(f"{name}: returns {h_ret!r} in the header, {t_ret!r} in the table")
        if len(h_args) != len(t_args):
            problems.append(f"{name}: {len(h_args)} arguments in the header, {len(t_args)} in the table")
        else:
            for i, (h, t) in enumerate(zip(h_args, t_args)):
                if h != t:
                    problems.append(f"{name} argument {i}: {h!r} in the header, {t!r} in the table")
    return problems


@pytest.fixture(scope="module")
def header():
    return parse_header(HEADER.read_text())


def test_header_parses_every_declaration(header):
    funcs, _ = header
    raw = _strip_comments(HEADER.read_text())
    assert len(funcs) == raw.count("QK_API ") - raw.count("#define QK_API"), "a QK_API declaration was not parsed"
    assert "qk_quantize_4bit" in funcs and "qk_managed_alloc" in funcs


def test_table_matches_header(header):
    funcs, _ = header
    assert differences(funcs, _lib.SIGNATURES) == []


def test_constants_match_header(header):
    _, consts = header
    for name, value in _lib.CONSTANTS.items():
        assert name in consts, f"{name} is not #defined in the header"
        assert consts[name] == value, f"{name} is {consts[name]} in the header, {value} in _lib.CONSTANTS"


def test_every_table_type_has_a_ctypes_mapping():
    for name, (ret, args) in _lib.SIGNATURES.items():
        for t in (ret, *args):
            assert t in _lib.C_TYPES, f"{name}: C type {t!r} has no ctypes mapping"
    # Widths that must not silently shrink.
    assert _lib.C_TYPES["int64_t"] is ctypes.c_int64
    assert _lib.C_TYPES["size_t"] is ctypes.c_size_t
    assert _lib.C_TYPES["cudaStream_t"] is ctypes.c_void_p


def test_pluggable_allocator_signatures(header):
    # torch.cuda.memory.CUDAPluggableAllocator calls alloc(size, device, stream) -> void* and
    # free(ptr, size, device, stream).
    funcs, _ = header
    assert funcs["qk_managed_alloc"] == ("void*", ("size_t", "int", "cudaStream_t"))
    assert funcs["qk_managed_free"] == ("void", ("void*", "size_t", "int", "cudaStream_t"))


def test_every_launch_takes_a_stream(header):
    funcs, _ = header
    # Queries that launch nothing (the GEMV's workspace size and tile rows are arithmetic on their
    # arguments and the device's compute capability).
    no_stream = {"qk_abi_version", "qk_last_error_message", "qk_check_device", "qk_gemv_4bit_workspace",
                 "qk_gemv_4bit_tile_rows"}
    for name, (_, args) in funcs.items():
        if name not in no_stream:
            assert args and args[-1] == "cudaStream_t", f"{name} must take the cudaStream_t as its last argument"


@pytest.mark.parametrize(
    "mutation, expected",
    [
        (lambda t: t.replace("int64_t n, int64_t blocksize,\n                            int quant_type",
                             "int n, int64_t blocksize,\n                            int quant_type"), "argument 2"),
        (lambda t: t.replace("QK_API int qk_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream);",
                             "QK_API int qk_prefetch(const void* ptr, size_t bytes, cudaStream_t stream);"), "arguments"),
        (lambda t: t.replace("QK_API int qk_abi_version(void);", "QK_API int qk_abi_version(void);\n"
                             "QK_API int qk_new_function(int x);"), "missing from _lib.SIGNATURES"),
        (lambda t: t.replace("QK_API const char* qk_last_error_message(void);", ""), "not declared in the header"),
    ],
)
def test_comparison_catches_drift(mutation, expected):
    text = HEADER.read_text()
    mutated = mutation(text)
    assert mutated != text, "the mutation no longer applies to the header; update this test"
    funcs, _ = parse_header(mutated)
    problems = differences(funcs, _lib.SIGNATURES)
    assert any(expected in p for p in problems), problems


def test_built_library_exports_the_table():
    if not _lib.library_path().is_file():
        pytest.skip(f"{_lib.library_path()} is not built (no nvcc when the package was installed)")
    lib = _lib.get_lib()  # binds every SIGNATURES entry; raises on a missing symbol
    assert lib.qk_abi_version() == _lib.ABI_VERSION
    assert lib.qk_quantize_4bit(None, 0, 10, 33, 0, None, None, None) == _lib.CONSTANTS["QK_ERR_INVALID_ARGUMENT"]
    assert "blocksize" in _lib.last_error()


class _FakeLib:
    """Stands in for the loaded library: every call is checked against SIGNATURES (argument count,
    and each argument accepted by its ctypes type, as the real binding would convert it)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self.returns = {"qk_gemv_4bit_workspace": 1000}  # floats of workspace (status 0 elsewhere)

    def __getattr__(self, name):
        if name not in _lib.SIGNATURES:
            raise AttributeError(name)
        _, argtypes = _lib.SIGNATURES[name]

        def call(*args):
            assert len(args) == len(argtypes), f"{name}: {len(args)} arguments, the table has {len(argtypes)}"
            for i, (a, t) in enumerate(zip(args, argtypes)):
                _lib.C_TYPES[t].from_param(a)  # raises TypeError / ArgumentError on a mismatch
                if t == "float":
                    assert isinstance(a, float), f"{name} argument {i} ({t}): {a!r}"
            self.calls.append((name, args))
            return self.returns.get(name, 0)

        return call


@pytest.fixture
def fake_lib(monkeypatch):
    import contextlib

    import torch

    from qlora_kernels.backends import cuda as C

    lib = _FakeLib()
    monkeypatch.setattr(_lib, "get_lib", lambda: lib)
    monkeypatch.setattr(C, "_stream", lambda device: 0)
    monkeypatch.setattr(C, "_require_cuda", lambda t, what: None)
    monkeypatch.setattr(C, "sm_count", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(C, "_state_tables", {})
    return lib


def test_launchers_call_the_library_as_the_table_says(fake_lib):
    # The launchers' argument plumbing, without a GPU: CPU tensors, a fake library that checks
    # every call against SIGNATURES. (The GPU tests run the real thing.)
    import torch

    from qlora_kernels import reference as ref
    from qlora_kernels.backends import cuda as C
    from qlora_kernels.formats import get_code

    w = torch.randn(40, 96)
    packed, absmax = ref.quantize_4bit(w, 64, "nf4")
    qa, a2, off = ref.double_quantize(absmax)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    A, B = torch.randn(4, 96), torch.randn(40, 4)
    y, t = C.qlora_linear_fwd(x, None, packed, qa, a2, get_code("dynamic"), off, 64, "nf4", [40, 96], A, B, 0.5,
                              torch.randn(40))
    assert y.shape == (3, 40) and y.dtype == torch.bfloat16 and t.shape == (3, 4) and t.dtype == torch.float32
    C.gemv_4bit(x, packed, absmax, None, None, None, 64, "nf4", [40, 96], splits=3)
    p = torch.randn(1000, dtype=torch.float16)
    C.adamw_step_32bit(p, torch.randn(1000), torch.zeros(1000), torch.zeros(1000), 1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
    C.adamw_step_8bit(p, torch.randn(1000), torch.zeros(1000, dtype=torch.uint8), torch.zeros(4),
                      torch.zeros(1000, dtype=torch.uint8), torch.zeros(4), 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, 256)
    names = [c[0] for c in fake_lib.calls]
    # splits None: the launcher asks which kernel runs (rows per warp) to choose them.
    assert names == ["qk_gemv_4bit_tile_rows", "qk_gemv_4bit_workspace", "qk_gemv_4bit", "qk_gemv_4bit_workspace",
                     "qk_gemv_4bit", "qk_adamw_step_32bit", "qk_dynamic_map_lut", "qk_dynamic_map_lut",
                     "qk_adamw_step_8bit"], names
    assert fake_lib.calls[0][1] == (1, 3, 96, 64)  # bf16 x, m, k, blocksize
    ws_lora, gemv_nested, ws_plain, gemv_plain = (c[1] for c in fake_lib.calls[1:5])
    assert ws_lora == (3, 40, 96, 4, gemv_nested[22]) and ws_plain == (3, 40, 96, 0, 3)
    assert gemv_nested[2] == 3 and gemv_nested[8:12] == (40, 96, 64, 0) and gemv_nested[5] is not None
    # The LoRA arguments: x_lora, A, B, A's and B's dtypes (fp32: 0), r, s, T out; none without LoRA.
    assert all(p is not None for p in gemv_nested[12:15]) and gemv_nested[15:19] == (0, 0, 4, 0.5)
    assert gemv_nested[19] is not None and gemv_nested[23] is not None and gemv_nested[24] is not None
    assert gemv_nested[20] is not None and gemv_nested[21] == 0  # the fp32 bias, as it is
    assert gemv_plain[12:15] == (None, None, None) and gemv_plain[17] == 0 and gemv_plain[19] is None
    assert gemv_plain[5:8] == (None, None, None) and gemv_plain[20] is None and gemv_plain[22] == 3
    assert gemv_plain[23] is not None and gemv_plain[24] is not None  # split sums: workspace, counters
    s = ref.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
    assert list(fake_lib.calls[5][1][7:15]) == [s[k] for k in ("decay", "beta1", "one_minus_beta1", "beta2",
                                                               "one_minus_beta2", "step_size", "bc2_sqrt", "eps")]
    assert fake_lib.calls[8][1][9] == 256


def test_qlora_linear_fwd_hands_large_m_to_triton(fake_lib, monkeypatch):
    import torch

    from qlora_kernels.backends import cuda as C

    seen = []
    monkeypatch.setattr(C, "_triton_qlora_linear_fwd", lambda device: lambda *args: seen.append(args) or "triton")
    x = torch.randn(C.GEMV_MAX_M + 1, 64)
    out = C.qlora_linear_fwd(x, None, None, None, None, None, None, 64, "nf4", [8, 64], torch.randn(2, 64),
                             torch.randn(8, 2), 1.0, None)
    assert out == "triton" and seen and seen[0][0] is x and not fake_lib.calls
