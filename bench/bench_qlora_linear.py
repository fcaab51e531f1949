"""Benchmark: the fused QLoRA linear (issue 3) against its baselines, on a CUDA GPU.

    pytest bench/bench_qlora_linear.py --benchmark-disable-gc      (whole sweep, ~5-10 min on an H100)
    pytest bench/bench_qlora_linear.py -k "4096x4096 and M1-"      (one slice)

Implementations, all bf16 activations, LoRA r=16 in bf16, NF4 blocksize 64 with double quantization:
    fused       qlora_kernels.qlora_linear, Triton backend forced (the kernels of this issue)
    unfused     dequantize_4bit to bf16 + F.linear + the two LoRA matmuls (what "dequantize then
                cuBLAS" costs with this package's own dequantize kernel)
    dense_bf16  F.linear on a dense bf16 copy of the same weight, no LoRA (the byte/flop ceiling)
    bf16_lora   dense bf16 base + LoRA matmuls (training LoRA without quantization)
    bnb_peft    bitsandbytes Linear4bit + PEFT LoRA, when both import and run on this GPU
Modes: fwd (no autograd), bwd (backward of a recorded forward), fwd+bwd.

Times are medians of triton.testing.do_bench (CUDA events). Each row also carries the flops and
bytes the computation must do/move and the achieved TFLOP/s and GB/s, next to two ceilings measured
in the same run (a device-to-device copy and an 8192^3 bf16 matmul). Rows go to stdout as a table
and to bench/results/qlora_linear-<gpu>-<time>.{json,csv} (+ .png with matplotlib) at module end.
Skipped without a GPU: interpreter timings say nothing about GPU speed.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import BLOCKSIZE, LLAMA_LINEAR_SHAPES, LORA_RANK, M_SWEEP, shape_id  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: kernel speed cannot be measured under the Triton interpreter",
)

IMPLS = ("fused", "unfused", "dense_bf16", "bf16_lora", "bnb_peft")
MODES = ("fwd", "bwd", "fwd+bwd")
SCALE = 2.0
RESULTS: list[dict] = []
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _do_bench(fn: Callable[[], object]) -> float:
    from qlora_kernels.bench import time_fn

    return float(time_fn(fn, torch.device("cuda"))[0])


@pytest.fixture(scope="module")
def ceilings():
    """Achievable peaks on this GPU, this run: copy bandwidth (bytes read + written) and bf16 TFLOP/s."""
    from qlora_kernels.bench import measure_ceilings

    c = measure_ceilings(torch.device("cuda"), quick=False)
    return {"copy_GBps": c["copy_gbps"], "bf16_TFLOPs": c["matmul_tflops"]}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if RESULTS:
        _write_results()


class Problem:
    """One (K, N, M) problem: a quantized weight, its dense bf16 copy, activations, LoRA factors."""

    def __init__(self, k: int, n: int, m: int, r: int = LORA_RANK):
        import qlora_kernels as qk

        torch.manual_seed(0)
        self.k, self.n, self.m, self.r = k, n, m, r
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        self.packed, self.state = qk.quantize_4bit(w, blocksize=BLOCKSIZE, double_quant=True)
        self.w_bf16 = qk.dequantize_4bit(self.packed, self.state, torch.bfloat16)
        del w
        self.x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        self.A = (torch.randn(r, k, device="cuda") / math.sqrt(k)).to(torch.bfloat16)
        self.B = (torch.randn(n, r, device="cuda") * 0.01).to(torch.bfloat16)
        self.grad_y = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def flops(self, mode: str, lora: bool = True) -> float:
        base = 2.0 * self.m * self.n * self.k
        lora_f = 2.0 * self.m * self.r * (self.k + self.n) if lora else 0.0
        fwd = base + lora_f
        bwd = base + 2 * lora_f  # dX (+ U, U@A) and dA, dB
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def bytes_fused(self, mode: str) -> float:
        """Bytes the fused kernels must move at least (packed W + scales, activations in and out)."""
        w = self.n * self.k * (0.5 + 1.0 / BLOCKSIZE)
        fwd = w + 2 * self.m * (self.k + self.n)
        bwd = w + 2 * self.m * (self.n + self.k) + 2 * self.m * self.k  # dY, dX, X for dA
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _make_forward(impl: str, p: Problem) -> tuple[Callable, list[torch.Tensor]]:
    """(forward callable of (x, A, B), the trainable tensors it uses besides x)."""
    import qlora_kernels as qk
    from qlora_kernels.backends import use_backend

    if impl == "fused":
        def fwd(x, A, B):
            with use_backend("triton"):
                return qk.qlora_linear(x, p.packed, p.state, A, B, SCALE)
        return fwd, [p.A, p.B]
    if impl == "unfused":
        def fwd(x, A, B):
            w = qk.dequantize_4bit(p.packed, p.state, torch.bfloat16)
            return F.linear(x, w) + SCALE * F.linear(F.linear(x, A), B)
        return fwd, [p.A, p.B]
    if impl == "dense_bf16":
        return (lambda x, A, B: F.linear(x, p.w_bf16)), []
    if impl == "bf16_lora":
        return (lambda x, A, B: F.linear(x, p.w_bf16) + SCALE * F.linear(F.linear(x, A), B)), [p.A, p.B]
    if impl == "bnb_peft":
        return _bnb_peft_forward(p)
    raise ValueError(impl)


def _bnb_peft_forward(p: Problem):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    peft = pytest.importorskip("peft", reason="peft is not installed")
    try:
        lin = bnb.nn.Linear4bit(p.k, p.n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(p.w_bf16.cpu(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True, blocksize=BLOCKSIZE)
        lin = lin.cuda()

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = lin

            def forward(self, x):
                return self.proj(x)

        cfg = peft.LoraConfig(r=p.r, lora_alpha=SCALE * p.r, target_modules=["proj"], lora_dropout=0.0)
        model = peft.get_peft_model(Wrap(), cfg)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.data = p.A.clone()
            layer.lora_B["default"].weight.data = p.B.clone()
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        model(p.x[:1])  # fail here, not inside the timing loop
    except Exception as e:  # noqa: BLE001  (a baseline that cannot run on this GPU is reported as skipped)
        pytest.skip(f"bitsandbytes + PEFT could not run here: {type(e).__name__}: {e}")
    return (lambda x, A, B: model(x)), params


def _timed_callable(impl: str, mode: str, p: Problem) -> Callable[[], object]:
    forward, params = _make_forward(impl, p)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward(p.x, p.A, p.B)
        return run
    x = p.x.detach().requires_grad_()
    A = p.A.detach().requires_grad_() if impl not in ("bnb_peft", "dense_bf16") else p.A
    B = p.B.detach().requires_grad_() if impl not in ("bnb_peft", "dense_bf16") else p.B
    for t in params:
        t.requires_grad_(True)
    if mode == "fwd+bwd":
        def run():
            forward(x, A, B).backward(p.grad_y)
        return run
    y = forward(x, A, B)

    def run():
        y.backward(p.grad_y, retain_graph=True)
    return run


_PROBLEMS: dict = {}


def _problem(k: int, n: int, m: int) -> Problem:
    key = (k, n, m)
    if key not in _PROBLEMS:
        _PROBLEMS.clear()  # one problem's tensors at a time (the largest take GBs)
        torch.cuda.empty_cache()
        _PROBLEMS[key] = Problem(k, n, m)
    return _PROBLEMS[key]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", M_SWEEP, ids=lambda m: f"M{m}-")
@pytest.mark.parametrize("kn", LLAMA_LINEAR_SHAPES, ids=lambda kn: shape_id(*kn))
def test_qlora_linear(benchmark, ceilings, kn, m, impl, mode):
    k, n = kn
    p = _problem(k, n, m)
    if impl == "fused" and mode == "fwd":
        # A benchmark of a wrong kernel is worthless: check against the bf16 LoRA baseline first.
        fwd, _ = _make_forward("fused", p)
        ref, _ = _make_forward("bf16_lora", p)
        with torch.no_grad():
            got, want = fwd(p.x, p.A, p.B).float(), ref(p.x, p.A, p.B).float()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-2, f"fused output differs from bf16 LoRA by {rel:.2e} (relative L2)"
    fn = _timed_callable(impl, mode, p)
    ms = _do_bench(fn)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, iterations=1, warmup_rounds=1)
    lora = impl != "dense_bf16"
    flops = p.flops(mode, lora)
    nbytes = p.bytes_fused(mode)
    row = {
        "shape": shape_id(k, n), "K": k, "N": n, "M": m, "r": p.r, "impl": impl, "mode": mode, "ms": ms,
        "TFLOPs": flops / ms / 1e9, "GBps_min_bytes": nbytes / ms / 1e6,
        "flops": flops, "min_bytes": nbytes, **ceilings,
    }
    benchmark.extra_info.update(row)
    RESULTS.append(row)


def _write_results() -> None:
    import triton

    gpu = torch.cuda.get_device_name()
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stem = os.path.join(RESULTS_DIR, f"qlora_linear-{gpu.replace(' ', '_')}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": RESULTS}, f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RESULTS[0]) + list(meta))
        w.writeheader()
        for row in RESULTS:
            w.writerow({**row, **meta})
    _print_table(meta)
    _plot(stem + ".png")


def _speedups() -> dict:
    by = {(r["shape"], r["M"], r["mode"], r["impl"]): r["ms"] for r in RESULTS}
    out = {}
    for (shape, m, mode, impl), ms in by.items():
        if impl == "fused":
            out[(shape, m, mode)] = {b: by[(shape, m, mode, b)] / ms for b in IMPLS if (shape, m, mode, b) in by}
    return out


def _print_table(meta: dict) -> None:
    print(f"\nQLoRA linear on {meta['gpu']} (torch {meta['torch']}, triton {meta['triton']}); "
          f"ceilings: copy {RESULTS[0]['copy_GBps']:.0f} GB/s, bf16 matmul {RESULTS[0]['bf16_TFLOPs']:.0f} TFLOP/s")
    print(f"{'shape':>12} {'M':>6} {'mode':>8} {'impl':>11} {'ms':>9} {'TFLOP/s':>8} {'GB/s*':>8} {'fused x':>8}")
    sp = _speedups()
    for r in RESULTS:
        x = sp.get((r["shape"], r["M"], r["mode"]), {}).get(r["impl"], float("nan"))
        print(f"{r['shape']:>12} {r['M']:>6} {r['mode']:>8} {r['impl']:>11} {r['ms']:9.4f} {r['TFLOPs']:8.1f} "
              f"{r['GBps_min_bytes']:8.0f} {x:8.2f}")
    print("GB/s*: the fused kernels' minimum bytes / time. fused x: that row's time / fused time.")


def _plot(path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sp = _speedups()
    shapes = sorted({s for s, _, _ in sp})
    fig, axes = plt.subplots(len(MODES), len(shapes), figsize=(4 * len(shapes), 3 * len(MODES)), squeeze=False)
    for i, mode in enumerate(MODES):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            for base in IMPLS[1:]:
                pts = sorted((m, v[base]) for (s, m, md), v in sp.items() if s == shape and md == mode and base in v)
                if pts:
                    ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=f"vs {base}")
            ax.axhline(1.0, color="gray", lw=0.5)
            ax.set_xscale("log")
            ax.set_title(f"{shape} {mode}")
            ax.set_xlabel("M")
            ax.set_ylabel("speedup of fused")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
