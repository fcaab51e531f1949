"""8-bit blockwise quantization with the dynamic maps (double quantization, optimizer states):
reference and Triton (interpreter) against bitsandbytes 0.50.2's CPU quantize_blockwise, bit for
bit. Spec: reference.quantize_blockwise. Kernels: backends/triton/blockwise_8bit.py."""

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import formats
from python_tests.helpers import assert_same_bits, bnb_functional


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_signed_map_bit_identical_to_bitsandbytes(backend, blocksize, dtype):
    F = bnb_functional()
    x = (torch.randn(10007) * torch.logspace(-6, 1, 10007)).to(dtype)  # values across all exponent ranges
    x[:blocksize] = 0  # an all-zero block
    code = formats.get_code("dynamic")
    bq, babsmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, blocksize)
    with qk.use_backend(backend):
        q, absmax = qk.quantize_blockwise(x, blocksize=blocksize)
        out = qk.dequantize_blockwise(q, absmax, blocksize=blocksize, dtype=dtype)
    assert_same_bits(q, bq, "codes")
    assert_same_bits(absmax, babsmax, "absmax")
    expected = torch.ops.bitsandbytes.dequantize_blockwise(bq, babsmax, code, blocksize, dtype)
    assert_same_bits(out, expected, "dequantized")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unsigned_map_on_second_moments(backend):
    F = bnb_functional()
    v = torch.rand(5000) ** 4 * 1e-3  # optimizer-v-like: non-negative, spread over decades
    code = formats.get_code("dynamic_unsigned")
    bq, babsmax = torch.ops.bitsandbytes.quantize_blockwise(v, code, 256)
    with qk.use_backend(backend):
        q, absmax = qk.quantize_blockwise(v, code=code, blocksize=256)
    assert_same_bits(q, bq, "codes")
    assert_same_bits(absmax, babsmax, "absmax")


def test_midpoints_and_exact_entries():
    """Values on the code entries come back exactly; the table is nearest-entry away from ties."""
    x = formats.get_code("dynamic").clone()  # contains 1.0, so absmax = 1 and x normalises to itself
    q, absmax = qk.quantize_blockwise(x, blocksize=256)
    decoded = qk.dequantize_blockwise(q, absmax, blocksize=256)
    # Entries closer together than a few steps of the 65536-point grid (near zero) may share a cell.
    coarse = (x[1:] - x[:-1]) > 4.0 / formats.DYNAMIC_LUT_SIZE
    spaced = torch.cat([torch.tensor([True]), coarse]) & torch.cat([coarse, torch.tensor([True])])
    assert spaced.sum() > 150
    assert torch.equal(decoded[spaced], x[spaced])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_input_does_not_crash(backend):
    x = torch.randn(512)
    x[3] = float("nan")
    with qk.use_backend(backend):
        q, absmax = qk.quantize_blockwise(x, blocksize=256)
    assert torch.isnan(absmax[0]) or absmax[0] > 0
    assert q[256:].equal(qk.quantize_blockwise(x[256:], blocksize=256)[0])
