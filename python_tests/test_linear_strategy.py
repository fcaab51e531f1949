"""Fused kernels vs "dequantize then cuBLAS" for the QLoRA linear (backends/linear_strategy.py):
both correct, both forceable, auto follows the measured crossover table."""

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.backends import linear_strategy
from qlora_kernels.backends.triton import qlora_linear as tql

from test_qlora_linear import (CASES, Case, assert_within_rule, make_inputs, poisoned_outputs,  # noqa: F401
                               run_qlora_linear, torch_low_precision, truth)


def _case(m=37, k=256, n=200, r=8, dtype=torch.float32):
    w = torch.randn(n, k) * 0.05
    packed, state = qk.quantize_4bit(w)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k) * 0.05).to(dtype).requires_grad_()
    b = (torch.randn(n, r) * 0.05).to(dtype).requires_grad_()
    return packed, state, x, a, b


def _run(packed, state, x, a, b):
    x.grad = a.grad = b.grad = None
    y = qk.qlora_linear(x, packed, state, a, b, 2.0)
    y.square().sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("strategy", ["fused", "dequant_matmul"])
def test_both_strategies_match_the_reference_backend(strategy):
    packed, state, x, a, b = _case()
    with qk.use_backend("reference"):
        expected = _run(packed, state, x, a, b)
    with qk.use_backend("triton"), linear_strategy.use_linear_strategy(strategy):
        got = _run(packed, state, x, a, b)
    for e, g, what in zip(expected, got, ("y", "dx", "da", "db")):
        # fp32 end to end on both paths: the gap is accumulation order only
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-5), what


def test_forced_strategy_is_the_one_that_runs(monkeypatch):
    calls = []
    real = tql.dequantized_weight

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(tql, "dequantized_weight", spy)
    packed, state, x, a, b = _case(m=5)
    with qk.use_backend("triton"):
        with torch.no_grad():
            qk.qlora_linear(x, packed, state, a, b, 2.0)
            assert calls == []  # auto without a measurement: fused
            with linear_strategy.use_linear_strategy("dequant_matmul"):
                qk.qlora_linear(x, packed, state, a, b, 2.0)
            assert calls == [torch.float32]
            monkeypatch.setenv(linear_strategy.ENV_VAR, "dequant_matmul")
            qk.qlora_linear(x, packed, state, a, b, 2.0)
            assert calls == [torch.float32] * 2


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dequant_matmul_matches_float64_by_the_rule(case, poisoned_outputs):
    """The dequant_matmul strategy is held to the same rule as the fused kernels at every case:
    it shares their LoRA path (before, its LoRA ran in the activation dtype, and fp32 adapters on
    bf16 activations got dA 15000x less accurate than the rule allows)."""
    inp = make_inputs(case)
    with linear_strategy.use_linear_strategy("dequant_matmul"):
        got = run_qlora_linear(inp, "triton")
    assert_within_rule(got, torch_low_precision(inp), truth(inp), f"dequant_matmul {case}")


def test_dequant_matmul_without_input_grad_skips_the_weight(monkeypatch):
    """No dX wanted: neither the dequantized copy of W nor the dX GEMM is made in the backward."""
    inp = make_inputs(Case((20,), 64, 128, 4))
    calls = []
    real = tql.dequantized_weight
    monkeypatch.setattr(tql, "dequantized_weight", lambda *a: calls.append(1) or real(*a))
    A = inp.A.detach().requires_grad_()
    B = inp.B.detach().requires_grad_()
    with qk.use_backend("triton"), linear_strategy.use_linear_strategy("dequant_matmul"):
        y = qk.qlora_linear(inp.x, inp.packed, inp.state, A, B, inp.scale, inp.bias)
        assert calls == [1]
        y.backward(inp.grad_y)
    assert calls == [1]
    assert A.grad is not None and B.grad is not None


def test_auto_follows_measured_crossover(monkeypatch):
    monkeypatch.setattr(linear_strategy, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setitem(linear_strategy.MEASURED_DEQUANT_MATMUL_MIN_M, "H100", 4096)
    dev = torch.device("cpu")
    assert linear_strategy.choose(1, dev) == "fused"
    assert linear_strategy.choose(4096, dev) == "dequant_matmul"
    with linear_strategy.use_linear_strategy("fused"):
        assert linear_strategy.choose(16384, dev) == "fused"


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown linear strategy"):
        with linear_strategy.use_linear_strategy("magic"):
            pass
