"""The reference backend: reference.py's functions behind the op signatures of _ops.py."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference as ref


def available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    if nested_absmax is not None:
        absmax = ref.double_dequantize(absmax, nested_absmax, nested_code, offset)
    return ref.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)


IMPLS = {
    "quantize_4bit": ref.quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "quantize_blockwise": ref.quantize_blockwise,
    "dequantize_blockwise": ref.dequantize_blockwise,
}
