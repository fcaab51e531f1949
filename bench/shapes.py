"""Benchmark shapes shared by the bench suites (DESIGN.md section 7). Import, don't copy.

Linear shapes are (in_features K, out_features N) of Llama projections: 4096x4096 (7B attention),
4096x11008 and 11008x4096 (7B MLP up/gate and down), 8192x28672 (70B MLP up/gate).
"""

LLAMA_LINEAR_SHAPES = (
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
    (8192, 28672),
)
# Rows of activations (batch x sequence): decode (1, 16) through long training batches.
M_SWEEP = (1, 16, 256, 4096, 16384)
LORA_RANK = 16
LORA_RANKS = (8, 16, 64)
BLOCKSIZE = 64


def shape_id(k: int, n: int) -> str:
    return f"{k}x{n}"
