"""Benchmark: one optimizer step of PagedAdamW / PagedAdamW8bit against torch's fused AdamW.

    pytest bench/bench_optim.py --benchmark-disable-gc

Parameter sets (fp32 params, fp32 grads):
    lora        the LoRA factors of a 7B Llama at r=16 (7 projections x 32 layers = 448 pairs)
    dense_4096  one 4096 x 4096 matrix and one 4096 x 11008 matrix
Implementations: torch_fused (torch.optim.AdamW(fused=True)), paged32 (PagedAdamW, states resident
in managed memory, prefetched each step), paged8 (PagedAdamW8bit), plain32 (PagedAdamW with
paged=False: the kernel cost alone). The issue's bar: paged32 resident <= 1.1x torch_fused.

Bytes per element a step must move: fp32 AdamW reads p, g, m, v and writes p, m, v (28 bytes);
8-bit reads p, g (8) + codes (2) and writes p (4) + codes (2), plus the absmax (16 bytes a
256-block): about 16.1 bytes. Rows carry the achieved GB/s from that count. Times are the medians
of pytest-benchmark rounds, each round synchronized with the GPU. Skipped without a GPU: speed
under the Triton interpreter says nothing about the kernels.
"""

from __future__ import annotations

import pytest
import torch

from qlora_kernels import PagedAdamW, PagedAdamW8bit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: kernel speed cannot be measured under the Triton interpreter",
)

PARAM_SETS = {
    "lora": [(16, 4096), (4096, 16)] * 4 * 32 + [(16, 4096), (11008, 16)] * 2 * 32 + [(16, 11008), (4096, 16)] * 32,
    "dense_4096": [(4096, 4096), (11008, 4096)],
}
IMPLS = ("torch_fused", "paged32", "plain32", "paged8")


def _make(impl: str, params):
    if impl == "torch_fused":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)
    if impl == "paged32":
        return PagedAdamW(params, lr=1e-4, weight_decay=1e-2, paged=True)
    if impl == "plain32":
        return PagedAdamW(params, lr=1e-4, weight_decay=1e-2, paged=False)
    return PagedAdamW8bit(params, lr=1e-4, weight_decay=1e-2, paged=True)


def _bytes_per_element(impl: str) -> float:
    return 16 + 16 / 256 if impl == "paged8" else 28.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("param_set", list(PARAM_SETS))
def test_step_time(benchmark, param_set, impl):
    shapes = PARAM_SETS[param_set]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = _make(impl, params)
    for _ in range(3):  # states allocated, kernels compiled, pages resident
        opt.step()
    torch.cuda.synchronize()

    def step():
        opt.step()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=50, iterations=1, warmup_rounds=5)
    n = sum(p.numel() for p in params)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "elements": n,
        "tensors": len(params),
        "GBps": n * _bytes_per_element(impl) / median_s / 1e9,
    })
