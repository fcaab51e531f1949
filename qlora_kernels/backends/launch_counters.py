"""Zeroed int32 counters for the one-launch decode kernels (Triton's qlora_linear_small_m.py and
csrc's gemv_4bit.cu), which count finished programs to find the last one of a group and leave
every counter zero again when the launch ends.

Because the kernels reset them, one buffer per (device, stream) serves every launch on that stream:
launches on one stream run one after another, and a buffer is never shared across streams, whose
kernels may overlap. While a CUDA graph is captured the buffer is made inside the capture (its
zeroing becomes a graph node), because a replay may run on any stream. Off the GPU (the CPU, the
Triton interpreter, the csrc emulation) a fresh buffer per launch, so an interrupted run cannot
leave a later one counters that are not zero.
"""

from __future__ import annotations

import torch

_PER_STREAM: dict[tuple[int, int], torch.Tensor] = {}
# Smallest buffer cached per stream (int32s): a 128K-row decode fits without regrowing.
MIN_CACHED = 1 << 17


def launch_counters(device: torch.device, count: int) -> torch.Tensor:
    """int32 counters, at least `count` of them, all zero (see module doc)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, dtype=torch.int32, device=device)
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(device).cuda_stream)
    buf = _PER_STREAM.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, MIN_CACHED), dtype=torch.int32, device=device)
        _PER_STREAM[key] = buf
    return buf
