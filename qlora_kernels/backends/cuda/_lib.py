"""ctypes binding of libqlora_kernels.so (csrc/qlora_kernels.h).

SIGNATURES is the one table of C signatures; argtypes/restype are derived from it, and
python_tests/test_csrc_signatures.py parses the header and fails when the two disagree (function
names, argument counts, C types, and the constants of CONSTANTS). Nothing here needs a GPU: loading
the library only dlopens it (its static CUDA runtime starts on the first CUDA call).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Optional

# Must equal QK_ABI_VERSION of the header the library was built from.
ABI_VERSION = 5

# Override of the library's location (tests, out-of-tree builds).
LIB_ENV = "QLORA_KERNELS_LIB"
DEFAULT_LIB_PATH = Path(__file__).resolve().parents[2] / "lib" / "libqlora_kernels.so"

# C type, spelled as in the header (pointer stars attached to the type) -> ctypes type.
C_TYPES = {
    "void": None,
    "int": ctypes.c_int,
    "float": ctypes.c_float,
    "int64_t": ctypes.c_int64,
    "size_t": ctypes.c_size_t,
    "const char*": ctypes.c_char_p,
    "void*": ctypes.c_void_p,
    "const void*": ctypes.c_void_p,
    "uint8_t*": ctypes.c_void_p,
    "const uint8_t*": ctypes.c_void_p,
    "float*": ctypes.c_void_p,
    "const float*": ctypes.c_void_p,
    "int32_t*": ctypes.c_void_p,
    "cudaStream_t": ctypes.c_void_p,
}

# name -> (return type, argument types), in header order.
SIGNATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "qk_abi_version": ("int", ()),
    "qk_last_error_message": ("const char*", ()),
    "qk_check_device": ("int", ("int",)),
    "qk_quantize_4bit": (
        "int",
        ("const void*", "int", "int64_t", "int64_t", "int", "uint8_t*", "float*", "cudaStream_t"),
    ),
    "qk_dequantize_4bit": (
        "int",
        ("const uint8_t*", "const void*", "const float*", "const float*", "const float*", "int64_t", "int64_t",
         "int", "void*", "int", "cudaStream_t"),
    ),
    "qk_dynamic_map_lut": ("int", ("const float*", "int64_t", "uint8_t*", "cudaStream_t")),
    "qk_quantize_blockwise": (
        "int",
        ("const void*", "int", "int64_t", "int64_t", "const uint8_t*", "uint8_t*", "float*", "cudaStream_t"),
    ),
    "qk_dequantize_blockwise": (
        "int",
        ("const uint8_t*", "const float*", "const float*", "int64_t", "int64_t", "void*", "int", "cudaStream_t"),
    ),
    "qk_gemv_4bit": (
        "int",
        ("const void*", "int", "int64_t", "const uint8_t*", "const void*", "const float*", "const float*",
         "const float*", "int64_t", "int64_t", "int64_t", "int", "const void*", "const void*", "const void*", "int",
         "int", "int64_t", "float", "float*", "const void*", "int", "int64_t", "float*", "int32_t*", "void*",
         "cudaStream_t"),
    ),
    "qk_gemv_4bit_workspace": ("int64_t", ("int64_t", "int64_t", "int64_t", "int64_t", "int64_t")),
    "qk_gemv_4bit_tile_rows": ("int64_t", ("int", "int64_t", "int64_t", "int64_t")),
    "qk_adamw_step_32bit": (
        "int",
        ("void*", "int", "const void*", "int", "float*", "float*", "int64_t") + ("float",) * 8 + ("cudaStream_t",),
    ),
    "qk_adamw_step_8bit": (
        "int",
        ("void*", "int", "const void*", "int", "uint8_t*", "float*", "uint8_t*", "float*", "int64_t", "int64_t",
         "const float*", "const float*", "const uint8_t*", "const uint8_t*") + ("float",) * 8 + ("cudaStream_t",),
    ),
    "qk_managed_alloc": ("void*", ("size_t", "int", "cudaStream_t")),
    "qk_managed_free": ("void", ("void*", "size_t", "int", "cudaStream_t")),
    "qk_prefetch": ("int", ("const void*", "size_t", "int", "cudaStream_t")),
}

# #define constants of the header that Python relies on.
CONSTANTS = {
    "QK_ABI_VERSION": ABI_VERSION,
    "QK_OK": 0,
    "QK_ERR_INVALID_ARGUMENT": 1,
    "QK_ERR_UNSUPPORTED_DTYPE": 2,
    "QK_ERR_MISALIGNED": 3,
    "QK_ERR_CUDA": 4,
    "QK_DTYPE_FLOAT32": 0,
    "QK_DTYPE_BFLOAT16": 1,
    "QK_DTYPE_FLOAT16": 2,
    "QK_QUANT_NF4": 0,
    "QK_QUANT_FP4": 1,
}

STATUS_NAMES = {v: k for k, v in CONSTANTS.items() if k.startswith(("QK_OK", "QK_ERR_"))}


class LibraryUnavailable(RuntimeError):
    """libqlora_kernels.so cannot be used (not built, unloadable, stale)."""


class KernelError(RuntimeError):
    """A csrc call returned QK_ERR_CUDA."""


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None


def library_path() -> Path:
    env = os.environ.get(LIB_ENV)
    return Path(env) if env else DEFAULT_LIB_PATH


def _load() -> ctypes.CDLL:
    return load_library(library_path())


def load_library(path: Path) -> ctypes.CDLL:
    """dlopen `path` and type every function of SIGNATURES (also used by the tests to load
    libqlora_kernels_emu.so, the same C API built for the CPU emulation)."""
    if not path.is_file():
        raise LibraryUnavailable(
            f"{path} is not built (install with nvcc on PATH: `pip install --no-build-isolation -e .`, or "
            "`cmake -S . -B build && cmake --build build -j`)"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise LibraryUnavailable(f"cannot load {path}: {e}") from None
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise LibraryUnavailable(f"{path} lacks {name}: a stale build; rebuild csrc") from None
        fn.restype = C_TYPES[restype]
        fn.argtypes = [C_TYPES[a] for a in argtypes]
    abi = lib.qk_abi_version()
    if abi != ABI_VERSION:
        raise LibraryUnavailable(f"{path} has ABI version {abi}, this package expects {ABI_VERSION}; rebuild csrc")
    return lib


def get_lib() -> ctypes.CDLL:
    """The loaded library (loaded once); raises LibraryUnavailable with the reason."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _load()
            except LibraryUnavailable as e:
                _error = str(e)
        if _lib is None:
            raise LibraryUnavailable(_error)
        return _lib


def try_lib() -> tuple[Optional[ctypes.CDLL], str]:
    try:
        return get_lib(), ""
    except LibraryUnavailable as e:
        return None, str(e)


def reset() -> None:
    """Forget a failed load (after building the library in the same process)."""
    global _error
    with _lock:
        _error = None


def last_error() -> str:
    lib = get_lib()
    msg = lib.qk_last_error_message()
    return msg.decode("utf-8", "replace") if msg else ""


def check(status: int, what: str) -> None:
    """Raise for a non-zero status: ValueError for bad arguments, KernelError for CUDA failures."""
    if status == 0:
        return
    name = STATUS_NAMES.get(status, f"status {status}")
    msg = f"{what} failed: {name}: {last_error()}"
    if status == CONSTANTS["QK_ERR_CUDA"]:
        raise KernelError(msg)
    raise ValueError(msg)
