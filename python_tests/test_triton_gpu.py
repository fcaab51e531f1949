"""Triton kernels on a real GPU (skipped without one; run by bench/device_check.sh when a GPU is
lent): bit-identity with the reference computed on the same GPU, which the interpreter cannot
prove for div_rn / FMA contraction / bf16 rounding."""

import pytest
import torch

import qlora_kernels as qk
from python_tests.conftest import requires_cuda
from python_tests.helpers import assert_same_bits

pytestmark = requires_cuda


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# Each blocksize x dtype is a fresh Triton compile on the GPU machine (~1 s): the ends and the
# default keep the device check inside its budget; the interpreter tests cover every blocksize.
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(37, 101), (4097,), (1024, 1000)])
def test_quantize_dequantize_bit_identical_on_gpu(quant_type, double_quant, dtype, blocksize, shape):
    w = torch.randn(shape, device="cuda").to(dtype)
    results = {}
    for backend in ("reference", "triton"):
        with qk.use_backend(backend):
            packed, state = qk.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
            results[backend] = (packed, state, qk.dequantize_4bit(packed, state))
    (p0, s0, d0), (p1, s1, d1) = results["reference"], results["triton"]
    assert_same_bits(p1, p0, "packed")
    assert_same_bits(s1.absmax, s0.absmax, "absmax")
    if double_quant:
        assert_same_bits(s1.nested_absmax, s0.nested_absmax, "nested absmax")
    assert_same_bits(d1, d0, "dequantized")
    # and the GPU bytes equal the CPU reference's (the offset is a torch.mean on each device)
    with qk.use_backend("reference"):
        p_cpu, _ = qk.quantize_4bit(w.cpu(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    assert_same_bits(p1.cpu(), p_cpu, "packed vs CPU reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_blockwise_8bit_bit_identical_on_gpu(dtype):
    x = (torch.randn(100003, device="cuda") * torch.logspace(-6, 1, 100003, device="cuda")).to(dtype)
    out = {}
    for backend in ("reference", "triton"):
        with qk.use_backend(backend):
            q, absmax = qk.quantize_blockwise(x)
            out[backend] = (q, absmax, qk.dequantize_blockwise(q, absmax, dtype=dtype))
    for a, b, what in zip(out["triton"], out["reference"], ("codes", "absmax", "decoded")):
        assert_same_bits(a, b, what)
