"""One small case of every csrc (cuda backend) op (quantize/dequantize 4-bit and 8-bit, the decode
GEMV, both AdamW steps), for `compute-sanitizer --tool memcheck` in
bench/device_check.sh: ragged sizes so the tail paths run. Exits 1 when the backend is missing."""

import sys

import torch

import qlora_kernels as qk
from qlora_kernels.backends import availability
from qlora_kernels.optim import PagedAdamW, PagedAdamW8bit


def main() -> int:
    ok, why = availability("cuda", torch.device("cuda")) if torch.cuda.is_available() else (False, "no GPU")
    if not ok:
        print(f"cuda backend unavailable: {why}")
        return 1
    torch.manual_seed(0)
    with qk.use_backend("cuda"):
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(37, 101, device="cuda", dtype=dtype)
            packed, state = qk.quantize_4bit(w, blocksize=64)
            qk.dequantize_4bit(packed, state)
            q, absmax = qk.quantize_blockwise(w.reshape(-1)[:1001])
            qk.dequantize_blockwise(q, absmax)
            # The decode GEMV (M <= 16) with odd K = 101: rows start mid-byte.
            x = torch.randn(3, 101, device="cuda", dtype=dtype)
            lora_a = torch.randn(4, 101, device="cuda", dtype=dtype)
            lora_b = torch.randn(37, 4, device="cuda", dtype=dtype)
            qk.qlora_linear(x, packed, state, lora_a, lora_b, 2.0, bias=torch.randn(37, device="cuda", dtype=dtype))
        # The tensor-core GEMV (bf16 X, K a multiple of 128) with 1, 2 and 4 column groups (M = 1, 5, 16 at
        # blocksize 64), N = 37 ending mid-tile.
        w = torch.randn(37, 256, device="cuda")
        packed, state = qk.quantize_4bit(w, blocksize=64)
        lora_a = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
        lora_b = torch.randn(37, 4, device="cuda", dtype=torch.bfloat16)
        for m in (1, 5, 16):
            x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
            qk.qlora_linear(x, packed, state, lora_a, lora_b, 2.0)
        # Both AdamW steps; 8-bit states need >= 4096 elements, 5037 leaves a partial block.
        for make in (PagedAdamW, PagedAdamW8bit):
            p = torch.nn.Parameter(torch.randn(5037, device="cuda"))
            p.grad = torch.randn_like(p)
            opt = make([p], paged=False)
            opt.step()
            opt.step()
    torch.cuda.synchronize()
    print("sanitizer case done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
