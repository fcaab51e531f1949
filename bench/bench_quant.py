"""pytest-benchmark suite: 4-bit quantize / dequantize (NF4, blocksize 64, double quant) against
bitsandbytes and a same-size bf16 copy (the bandwidth ceiling).

    pytest bench/bench_quant.py --benchmark-only

Cases, shapes and baselines come from qlora_kernels.bench (the `bench` command): one definition.
On a machine without a GPU it runs on the CPU and its numbers are CPU numbers.
"""

import pytest
import torch

from qlora_kernels import bench as qb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (N, K) weights: the Llama projections on a GPU; the CPU side-by-side shape on a CPU.
SHAPES = [(n, k) for k, n in qb.LLAMA_LINEAR_SHAPES] if DEVICE.type == "cuda" else [qb.CPU_DEQUANT_SHAPE]
IMPLS = [label for label, _ in qb.our_impls(DEVICE)] + ["bitsandbytes", "copy bf16 (ceiling)"]


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("op", ["quantize", "dequantize"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{k}x{n}" for n, k in SHAPES])
def test_quantization(benchmark, op, impl, n, k):
    cases = {(c[0], c[1]): c for c in qb.quantization_cases(DEVICE, False, [(n, k)])}
    if (op, impl) not in cases:
        pytest.skip(f"{impl} has no {op} case here (bitsandbytes not importable, or the copy ceiling is dequantize-only)")
    _, _, shape, _, dtype, fn, nbytes, _ = cases[(op, impl)]
    benchmark.extra_info.update(device=qb.environment()["device"], shape=shape, bytes=nbytes)
    benchmark(_synced(fn))
