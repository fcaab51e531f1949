"""GPU facts the launchers of both kernel backends size their grids by, cached per device."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    """One device-properties query per device serves every fact below."""
    return torch.cuda.get_device_properties(index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _properties(_index(device)).multi_processor_count


def cc_major(device: torch.device) -> int:
    """Compute capability major of a CUDA device (8 for A100, 9 for H100); 0 for other devices."""
    return _properties(_index(device)).major if device.type == "cuda" else 0
