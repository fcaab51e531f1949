"""Code tables, QuantState and the bitsandbytes state-dict layout (formats.py)."""

import math

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import formats, reference
from python_tests.helpers import assert_same_bits, bnb_functional


def test_nf4_table_is_the_normal_quantile_construction():
    assert_same_bits(formats.derive_nf4_code(), formats.get_code("nf4"), "NF4 from scipy vs fixed table")


def test_code_tables_equal_bitsandbytes():
    F = bnb_functional()
    assert_same_bits(formats.get_code("nf4"), F.get_4bit_type("nf4", device="cpu"), "nf4")
    assert_same_bits(formats.create_dynamic_map(signed=True), F.create_dynamic_map(signed=True), "signed map")
    assert_same_bits(formats.create_dynamic_map(signed=False), F.create_dynamic_map(signed=False), "unsigned map")
    assert_same_bits(formats.get_code("fp4"), F.get_4bit_type("fp4", device="cpu"), "fp4")


def test_dynamic_map_lut_is_nearest_entry_away_from_midpoints():
    code = formats.get_code("dynamic")
    lut = reference.dynamic_map_lut(code).long()
    grid = -1.0 + 2.0 * torch.arange(formats.DYNAMIC_LUT_SIZE, dtype=torch.float64) / (formats.DYNAMIC_LUT_SIZE - 1)
    dist = (grid[:, None] - code.double()[None, :]).abs()
    nearest = dist.argmin(1)
    # Wherever the nearest entry is unambiguous by more than float32 rounding, the table agrees.
    best2 = dist.topk(2, largest=False).values
    clear = (best2[:, 1] - best2[:, 0]) > 1e-6
    assert clear.sum() > 60000
    assert torch.equal(lut[clear], nearest[clear])


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quant_state_roundtrip_and_bitsandbytes_interop(double_quant, quant_type):
    F = bnb_functional()
    w = torch.randn(96, 200)
    packed, state = qk.quantize_4bit(w, quant_type=quant_type, double_quant=double_quant)
    expected = qk.dequantize_4bit(packed, state)

    sd = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    assert f"weight.quant_state.bitsandbytes__{quant_type}" in sd
    assert ("weight.nested_absmax" in sd) == double_quant
    back = qk.QuantState.from_dict(sd)
    assert_same_bits(qk.dequantize_4bit(packed, back), expected, "our state round trip")

    # Ours -> bitsandbytes: its QuantState reads our dict and decodes the same values.
    # (+ 0.0: bitsandbytes' decoders disagree on the sign of FP4's zero, see formats.py.)
    bnb_state = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in sd.items()}, device="cpu")
    assert_same_bits(F.dequantize_4bit(packed, bnb_state) + 0.0, expected + 0.0, "decoded by bitsandbytes")

    # bitsandbytes -> ours.
    bp, bs = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    ours = qk.QuantState.from_dict(bs.as_dict(packed=True))
    assert_same_bits(qk.dequantize_4bit(bp, ours) + 0.0, F.dequantize_4bit(bp, bs) + 0.0, "bnb state decoded by us")


def test_storage_is_4_127_bits_per_weight():
    n = 4096 * 4096
    w = torch.randn(4096, 4096)
    packed, state = qk.quantize_4bit(w, blocksize=64, double_quant=True)
    payload = packed.numel() * packed.element_size()
    scales = state.absmax.numel() + 4 * state.nested_absmax.numel()  # uint8 absmax, fp32 nested absmax
    assert payload == n // 2
    assert scales == n // 64 + 4 * math.ceil(n / 64 / 256)
    constants = 4 * (state.code.numel() + state.nested_code.numel() + state.offset.numel())  # per tensor, not per weight
    bits = 8 * (payload + scales) / n
    assert bits == 4 + 8 / 64 + 32 / (64 * 256), bits  # 4.127 bits per weight, exactly at this size
    assert state.nbytes() == scales + constants


def test_from_dict_and_to_hold_the_shared_code_table():
    """validate (run on every qlora_linear call) recognises the shared table by identity and reads
    no values (a device sync on GPUs); states read from a dict or moved keep holding it."""
    _, state = qk.quantize_4bit(torch.randn(64, 64))
    assert state.code is formats.get_code("nf4")
    back = qk.QuantState.from_dict(state.as_dict(packed=True))
    assert back.code is formats.get_code("nf4")
    assert state.to("meta").code is formats.get_code("nf4", "meta")
    custom = qk.QuantState(**{**state.__dict__, "code": state.code.clone()})
    assert custom.to("cpu").code is custom.code  # a copy of the table stays the caller's tensor
