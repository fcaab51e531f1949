"""Zeroed int32 counters for the one-launch decode kernels (Triton's qlora_linear_small_m.py and
csrc's gemv_4bit.cu), which count finished programs to find the last one of a group and leave
every counter zero again when the launch ends.

Where the counters come from:
- Eager launches on a GPU: one buffer per (device, stream), reused by every launch on that stream.
  Launches on one stream run one after another and the kernels reset the counters, while kernels
  on two streams may overlap, so a buffer is never shared across streams.
- Launches captured into a CUDA graph: a slice of the device's capture pool (CaptureSlots), zeroed
  and synchronized before the capture began, that belongs to that one captured launch for good. A
  replay may run on any stream, possibly beside eager work or another graph, so the slice is shared
  with nothing; and since the pool was zeroed outside the graph, the graph holds the decode kernel
  alone, not a memset node before each one (a node costs about as much as a small kernel, which is
  a large share of a 4096x4096 decode GEMV). The pool is made by the first eager launch on the
  device (a capture is preceded by eager warm-up runs, as torch.cuda.graph asks) and a new one is
  added by an eager launch once less than a quarter of the last is free. A capture that finds no
  pool or no room falls back to zeroing a fresh buffer inside the capture (a memset node): correct,
  only slower. Slices are never handed out twice, so a program that captures graphs again and again
  uses up pools of CAPTURE_POOL_INTS (4 MiB) each; a Llama-7B decode step takes about 1/16 of one.
- Off the GPU (the CPU, the Triton interpreter, the csrc emulation): a fresh buffer per launch, so
  an interrupted run cannot leave a later one counters that are not zero.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

_PER_STREAM: dict[tuple[int, int], torch.Tensor] = {}
# Smallest buffer cached per stream (int32s): a 128K-row decode fits without regrowing.
MIN_CACHED = 1 << 17
# int32s per capture pool, and the slice granularity (a 128-byte line, so two captured launches
# never share a cache line their atomics contend for).
CAPTURE_POOL_INTS = 1 << 20
SLOT_ALIGN = 32


class CaptureSlots:
    """Hands out disjoint slices of one zeroed int32 buffer, each once, SLOT_ALIGN-aligned."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.used = 0
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.buffer.numel() - self.used

    def take(self, count: int) -> Optional[torch.Tensor]:
        """A zeroed slice of `count` int32s no one else gets, or None when the buffer is used up."""
        size = -(-max(count, 1) // SLOT_ALIGN) * SLOT_ALIGN
        with self._lock:
            if size > self.free:
                return None
            start, self.used = self.used, self.used + size
        return self.buffer[start:start + count]


# Per device index: every capture pool made so far, the newest last. Older ones stay referenced:
# graphs captured from them may still be replayed.
_CAPTURE_POOLS: dict[int, list[CaptureSlots]] = {}


def _ensure_capture_pool(index: int, device: torch.device) -> None:
    pools = _CAPTURE_POOLS.setdefault(index, [])
    if pools and pools[-1].free * 4 >= pools[-1].buffer.numel():
        return
    buf = torch.zeros(CAPTURE_POOL_INTS, dtype=torch.int32, device=device)
    # A replay may run on any stream: the zeros must have landed before any capture can use them.
    torch.cuda.current_stream(device).synchronize()
    pools.append(CaptureSlots(buf))


def launch_counters(device: torch.device, count: int) -> torch.Tensor:
    """int32 counters, at least `count` of them, all zero (see module doc)."""
    if device.type != "cuda":
        return torch.zeros(count, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.is_current_stream_capturing():
        pools = _CAPTURE_POOLS.get(index)
        slot = pools[-1].take(count) if pools else None
        return slot if slot is not None else torch.zeros(count, dtype=torch.int32, device=device)
    _ensure_capture_pool(index, device)
    key = (index, torch.cuda.current_stream(device).cuda_stream)
    buf = _PER_STREAM.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, MIN_CACHED), dtype=torch.int32, device=device)
        _PER_STREAM[key] = buf
    return buf
