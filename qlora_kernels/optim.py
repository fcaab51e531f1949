"""Paged AdamW: AdamW whose states (fp32 or blockwise 8-bit) live in CUDA unified memory.

    PagedAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, paged=True)
    PagedAdamW8bit(params, ...same...)

torch.optim.Optimizer API (param groups, schedulers changing group["lr"], zero_grad, state_dict /
load_state_dict), AdamW semantics of torch.optim.AdamW (decoupled weight decay, bias correction).
The update is one fused op per batch of parameters (same group, device and step count):
qlora::adamw_step_32bit_multi / adamw_step_8bit_multi (spec: reference.adamw_step_*, applied to
each tensor; kernels: backends/triton/adamw.py), its backend chosen per device like every op.

8-bit: m and v quantized blockwise (256 elements, signed / unsigned dynamic map, fp32 absmax
per block): 2 + 8/256 bytes of state per element instead of 8. Tensors of fewer than 4096 elements
keep fp32 states (reference.ADAMW_8BIT_MIN_NUMEL).

Paging (CUDA only, paged=True): the states of one parameter are views into one buffer per dtype,
allocated from a torch.cuda.MemPool over a CUDAPluggableAllocator whose alloc/free are csrc's
qk_managed_alloc / qk_managed_free (cudaMallocManaged / cudaFree). They are ordinary CUDA tensors
to torch; when GPU memory runs short the driver pages them to host RAM instead of failing. Before
each step their buffers are prefetched to the GPU on the current stream (qk_prefetch, only where
the device reports concurrent managed access); page_out() sends them to host memory between steps.
The pool is one per device for the process: a dead optimizer's state memory returns to it and the
next optimizer reuses it. Where that is not possible (no libqlora_kernels.so, torch without
MemPool / use_mem_pool / CUDAPluggableAllocator (checked by feature, not version: torch 2.13 has
them, so does the 2.11 of the lent GPU machines), a device without
managed memory), states use ordinary CUDA memory and a warning says why, once. On the CPU states
are ordinary memory.

Parameters may be named, as torch.optim (>= 2.6) takes them: PagedAdamW(model.named_parameters())
or groups of (name, tensor) pairs; the names are kept in group["param_names"] and in state_dict().
load_state_dict runs the hooks of register_load_state_dict_pre_hook / _post_hook as torch.optim's.

Invalid input (sparse or complex tensors, a parameter listed twice, named and unnamed params mixed,
lr < 0, betas outside [0, 1), eps < 0, weight_decay < 0, a state_dict from another optimizer or of
other shapes) raises ValueError / TypeError before anything is changed.
"""

from __future__ import annotations

import ctypes
import functools
import math
import numbers
import threading
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch

from . import _ops  # noqa: F401  (registers torch.ops.qlora.*)
from .backends import BackendUnavailableError
from .formats import num_blocks
from .reference import ADAMW_8BIT_BLOCKSIZE, ADAMW_8BIT_MIN_NUMEL

__all__ = ["PagedAdamW", "PagedAdamW8bit", "managed_memory_support", "is_managed"]

# Marker in state_dict(): which optimizer (and state layout) wrote it.
STATE_DICT_KEY = "qlora_kernels"
STATE_DICT_VERSION = 1
# Byte alignment of each state tensor inside a parameter's buffer (vectorised loads, and the
# 4-byte element alignment that viewing bytes as fp32 needs).
_ALIGN = 64
_FLOAT_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))

# ---------------------------------------------------------------------------------------------
# Unified memory: capability checks, the managed pool, prefetch
# ---------------------------------------------------------------------------------------------

_warned: set[str] = set()
_lock = threading.Lock()
_allocator: Any = None
_pools: dict[int, Any] = {}
_support: dict[int, tuple[bool, bool, str]] = {}

# CUDA driver API constants (cuda.h).
_CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY = 83
_CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS = 89
_CU_POINTER_ATTRIBUTE_IS_MANAGED = 8
_HOST = -1  # qk_prefetch's destination for host memory (cudaCpuDeviceId)


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _libcuda() -> ctypes.CDLL:
    # The driver library is present wherever torch sees a GPU; cuInit is idempotent.
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuInit.argtypes = [ctypes.c_uint]
    if lib.cuInit(0) != 0:
        raise RuntimeError("cuInit failed")
    lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.cuDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
    lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    return lib


