"""The measured dispatch: bench.dispatch_suggestions (what a bench run says each op should run on
this GPU) and backends.MEASURED_BACKEND_ORDER (where those entries go). No GPU needed: the bench
rows are built by hand and the GPU's name is patched in."""

from __future__ import annotations

import pytest
import torch

from qlora_kernels import backends, bench
from qlora_kernels.bench import Result

from helpers import spy_small_m_launches


def row(op, impl, ms, m=None, shape="4096x4096"):
    return Result(op=op, impl=impl, shape=shape, m=m, dtype="bfloat16", median_ms=ms, p20_ms=ms, p80_ms=ms)


def test_backend_order_follows_the_summed_medians():
    rows = [
        row("dequantize", "qlora_kernels (cuda)", 1.0, shape="a"), row("dequantize", "qlora_kernels (triton)", 0.8, shape="a"),
        row("dequantize", "qlora_kernels (cuda)", 1.0, shape="b"), row("dequantize", "qlora_kernels (triton)", 1.3, shape="b"),
        row("quantize", "qlora_kernels (cuda)", 2.0), row("quantize", "qlora_kernels (triton)", 3.0),
        # The graphed forward at M=1 decides qlora_linear_fwd (not the eager one, nor M=4096).
        row("fwd graphed", "fused (cuda)", 0.02, m=1), row("fwd graphed", "fused (triton)", 0.03, m=1),
        row("fwd", "fused (cuda)", 0.09, m=1), row("fwd", "fused (triton)", 0.03, m=1),
        row("fwd graphed", "fused (triton)", 5.0, m=4096),
        row("adamw step", "PagedAdamW (cuda)", 1.0), row("adamw step", "PagedAdamW (triton)", 0.9),
        row("adamw step", "PagedAdamW8bit (cuda)", 0.5),  # one backend only: no entry
        Result("quantize", "qlora_kernels (triton)", "c", None, "bfloat16", float("nan"), 0, 0, error="boom"),
    ]
    s = bench.dispatch_suggestions(rows, "NVIDIA Test GPU")
    assert s["backend_order"] == {
        "dequantize_4bit": ["cuda", "triton"],  # 2.0 vs 2.1: the sum decides, not the count of wins
        "quantize_4bit": ["cuda", "triton"],
        "qlora_linear_fwd": ["cuda", "triton"],
        "adamw_step_32bit": ["triton", "cuda"],
    }
    assert s["backend_evidence_ms"]["dequantize_4bit"] == {"cuda": 2.0, "triton": 2.1}
    lines = bench.suggestion_lines(s, "NVIDIA Test GPU")
    assert "backends.MEASURED_BACKEND_ORDER['NVIDIA Test GPU'] = {" in lines[1]
    assert "'adamw_step_32bit': ('triton', 'cuda')" in lines[1]


@pytest.mark.parametrize("dequant_ms, expected", [
    ({16: 9.0, 256: 9.0, 4096: 9.0}, None),          # fused wins everywhere
    ({16: 9.0, 256: 0.5, 4096: 0.5}, 256),           # dequant wins from 256 up
    ({16: 0.5, 256: 9.0, 4096: 0.5}, 4096),          # a win below a loss does not count
    ({16: 0.5, 256: 0.5, 4096: 0.5}, 16),
])
def test_linear_crossover_is_the_smallest_m_from_which_dequant_always_wins(dequant_ms, expected):
    rows = []
    for m, d in dequant_ms.items():
        for shape in ("a", "b"):  # summed over shapes
            rows.append(row("fwd+bwd", "fused (triton)", 1.0, m=m, shape=shape))
            rows.append(row("fwd+bwd", "dequant+cuBLAS", d, m=m, shape=shape))
            rows.append(row("fwd", "dequant+cuBLAS", 0.0001, m=m, shape=shape))  # fwd alone does not decide
    s = bench.dispatch_suggestions(rows, "GPU")
    assert s["dequant_matmul_min_m"] == expected
    assert s["linear_evidence_ms"]["16"]["fused"] == 2.0
    text = "\n".join(bench.suggestion_lines(s, "GPU"))
    if expected is None:
        assert "no entry" in text
    else:
        assert f"MEASURED_DEQUANT_MATMUL_MIN_M['GPU'] = {expected}" in text


