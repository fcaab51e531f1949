"""Test-session setup. Runs before any test module imports the package.

Without a CUDA GPU the Triton kernels can only run under the interpreter, and TRITON_INTERPRET=1
must be set before any @triton.jit function is defined (DESIGN.md section 4), so it is set here,
first thing. Subprocesses that need real (compiled) Triton (the compile gate) drop it again.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Quieten bitsandbytes' "kernels-community" notice (it is imported as a test oracle only).
os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run bench/device_check.sh on a lent GPU)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
