"""Runs the cuda backend (backends/cuda/: the Python launchers, the C API and the csrc kernels
themselves) on the CPU, with libqlora_kernels_emu.so in place of the real library: the same .cu
sources compiled by the host compiler with csrc/emu/qk_cuda_emu.h, every CUDA thread a fiber.

`emulated_cuda_backend()` builds that library (CMake, host compiler only, a few seconds) and
patches the backend for CPU tensors: its `torch` becomes a proxy whose `empty` returns poisoned
memory (0xFF bytes, so an element a kernel fails to write shows) between guard bands (so a write
past either end shows) and whose `cuda.device` / `cuda.current_stream` are no-ops; `_lib.get_lib` returns the emulated library; `available` says
yes for the CPU. Nothing outside the backend module changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qlora_kernels.backends import cuda as cuda_backend
from qlora_kernels.backends.cuda import _lib

from helpers import build_host_target

# qk_emu::kSmCount of csrc/emu/qk_cuda_emu.h: few SMs, so grid-stride loops take several turns.
EMULATED_SM_COUNT = 2


def build_emulated_library(build_dir: Path) -> Path:
    lib = build_host_target(build_dir, "qlora_kernels_emu", "the csrc CPU emulation") / "libqlora_kernels_emu.so"
    assert lib.is_file()
    return lib


class _CudaOnCpu:
    """torch.cuda as the backend sees it under the emulation."""

    @staticmethod
    def device(_device):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(_device=None):
        return SimpleNamespace(cuda_stream=0)

    @staticmethod
    def current_device():
        return 0

    @staticmethod
    def get_device_properties(_index):
        return SimpleNamespace(multi_processor_count=EMULATED_SM_COUNT)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE


def guarded_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` (CPU) that ends where an unreadable page begins: a kernel that reads or writes
    past the end of an input takes a segmentation fault instead of reading a neighbour's bytes.
    The end is rounded up to 16 bytes (so the copy stays 16-byte aligned for the vector paths);
    those few padding bytes are 0xFF, so an over-read whose value is used still shows."""
    t = t.detach().contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return t.clone()
    span = -(-nbytes // 16) * 16
    pages = -(-span // _PAGE)
    region = mmap.mmap(-1, (pages + 1) * _PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    if _libc.mprotect(ctypes.c_void_p(base + pages * _PAGE), ctypes.c_size_t(_PAGE), 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")
    raw = torch.frombuffer(region, dtype=torch.uint8, count=pages * _PAGE)
    start = pages * _PAGE - span
    raw[start + nbytes:start + span] = 0xFF
    out = raw[start:start + nbytes]
    out.copy_(t.reshape(-1).view(torch.uint8))
    return out.view(t.dtype).view(t.shape)


GUARD_BYTES = 64  # keeps the 64-byte alignment of torch's CPU allocations for the tensor between


class _TorchOnCpu:
    """torch as the backend sees it under the emulation: every output comes back poisoned (0xFF
    bytes) and sits between two guard bands of 0xFF bytes, which check_guards() reads back: a
    kernel that writes past either end of an output it was given is caught (memcheck's job on a
    GPU, for writes)."""

    cuda = _CudaOnCpu()

    def __init__(self):
        self.guarded: list[tuple[torch.Tensor, int]] = []

    def empty(self, *args, **kwargs):
        t = torch.empty(*args, **{**kwargs, "device": "meta"})  # shape and dtype only, no memory
        if t.numel() == 0:
            return torch.empty(*args, **kwargs)
        nbytes = t.numel() * t.element_size()
        buf = torch.full((nbytes + 2 * GUARD_BYTES,), 0xFF, dtype=torch.uint8)
        self.guarded.append((buf, nbytes))
        return buf[GUARD_BYTES:GUARD_BYTES + nbytes].view(t.dtype).view(t.shape)

    def check_guards(self) -> None:
        for buf, nbytes in self.guarded:
            for name, band in (("before", buf[:GUARD_BYTES]), ("after", buf[GUARD_BYTES + nbytes:])):
                if not bool((band == 0xFF).all()):
                    raise AssertionError(f"a kernel wrote {name} the {nbytes}-byte output it was given")
        self.guarded.clear()

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def emulated_cuda_backend(build_dir: Path):
    """Yields the backend's torch proxy (call its check_guards() after each test)."""
    lib = _lib.load_library(build_emulated_library(build_dir))
    proxy = _TorchOnCpu()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_backend, "torch", proxy)
        mp.setattr(_lib, "get_lib", lambda: lib)
        mp.setattr(cuda_backend, "available", lambda device: (True, ""))
        mp.setattr(cuda_backend, "_require_cuda", lambda t, what: None)
        mp.setattr(cuda_backend, "sm_count", lambda device: EMULATED_SM_COUNT)
        yield proxy