def _device_attribute(index: int, attribute: int) -> int:
    lib = _libcuda()
    dev = ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
        raise RuntimeError(f"cuDeviceGet({index}) failed")
    value = ctypes.c_int()
    if lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, dev.value) != 0:
        raise RuntimeError(f"cuDeviceGetAttribute({attribute}) failed on device {index}")
    return value.value


def is_managed(t: torch.Tensor) -> bool:
    """Whether a CUDA tensor's memory is CUDA managed (unified) memory (cuPointerGetAttribute)."""
    if t.device.type != "cuda" or t.numel() == 0:
        return False
    data = ctypes.c_uint64(0)  # the driver writes a boolean; zero-filled so any width reads right
    out = ctypes.cast(ctypes.pointer(data), ctypes.c_void_p)
    status = _libcuda().cuPointerGetAttribute(out, _CU_POINTER_ATTRIBUTE_IS_MANAGED, t.data_ptr())
    if status != 0:
        raise RuntimeError(f"cuPointerGetAttribute failed with CUresult {status}")
    return data.value != 0


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def managed_memory_support(device: torch.device | str) -> tuple[bool, bool, str]:
    """(states can be managed memory on `device`, they can be prefetched, why not)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, False, f"{device.type} tensors use ordinary memory"
    if not torch.cuda.is_available():
        return False, False, "CUDA is not available"
    index = _device_index(device)
    with _lock:
        if index not in _support:
            _support[index] = _probe_support(index)
        return _support[index]


def _probe_support(index: int) -> tuple[bool, bool, str]:
    if not (hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool")
            and hasattr(torch.cuda.memory, "CUDAPluggableAllocator")):
        return False, False, f"torch {torch.__version__} lacks torch.cuda.MemPool / use_mem_pool / CUDAPluggableAllocator"
    from .backends.cuda import _lib

    lib, why = _lib.try_lib()
    if lib is None:
        return False, False, why
    try:
        managed = _device_attribute(index, _CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY)
        concurrent = _device_attribute(index, _CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)
    except (OSError, RuntimeError, AttributeError) as e:
        return False, False, f"cannot query the CUDA driver for managed-memory support: {e}"
    if not managed:
        return False, False, f"cuda:{index} cannot allocate managed memory"
    return True, bool(concurrent), "" if concurrent else f"cuda:{index} has no concurrent managed access: no prefetch"


def _managed_pool(index: int):
    """The process-wide MemPool of managed memory for cuda:index (created on first use)."""
    global _allocator
    with _lock:
        if index not in _pools:
            if _allocator is None:
                from .backends import cuda as cuda_backend

                _allocator = torch.cuda.memory.CUDAPluggableAllocator(*cuda_backend.pluggable_allocator_args())
                # Never freed, not even when interpreter shutdown clears this module: before torch
                # ~2.11 a MemPool holds a raw pointer to its allocator and frees its cached blocks
                # through it when the pool dies, which can be after this module's globals are gone
                # ("pure virtual method called" at exit).
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(_allocator))
            with torch.cuda.device(index):  # a MemPool belongs to the device current at creation
                _pools[index] = torch.cuda.MemPool(_allocator.allocator())
        return _pools[index]


def _allocate_bytes(nbytes: int, device: torch.device, paged: bool) -> tuple[torch.Tensor, bool]:
    """(zeroed uint8 buffer of nbytes on device, whether it is managed memory)."""
    if paged and device.type == "cuda" and nbytes > 0:
        ok, _, why = managed_memory_support(device)
        if ok:
            index = _device_index(device)
            try:
                pool = _managed_pool(index)
                with torch.cuda.use_mem_pool(pool, index):
                    buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
                if is_managed(buf):
                    return buf, True
                # Not from our allocator after all (torch 2.6-2.7 route every thread's allocations
                # to an active pool): a usable buffer, but not one to prefetch.
                _warn_once(f"qlora_kernels.optim: a state buffer from the managed pool on {device} is not "
                           "managed memory; it is used as ordinary memory")
                return buf, False
            except (RuntimeError, TypeError, OSError) as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                why = f"the managed pool failed ({type(e).__name__}: {e})"
                with _lock:
                    _support[index] = (False, False, why)
        _warn_once(f"qlora_kernels.optim: optimizer states on {device} use ordinary CUDA memory, not paged: {why}")
    return torch.zeros(nbytes, dtype=torch.uint8, device=device), False


def _prefetch(buf: torch.Tensor, destination: int) -> None:
    from .backends import cuda as cuda_backend

    cuda_backend.prefetch(buf, destination)


# ---------------------------------------------------------------------------------------------
# Argument checks (all before any state changes)
# ---------------------------------------------------------------------------------------------


def _real(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex() and x.dtype != torch.bool:
        return float(x.item())
    return None


def _check_hyper(group: dict, where: str) -> None:
    lr = _real(group.get("lr"))
    if lr is None or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}lr must be a finite real number >= 0, got {group.get('lr')!r}")
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        b = _real(b)
        if b is None or not 0.0 <= b < 1.0:
            raise ValueError(f"{where}betas[{i}] must be a real number in [0, 1), got {betas[i]!r}")
    eps = _real(group.get("eps"))
    if eps is None or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{where}eps must be a finite real number >= 0, got {group.get('eps')!r}")
    wd = _real(group.get("weight_decay"))
    if wd is None or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"{where}weight_decay must be a finite real number >= 0, got {group.get('weight_decay')!r}")


def _check_param(p: Any, where: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}params must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError(f"{where}complex parameters are not supported (got {p.dtype}); optimize torch.view_as_real(p)")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{where}parameters must be float32, bfloat16 or float16, got {p.dtype}")
    if p.layout != torch.strided:
        raise TypeError(f"{where}sparse parameters are not supported (layout {p.layout})")
    if not p.is_leaf:
        raise ValueError(f"{where}can't optimize a non-leaf tensor")


def _check_grad(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"{where}sparse gradients are not supported (layout {g.layout}); use a dense gradient")
    if g.is_complex() or g.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{where}gradients must be float32, bfloat16 or float16, got {g.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"{where}gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{where}gradient on {g.device}, parameter on {p.device}")


def _step_count(step: Any) -> Optional[int]:
    """A saved step count as an int (torch.optim saves it as a 0-d float tensor), None if invalid."""
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
        step = step.item()
    if isinstance(step, bool):
        return None
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, numbers.Integral) or step < 0:
        return None
    return int(step)


# ---------------------------------------------------------------------------------------------
# The optimizers
# ---------------------------------------------------------------------------------------------


class _StateBuffer:
    __slots__ = ("buf", "managed", "prefetch")

    def __init__(self, buf: torch.Tensor, managed: bool):
        self.buf = buf
        self.managed = managed
        self.prefetch = managed and managed_memory_support(buf.device)[1]


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with fp32 states in CUDA unified memory (see the module docstring).

    state[p]: "step" (int), "exp_avg", "exp_avg_sq" (fp32, p's shape). The parameter may be fp32,
    bf16 or fp16; the update runs in fp32 and is rounded to p's dtype.
    """

    _EIGHT_BIT = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        paged: bool = True,
    ):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        _check_hyper(defaults, "")
        if not isinstance(paged, bool):
            raise TypeError(f"paged must be a bool, got {type(paged).__name__}")
        defaults["betas"] = tuple(betas)
        self.paged = paged
        self._buffers: dict[torch.Tensor, list[_StateBuffer]] = {}
        super().__init__(params, defaults)

    # --- pickling (copy.deepcopy) ---

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["paged"] = self.paged
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.paged = state.get("paged", True)
        # Unpickled states are loose tensors: give them buffers of their own (paged when enabled).
        self._buffers = {}
        for p, st in list(self.state.items()):
            fresh, bufs = self._new_state(p)
            for field, _, _ in self._state_fields(p):
                fresh[field].copy_(st[field])
            fresh["step"] = st["step"]
            self.state[p] = fresh
            self._buffers[p] = bufs

    # --- param groups ---

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters must be an ordered collection, not a set")
        else:
            params = list(params) if params is not None else []
        # Named parameters, as torch.optim (>= 2.6) takes them: (name, tensor) pairs, e.g.
        # model.named_parameters(). The names go to group["param_names"] (and so into state_dict);
        # a group mixes no named and unnamed params, and an optimizer no named and unnamed groups.
        names = None
        if any(isinstance(p, tuple) for p in params):
            if not all(isinstance(p, tuple) for p in params):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            for i, p in enumerate(params):
                if len(p) != 2 or not isinstance(p[0], str):
                    raise TypeError(f"named param {i} must be a (str name, tensor) pair, got {p!r:.80}")
            names = [name for name, _ in params]
            params = [t for _, t in params]
        elif "param_names" in param_group:
            names = param_group["param_names"]
            if (not isinstance(names, (list, tuple)) or len(names) != len(params)
                    or not all(isinstance(n, str) for n in names)):
                raise ValueError(f"param_names must be a list of {len(params)} str (one per param), got {names!r:.80}")
            names = list(names)
        for p in params:
            _check_param(p, "")
        for g in self.param_groups:
            if ("param_names" in g) != (names is not None):
                raise ValueError(
                    "all optimizer param groups should be with/without names. cannot add param group "
                    f"{'with' if names is not None else 'without'} names to the optimizer"
                )
        # torch.optim only warns about a parameter listed twice in one group, and the step would
        # then update it twice while its state counts one step. Across groups torch raises too;
        # this says which parameter.
        owner = {id(q): j for j, g in enumerate(self.param_groups) for q in g["params"]}
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(
                    f"param group lists the same parameter (shape {tuple(p.shape)}) more than once, at "
                    f"{seen[id(p)]} and {i}; each parameter may appear once"
                )
            seen[id(p)] = i
            if id(p) in owner:
                raise ValueError(
                    f"parameter {i} (shape {tuple(p.shape)}) of the new param group is already in param group "
                    f"{owner[id(p)]}; some parameters appear in more than one parameter group"
                )
        merged = {**self.defaults, **param_group}
        _check_hyper(merged, "param group: ")
        group = dict(param_group)
        group["params"] = params
        if names is not None:
            group["param_names"] = names
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        super().add_param_group(group)

    # --- state layout ---

    def _state_fields(self, p: torch.Tensor) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        shape = tuple(p.shape)
        if self._EIGHT_BIT and p.numel() >= ADAMW_8BIT_MIN_NUMEL:
            nb = (num_blocks(p.numel(), ADAMW_8BIT_BLOCKSIZE),)
            return [("exp_avg_q", torch.uint8, shape), ("exp_avg_sq_q", torch.uint8, shape),
                    ("exp_avg_absmax", torch.float32, nb), ("exp_avg_sq_absmax", torch.float32, nb)]
        return [("exp_avg", torch.float32, shape), ("exp_avg_sq", torch.float32, shape)]

    def _new_state(self, p: torch.Tensor) -> tuple[dict[str, Any], list[_StateBuffer]]:
        """Zeroed states of p as views into one buffer per dtype (few allocations and prefetches;
        torch.save refuses views of one storage as different dtypes)."""
        state: dict[str, Any] = {"step": 0}
        buffers = []
        fields = self._state_fields(p)
        for dtype in dict.fromkeys(d for _, d, _ in fields):
            members = [(name, shape) for name, d, shape in fields if d == dtype]
            itemsize = torch.empty((), dtype=dtype).element_size()
            offsets, total = [], 0
            for _, shape in members:
                offsets.append(total)
                total += -(-math.prod(shape) * itemsize // _ALIGN) * _ALIGN
            buf, managed = _allocate_bytes(total, p.device, self.paged)
            typed = buf.view(dtype)
            for (name, shape), off in zip(members, offsets):
                start = off // itemsize
                state[name] = typed[start:start + math.prod(shape)].view(shape)
            buffers.append(_StateBuffer(buf, managed))
        return state, buffers

    # --- paging ---

    def _all_buffers(self) -> list[_StateBuffer]:
        return [sb for bufs in self._buffers.values() for sb in bufs]

    def prefetch(self) -> None:
        """Migrate every managed state buffer to its GPU, ordered on the current stream."""
        for sb in self._all_buffers():
            if sb.prefetch:
                _prefetch(sb.buf, _device_index(sb.buf.device))

    def page_out(self) -> None:
        """Migrate every managed state buffer to host memory (frees GPU memory until the next
        step, which prefetches them back). Ordered on the current stream; a no-op for states in
        ordinary memory or on devices without concurrent managed access."""
        for sb in self._all_buffers():
            if sb.prefetch:
                _prefetch(sb.buf, _HOST)

    def state_bytes(self) -> int:
        """Bytes of memory held by the optimizer states (alignment padding included)."""
        return sum(sb.buf.numel() for sb in self._all_buffers())

    def managed_state_bytes(self) -> int:
        """Bytes of the states that are CUDA managed memory."""
        return sum(sb.buf.numel() for sb in self._all_buffers() if sb.managed)

    # --- the step ---

    def _work(self) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        """(group, param, grad) of every parameter to update, after checking everything."""
        work = []
        strided = torch.strided
        for i, group in enumerate(self.param_groups):
            _check_hyper(group, f"param group {i}: ")
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                # The common case in few attribute reads (a LoRA model steps hundreds of tensors);
                # anything off gets the full checks and their messages.
                if not (p.dtype in _FLOAT_DTYPES and g.dtype in _FLOAT_DTYPES and g.layout == strided
                        and p.layout == strided and g.shape == p.shape and g.device == p.device):
                    _check_param(p, f"param group {i}: ")
                    _check_grad(p, g, f"param group {i}: ")
                work.append((group, p, g))
        return work

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._work()
        # One multi-tensor op per (param group, device, step count, state kind): a LoRA model's
        # hundreds of small tensors take a few launches instead of one each.
        batches: dict[tuple, tuple[dict, list]] = {}
        for group, p, g in work:
            state = self.state[p]
            if not state:
                new_state, bufs = self._new_state(p)
                state.update(new_state)
                self._buffers[p] = bufs
            for sb in self._buffers.get(p, ()):
                if sb.prefetch:
                    _prefetch(sb.buf, _device_index(p.device))
            key = (id(group), p.device, state["step"] + 1, "exp_avg_q" in state)
            batches.setdefault(key, (group, []))[1].append((p, g, state))
        for (_, _, step, eight_bit), (group, items) in batches.items():
            self._update(items, group, step, eight_bit)
            for _, _, state in items:
                state["step"] = step
        return loss

    def _update(self, items: list, group: dict, step: int, eight_bit: bool) -> None:
        beta1, beta2 = (float(_real(b)) for b in group["betas"])
        hyper = (float(_real(group["lr"])), beta1, beta2, float(_real(group["eps"])),
                 float(_real(group["weight_decay"])), step)
        ps = [p for p, _, _ in items]
        gs = [g for _, g, _ in items]
        keys = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax") if eight_bit else ("exp_avg", "exp_avg_sq")
        states = [[st[k] for _, _, st in items] for k in keys]
        extra = (ADAMW_8BIT_BLOCKSIZE,) if eight_bit else ()
        multi = torch.ops.qlora.adamw_step_8bit_multi if eight_bit else torch.ops.qlora.adamw_step_32bit_multi
        single = torch.ops.qlora.adamw_step_8bit if eight_bit else torch.ops.qlora.adamw_step_32bit
        try:
            multi(ps, gs, *states, *hyper, *extra)
        except BackendUnavailableError:
            # A backend with only the single-tensor ops (raised before any tensor is touched).
            for i, (p, g) in enumerate(zip(ps, gs)):
                single(p, g, *(s[i] for s in states), *hyper, *extra)

    # --- checkpoints ---

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout plus a marker of the optimizer that wrote it. The state tensors are
        the live ones (as in torch.optim): save them (torch.save) or clone before stepping on."""
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # "step" is an int: snapshot it
        sd[STATE_DICT_KEY] = {"optimizer": type(self).__name__, "version": STATE_DICT_VERSION}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from state_dict(): everything is checked first; on any error nothing changes.
        The states are copied into fresh (paged, when enabled) buffers on each parameter's device.

        As torch.optim.Optimizer.load_state_dict: the load_state_dict pre-hooks run first, on a
        shallow copy of state_dict (one that returns a dict has it loaded instead), the post-hooks
        after loading; saved "param_names" replace the group's, a group keeps its own where the
        saved one has none (names are not matched against the params: pre-hooks may use them)."""
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()  # shallow, as torch's: a pre-hook may edit it in place
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        if not isinstance(state_dict, dict):
            raise TypeError(f"a load_state_dict pre-hook returned a {type(state_dict).__name__}, not a dict")
        marker = state_dict.get(STATE_DICT_KEY)
        if not isinstance(marker, dict) or marker.get("optimizer") != name:
            source = marker.get("optimizer") if isinstance(marker, dict) else "another optimizer (e.g. torch.optim)"
            raise ValueError(f"cannot load a state_dict written by {source} into {name}")
        if marker.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"state_dict format version {marker.get('version')!r}, expected {STATE_DICT_VERSION}")
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict needs a 'param_groups' list and a 'state' dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")

        params_of: dict[Any, torch.Tensor] = {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"param group {i} of the state_dict is malformed")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {i}: state_dict has {len(saved['params'])} params, this optimizer {len(group['params'])}"
                )
            _check_hyper(saved, f"state_dict param group {i}: ")
            if "param_names" in saved:
                names = saved["param_names"]
                if (not isinstance(names, (list, tuple)) or len(names) != len(saved["params"])
                        or not all(isinstance(n, str) for n in names)):
                    raise ValueError(f"param group {i} of the state_dict: param_names must be a list of "
                                     f"{len(saved['params'])} str (one per param), got {names!r:.80}")
            for key, p in zip(saved["params"], group["params"]):
                # A repeated id would hand one saved state to two parameters' places and drop the other.
                if key in params_of:
                    raise ValueError(f"param group {i} of the state_dict lists param id {key!r} a second time")
                params_of[key] = p

        for key, st in saved_state.items():
            if key not in params_of:
                raise ValueError(f"state_dict has state for param {key!r}, which no param group lists")
            p = params_of[key]
            if not isinstance(st, dict):
                raise ValueError(f"state of param {key!r} must be a dict")
            expected = self._state_fields(p)
            keys = {"step"} | {f for f, _, _ in expected}
            if set(st) != keys:
                raise ValueError(
                    f"state of param {key!r} has keys {sorted(st)}, {name} expects {sorted(keys)} for a param of "
                    f"shape {tuple(p.shape)}"
                )
            if _step_count(st["step"]) is None:
                raise ValueError(f"state of param {key!r}: step must be an integer >= 0, got {st['step']!r}")
            for field, dtype, shape in expected:
                t = st[field]
                if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                    got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"state {field!r} of param {key!r}: expected {dtype} {shape}, got {got}")

        new_state: defaultdict = defaultdict(dict)
        new_buffers: dict[torch.Tensor, list[_StateBuffer]] = {}
        for key, st in saved_state.items():
            p = params_of[key]
            state, bufs = self._new_state(p)
            for field, _, _ in self._state_fields(p):
                state[field].copy_(st[field])
            state["step"] = _step_count(st["step"])
            new_state[p] = state
            new_buffers[p] = bufs

        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            ng = {k: v for k, v in saved.items() if k != "params"}
            ng["betas"] = tuple(ng["betas"])
            ng["params"] = group["params"]
            if "param_names" in ng:
                ng["param_names"] = list(ng["param_names"])
            elif "param_names" in group:
                ng["param_names"] = group["param_names"]
            new_groups.append(ng)

        self.state = new_state
        self._buffers = new_buffers
        self.param_groups = new_groups

        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)


class PagedAdamW8bit(PagedAdamW):
    """AdamW with blockwise 8-bit states in CUDA unified memory (see the module docstring).

    state[p] for p with >= 4096 elements: "step", "exp_avg_q", "exp_avg_sq_q" (uint8, p's shape:
    codes of the signed / unsigned dynamic map), "exp_avg_absmax", "exp_avg_sq_absmax" (fp32, one
    per 256-element block); smaller p: as PagedAdamW.
    """

    _EIGHT_BIT = True
