"""One small case of every csrc (cuda backend) op, for `compute-sanitizer --tool memcheck` in
bench/device_check.sh: ragged sizes so the tail paths run. Exits 1 when the backend is missing."""

import sys

import torch

import qlora_kernels as qk
from qlora_kernels.backends import availability


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
    torch.cuda.synchronize()
    print("sanitizer case done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
