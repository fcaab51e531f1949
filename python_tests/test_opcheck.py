"""torch.library.opcheck on every op of _ops.py (schema, fake impl, autograd registration), on the
reference backend and the Triton backend (interpreter)."""

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import formats


def _cases():
    w = torch.randn(37, 101)
    packed, state = qk.quantize_4bit(w)
    packed_fp, state_fp = qk.quantize_4bit(w, double_quant=False)
    code = formats.get_code("dynamic")
    x = torch.randn(1000)
    q, absmax = qk.quantize_blockwise(x)
    return {
        "quantize_4bit": (torch.ops.qlora.quantize_4bit.default, (w, 64, "nf4")),
        "dequantize_4bit_nested": (
            torch.ops.qlora.dequantize_4bit.default,
            (packed.reshape(-1), state.absmax, state.nested_absmax, state.nested_code, state.offset, 64, "nf4",
             [37, 101], torch.bfloat16),
        ),
        "dequantize_4bit_plain": (
            torch.ops.qlora.dequantize_4bit.default,
            (packed_fp.reshape(-1), state_fp.absmax, None, None, None, 64, "nf4", [37, 101], torch.float32),
        ),
        "quantize_blockwise": (torch.ops.qlora.quantize_blockwise.default, (x, code, 256)),
        "dequantize_blockwise": (torch.ops.qlora.dequantize_blockwise.default, (q, absmax, code, 256, torch.float16)),
    }


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(_cases()))
def test_opcheck(backend, case):
    op, args = _cases()[case]
    with qk.use_backend(backend):
        torch.library.opcheck(op, args)
