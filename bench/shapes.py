"""Benchmark shapes shared by the bench suites (DESIGN.md section 7).

They live in qlora_kernels.bench (the `bench` command); this module re-exports them so the
pytest-benchmark suites and the command use one list.
"""

from qlora_kernels.bench import BLOCKSIZE, LLAMA_LINEAR_SHAPES, LORA_RANK, LORA_RANKS, M_SWEEP, shape_id

__all__ = ["BLOCKSIZE", "LLAMA_LINEAR_SHAPES", "LORA_RANK", "LORA_RANKS", "M_SWEEP", "shape_id"]
