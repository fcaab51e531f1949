"""The kernels whose speed the issues' GPU goals hang on, one launch each inside a
cudaProfilerStart/Stop window, for Nsight Compute in bench/device_check.sh:

    ncu --profile-from-start off --section SpeedOfLight --section ComputeWorkloadAnalysis \
        python bench/profile_case.py

Warm-up (Triton compiles, autotuning) runs before the window, so ncu replays only the launches
that matter: the fused forward and backward (triton) at M=4096 on a 4096x4096 NF4 weight (bf16,
r=16), the small-M forward at M=1 (triton, then csrc's GEMV), and NF4 dequantize to bf16 (triton,
then csrc). What it answers that the bench cannot: whether a kernel is bound by the tensor cores,
by the L1/shared-memory pipe (the NF4 code lookups are gathers) or by DRAM. Exits 1 without a GPU.
"""

import sys

import torch

import qlora_kernels as qk
from qlora_kernels.backends import availability
from qlora_kernels.backends.linear_strategy import use_linear_strategy


def make_cases(dev: torch.device, n: int = 4096, k: int = 4096, m: int = 4096):
    """The profiled launches as one callable (sizes shrink for the CPU test of this script)."""
    packed, state = qk.quantize_4bit(torch.randn(n, k, device=dev, dtype=torch.bfloat16), blocksize=64)
    lora_a = (torch.randn(16, k, device=dev, dtype=torch.bfloat16) * 0.01).requires_grad_()
    lora_b = (torch.randn(n, 16, device=dev, dtype=torch.bfloat16) * 0.01).requires_grad_()
    x_big = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    x_one = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    have_cuda = availability("cuda", dev)[0]

    def cases():
        with qk.use_backend("triton"), use_linear_strategy("fused"):
            y = qk.qlora_linear(x_big, packed, state, lora_a, lora_b, 2.0)
            y.backward(torch.ones_like(y))
            qk.qlora_linear(x_one, packed, state, lora_a.detach(), lora_b.detach(), 2.0)
            qk.dequantize_4bit(packed, state, dtype=torch.bfloat16)
        if have_cuda:
            with qk.use_backend("cuda"):
                qk.qlora_linear(x_one, packed, state, lora_a.detach(), lora_b.detach(), 2.0)
                qk.dequantize_4bit(packed, state, dtype=torch.bfloat16)
        return have_cuda

    return cases


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU")
        return 1
    torch.manual_seed(0)
    cases = make_cases(torch.device("cuda"))
    for _ in range(3):  # compiles and autotuning, outside the profiled window
        cases()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    have_cuda = cases()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profile case done (csrc {'included' if have_cuda else 'unavailable'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
