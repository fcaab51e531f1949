"""Backend selection: which implementation of an op runs for a given device.

Backends: "reference" (pure PyTorch, reference.py), "triton" (backends/triton/), "cuda" (csrc via
ctypes, backends/cuda/). Each backend module exposes IMPLS: {op_name: callable} and a function
available(device) -> (bool, reason).

Choice, per call of a torch.ops.qlora op (see _ops.py):
  * forced: `with use_backend("triton"):` or env QLORA_KERNELS_BACKEND=triton. A forced backend that
    cannot run on the tensors' device (or lacks the op) raises BackendUnavailableError.
  * automatic: CUDA tensors try cuda, then triton, then reference, unless MEASURED_BACKEND_ORDER
    has a bench-measured order for that op on that GPU; CPU tensors use reference. A fallback past
    a preferred backend is announced once per (backend, reason) with a warning.

Triton on CPU tensors runs only under TRITON_INTERPRET=1 (set before triton kernels are defined):
that is how CI proves the GPU kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "QLORA_KERNELS_BACKEND"

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("qlora_backend", default=None)
_warned: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here (no GPU, no interpreter, library not built, op missing)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force `name` for every qlora op called inside the block (None: automatic choice)."""
    token = _forced.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend() -> Optional[str]:
    """The forced backend: the innermost use_backend(), else $QLORA_KERNELS_BACKEND, else None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    return _check_name(env)


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def availability(name: str, device: torch.device | str) -> tuple[bool, str]:
    """(can `name` run ops on `device`, why not)."""
    _check_name(name)
    device = torch.device(device)
    try:
        mod = _module(name)
    except ImportError as e:  # triton not installed, etc.
        return False, f"cannot import the {name} backend: {e}"
    check = getattr(mod, "available", None)
    if check is None:
        return False, f"the {name} backend is not complete in this build"
    return check(device)


def _impl_of(name: str, op: str):
    return getattr(_module(name), "IMPLS", {}).get(op)


# GPU name substring -> {op: kernel backends, fastest first}, as `python -m qlora_kernels bench`
# measured them on that GPU (it prints the entry to paste: bench.dispatch_suggestions). Ops and
# GPUs without an entry keep DEFAULT_CUDA_ORDER. No entry yet: no GPU has been measured.
MEASURED_BACKEND_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}
DEFAULT_CUDA_ORDER = ("cuda", "triton")


def _auto_order(device: torch.device, op: str) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("reference",)
    name = torch.cuda.get_device_name(device)
    for gpu, per_op in MEASURED_BACKEND_ORDER.items():
        if gpu in name and op in per_op:
            preferred = tuple(per_op[op])
            return preferred + tuple(b for b in DEFAULT_CUDA_ORDER if b not in preferred) + ("reference",)
    return DEFAULT_CUDA_ORDER + ("reference",)


def get_impl(op: str, device: torch.device) -> tuple[str, Callable]:
    """(backend name, implementation) of `op` for tensors on `device`.

    The kernel backends' QLoRA linear ops also choose per call between the fused kernels and
    dequantize + cuBLAS for their base GEMM (linear_strategy.py).
    """
    return _select(op, device)


def _select(op: str, device: torch.device) -> tuple[str, Callable]:
    forced = requested_backend()
    if forced is not None:
        ok, why = availability(forced, device)
        if not ok:
            raise BackendUnavailableError(f"backend {forced!r} was forced but cannot run on {device}: {why}")
        fn = _impl_of(forced, op)
        if fn is None:
            raise BackendUnavailableError(f"backend {forced!r} was forced but has no implementation of {op}")
        return forced, fn
    skipped = []
    for name in _auto_order(device, op):
        ok, why = availability(name, device)
        fn = _impl_of(name, op) if ok else None
        if fn is not None:
            for prev, prev_why in skipped:
                key = (prev, prev_why)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"qlora_kernels: {prev} backend unavailable ({prev_why}); using {name}", stacklevel=3)
            return name, fn
        if not ok:  # a backend that runs here but lacks this op is passed over silently
            skipped.append((name, why))
    raise BackendUnavailableError(f"no backend can run {op} on {device}: {skipped}")
