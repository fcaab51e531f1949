"""GPU facts the launchers of both kernel backends size their grids by, cached per device."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cc_major_of(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def cc_major(device: torch.device) -> int:
    """Compute capability major of a CUDA device (8 for A100, 9 for H100); 0 for other devices."""
    if device.type != "cuda":
        return 0
    return _cc_major_of(device.index if device.index is not None else torch.cuda.current_device())