def test_linear_crossover_ignores_a_shape_only_one_strategy_ran():
    # A budget cut after the fused row of shape "b": summing it would make dequant look faster.
    rows = [row("fwd+bwd", "fused (triton)", 1.0, m=4096, shape="a"), row("fwd+bwd", "dequant+cuBLAS", 1.5, m=4096, shape="a"),
            row("fwd+bwd", "fused (triton)", 9.0, m=4096, shape="b")]
    s = bench.dispatch_suggestions(rows, "GPU")
    assert s["dequant_matmul_min_m"] is None
    assert s["linear_evidence_ms"]["4096"] == {"fused": 1.0, "dequant": 1.5}


def test_ratio_lines_pair_every_backend_of_ours_with_the_baseline():
    rows = [row("fwd+bwd", "bitsandbytes+peft", 3.0, m=4096), row("fwd+bwd", "fused (triton)", 2.0, m=4096),
            row("adamw step", "torch fused AdamW", 1.0), row("adamw step", "PagedAdamW (cuda)", 1.25),
            row("adamw step", "PagedAdamW8bit (cuda)", 0.5)]
    lines = bench.ratio_lines(rows)
    assert "ratio fwd+bwd 4096x4096 M=4096: bitsandbytes+peft / fused (triton) = 1.50x" in lines
    assert "ratio adamw step 4096x4096: torch fused AdamW / PagedAdamW (cuda) = 0.80x" in lines
    assert not any("PagedAdamW8bit" in ln and "torch fused" in ln for ln in lines)


@pytest.fixture
def gpu_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(backends, "MEASURED_BACKEND_ORDER", {"H100": {"dequantize_4bit": ("triton",)},
                                                             "A100": {"quantize_4bit": ("triton", "cuda")}})
    return torch.device("cuda", 0)


def test_measured_order_applies_to_its_gpu_and_op_only(gpu_named):
    assert backends._auto_order(gpu_named, "dequantize_4bit") == ("triton", "cuda", "reference")
    assert backends._auto_order(gpu_named, "quantize_4bit") == ("cuda", "triton", "reference")  # A100's entry
    assert backends._auto_order(torch.device("cpu"), "dequantize_4bit") == ("reference",)


def test_linear_cases_run_and_time_fp32_adapters_at_their_case(monkeypatch):
    """Every linear case the bench yields runs (shrunk, on the CPU); the fp32-adapter pair appears
    at FP32_ADAPTER_CASE only and is paired in the ratio lines."""
    monkeypatch.setattr(bench, "FP32_ADAPTER_CASE", (8, (64, 32)))
    fp32 = []
    # The cases' functions close over the loop's tensors: each runs before the next is made, as in run().
    for op, impl, shape, m, dtype, fn, nbytes, flops in bench.linear_cases(
            torch.device("cpu"), True, [(64, 32), (64, 48)], [8, 3], r=4):
        fn()
        if "fp32 adapters" in impl:
            fp32.append((op, impl, shape, m))
    assert set(fp32) == {("fwd+bwd", "ours, fp32 adapters", "32x64", 8), ("fwd+bwd", "bf16 lora, fp32 adapters", "32x64", 8)}
    rows = [row("fwd+bwd", c[1], 2.0 if c[1].startswith("ours") else 3.0, m=8, shape="64x32") for c in fp32]
    assert "ratio fwd+bwd 64x32 M=8: bf16 lora, fp32 adapters / ours, fp32 adapters = 1.50x" in bench.ratio_lines(rows)


def test_m1_cases_time_the_decode_path_beside_the_tiles(monkeypatch):
    """At M = 1 the triton rows are the op as it runs (the decode path) and "small-M tiles (triton)",
    the same op with the small-M kernel's tensor-core tiles: each launches what its name says."""
    monkeypatch.setattr(bench, "kernel_backends", lambda device: ["triton"])
    seen = spy_small_m_launches(monkeypatch)
    got = {}
    for op, impl, shape, m, dtype, fn, nbytes, flops in bench.linear_cases(torch.device("cpu"), True, [(64, 128)], [1],
                                                                              r=4):
        if op == "fwd" and impl in ("fused (triton)", "small-M tiles (triton)"):
            seen.clear()
            got[impl] = (fn(), list(seen))
    assert got["fused (triton)"][1] == [True] and got["small-M tiles (triton)"][1] == [False]
    # Same op, two kernels: each output is rounded once to bf16 (2^-9 relative), and the tiles also
    # round each weight to bf16 where the decode path uses exact codes, so the two differ by a few bf16
    # ulps, never by a missing or wrong term. Their accuracy against float64 is test_qlora_linear's.
    torch.testing.assert_close(got["small-M tiles (triton)"][0].float(), got["fused (triton)"][0].float(),
                               rtol=2**-7, atol=2**-7)
