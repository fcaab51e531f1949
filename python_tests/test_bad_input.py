"""Bad input gets a clear ValueError/TypeError naming the problem (functional.py, formats.py)."""

import dataclasses

import pytest
import torch

import qlora_kernels as qk


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float64])
def test_non_float_weight_is_a_type_error(dtype):
    w = torch.ones(64, 64, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        qk.quantize_4bit(w)


@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192, 0, -64])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two in 32..4096"):
        qk.quantize_4bit(torch.randn(64, 64), blocksize=blocksize)


def test_blocksize_must_be_int():
    with pytest.raises(TypeError, match="blocksize"):
        qk.quantize_4bit(torch.randn(64, 64), blocksize=64.0)


def test_empty_weight():
    with pytest.raises(ValueError, match="empty"):
        qk.quantize_4bit(torch.empty(0, 64))


def test_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        qk.quantize_4bit(torch.randn(64), quant_type="int4")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_rejected_unless_asked(bad):
    w = torch.randn(64, 64)
    w[3, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        qk.quantize_4bit(w)
    qk.quantize_4bit(w, check_finite=False)  # the flag skips the scan


def test_quant_state_that_does_not_match_packed():
    packed, state = qk.quantize_4bit(torch.randn(64, 64))
    with pytest.raises(ValueError, match="packed tensor holds"):
        qk.dequantize_4bit(packed[:-1], state)
    wrong_shape = dataclasses.replace(state, shape=torch.Size([64, 128]))
    with pytest.raises(ValueError, match="absmax has shape"):
        qk.dequantize_4bit(packed, wrong_shape)
    wrong_dtype = dataclasses.replace(state, absmax=state.absmax.float())
    with pytest.raises(TypeError, match="uint8"):
        qk.dequantize_4bit(packed, wrong_dtype)
    with pytest.raises(TypeError, match="QuantState"):
        qk.dequantize_4bit(packed, {"absmax": state.absmax})


def test_wrong_device_mix():
    packed, state = qk.quantize_4bit(torch.randn(64, 64))
    with pytest.raises(ValueError, match="is on cpu but the packed tensor is on meta"):
        qk.dequantize_4bit(packed.to("meta"), state)


def test_quant_storage_that_cannot_hold_the_bytes():
    with pytest.raises(ValueError, match="do not fill whole"):
        qk.quantize_4bit(torch.randn(3, 3), quant_storage=torch.float32)  # 5 bytes


def test_unknown_backend_and_forced_backend_that_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        with qk.use_backend("tpu"):
            pass
    with qk.use_backend("cuda"):
        with pytest.raises(qk.BackendUnavailableError, match="cuda"):
            qk.quantize_4bit(torch.randn(64, 64))
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(qk.BackendUnavailableError):
        qk.quantize_4bit(torch.randn(64, 64))


def test_corrupt_state_dict_blob():
    _, state = qk.quantize_4bit(torch.randn(64, 64))
    sd = state.as_dict(packed=True)
    sd["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="valid UTF-8 JSON"):
        qk.QuantState.from_dict(sd)
    sd = state.as_dict(packed=True)
    del sd["absmax"]
    with pytest.raises(ValueError, match="lacks"):
        qk.QuantState.from_dict(sd)


@pytest.mark.parametrize("double_quant", [True, False])
def test_non_finite_weights_quantize_the_same_on_every_backend(double_quant):
    """check_finite=False: NaN/Inf give garbage, but the same garbage on every backend (NaN absmax
    as torch.amax gives; NaN encodes level 0)."""
    w = torch.randn(6, 64)
    w[1, 3] = float("nan")
    w[2, 5] = float("inf")
    out = {}
    for backend in ("reference", "triton"):
        with qk.use_backend(backend):
            packed, state = qk.quantize_4bit(w, double_quant=double_quant, check_finite=False)
            out[backend] = (packed, state.absmax)
    assert torch.equal(out["reference"][0], out["triton"][0])
    assert torch.equal(out["reference"][1].view(torch.uint8), out["triton"][1].view(torch.uint8))
