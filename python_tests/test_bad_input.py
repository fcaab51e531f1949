"""Bad input gets a clear ValueError/TypeError naming the problem (functional.py, formats.py)."""

import dataclasses

import pytest
import torch

import qlora_kernels as qk
from python_tests.helpers import assert_same_bits


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


# --- double quantization of weights near float32's limit ---------------------------------------


def test_double_quant_of_huge_finite_weights_stays_finite():
    """The fp32 mean of the absmax (bitsandbytes' offset) overflows for weights ~1e37 although the
    mean itself is representable: then it is taken in float64, and the weight decodes finitely."""
    w = torch.randn(256, 64) * 1e37
    packed, state = qk.quantize_4bit(w)
    plain_absmax = qk.quantize_4bit(w, double_quant=False)[1].absmax
    assert not torch.isfinite(plain_absmax.mean())  # the case at hand
    assert_same_bits(state.offset, plain_absmax.double().mean().float(), "float64 mean, rounded once")
    out = qk.dequantize_4bit(packed, state)
    assert torch.isfinite(out).all()
    plain = qk.dequantize_4bit(*qk.quantize_4bit(w, double_quant=False))
    assert (out - plain).abs().max() <= 0.01 * w.abs().max()  # double quantization's usual error


def test_double_quant_offset_of_ordinary_and_non_finite_weights_is_the_fp32_mean():
    """Where the fp32 mean is finite it is kept bit for bit (bitsandbytes' offset); weights with Inf
    (check_finite=False) keep its non-finite offset rather than a float64 one."""
    w = torch.randn(256, 64) * 3.0
    _, state = qk.quantize_4bit(w)
    assert_same_bits(state.offset, qk.quantize_4bit(w, double_quant=False)[1].absmax.mean(), "fp32 mean")
    w[5, 5] = float("inf")
    _, state = qk.quantize_4bit(w, check_finite=False)
    assert torch.isinf(state.offset)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qk.quantize_4bit(w)


# --- QuantState.validate / from_dict -----------------------------------------------------------


def _state(double_quant=True, quant_type="nf4"):
    return qk.quantize_4bit(torch.randn(64, 64), quant_type=quant_type, double_quant=double_quant)


def test_quant_state_code_must_be_the_table_of_its_quant_type():
    packed, state = _state()
    with pytest.raises(ValueError, match="not the standard nf4 table"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, code=torch.zeros(16)))
    nf4_as_fp4 = dataclasses.replace(state, quant_type="fp4")  # the NF4 table under an FP4 label
    with pytest.raises(ValueError, match="not the standard fp4 table"):
        qk.dequantize_4bit(packed, nf4_as_fp4)
    # A copy of the right table is fine (values are compared, not identity).
    qk.dequantize_4bit(packed, dataclasses.replace(state, code=state.code.clone()))
    packed, state = _state(quant_type="fp4")
    qk.dequantize_4bit(packed, dataclasses.replace(state, code=qk.formats.get_code("fp4").clone()))


def test_quant_state_nested_fields_need_float32_and_a_scalar_offset():
    packed, state = _state()
    with pytest.raises(ValueError, match="nested_code must be a float32"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, nested_code=state.nested_code.int()))
    with pytest.raises(ValueError, match="float32 scalar offset.*int64"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, offset=torch.tensor(0)))
    with pytest.raises(ValueError, match=r"float32 scalar offset.*\(1, 1\)"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, offset=state.offset.reshape(1, 1)))
    expected = qk.dequantize_4bit(packed, state)
    assert_same_bits(qk.dequantize_4bit(packed, dataclasses.replace(state, offset=state.offset.reshape(1))),
                     expected, "offset of shape [1]")


def test_quant_state_shape_dtype_and_field_types():
    packed, state = _state()
    with pytest.raises(ValueError, match="non-negative"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, shape=torch.Size((-64, -64))))
    with pytest.raises(TypeError, match="dtype"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, dtype=torch.int32))
    with pytest.raises(TypeError, match="absmax must be a torch.Tensor, got list"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, absmax=state.absmax.tolist()))
    with pytest.raises(TypeError, match="offset must be a torch.Tensor, got float"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, offset=1.0))


def test_from_dict_bad_entries_name_the_entry():
    _, state = _state()
    with pytest.raises(TypeError, match="must be a dict"):
        qk.QuantState.from_dict(list(state.as_dict().items()))
    for key, value, err, match in [
        ("absmax", [1, 2], TypeError, "'absmax' must be a torch.Tensor"),
        ("quant_map", None, TypeError, "'quant_map' must be a torch.Tensor"),
        ("nested_offset", float("nan"), ValueError, "nested_offset"),
        ("nested_offset", "0.1", ValueError, "nested_offset"),
        ("dtype", "int32", TypeError, "dtype"),
        ("dtype", 5, ValueError, "'dtype'"),
        ("blocksize", 64.7, ValueError, "'blocksize' must be an int"),
        ("shape", "abc", ValueError, "'shape'"),
        ("shape", [8.5, 64], ValueError, "'shape'"),
        ("shape", [-64, -64], ValueError, "'shape'"),
        ("quant_map", torch.zeros(16), ValueError, "not the standard nf4 table"),
        ("nested_dtype", "float16", ValueError, "nested_dtype"),
    ]:
        sd = state.as_dict()
        sd[key] = value
        with pytest.raises(err, match=match):
            qk.QuantState.from_dict(sd)
    sd = state.as_dict()
    del sd["nested_offset"]
    with pytest.raises(ValueError, match="lacks.*nested_offset"):
        qk.QuantState.from_dict(sd)


def test_from_dict_blob_must_hold_a_json_object_of_its_quant_type():
    _, state = _state()
    sd = state.as_dict(packed=True)
    sd["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="must hold a JSON object, got a JSON list"):
        qk.QuantState.from_dict(sd)
    sd = state.as_dict(packed=True)
    sd["quant_state.bitsandbytes__fp4"] = sd.pop("quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="JSON says 'nf4'"):
        qk.QuantState.from_dict(sd)


# --- 8-bit blockwise ---------------------------------------------------------------------------


def test_quantize_blockwise_code_checks():
    x = torch.randn(1000)
    code = qk.formats.get_code("dynamic")
    with pytest.raises(ValueError, match="sorted ascending"):
        qk.quantize_blockwise(x, code=code.flip(0))
    with pytest.raises(ValueError, match="256 sorted entries"):
        qk.quantize_blockwise(x, code=torch.linspace(-1, 1, 16))
    with pytest.raises(TypeError, match="code must be a torch.Tensor"):
        qk.quantize_blockwise(x, code=code.tolist())
    # A sorted copy of a shipped map is fine, and encodes as the map itself.
    assert torch.equal(qk.quantize_blockwise(x, code=code.clone())[0], qk.quantize_blockwise(x)[0])


@pytest.mark.parametrize("kwargs, err, match", [
    ({"blocksize": 0}, ValueError, "blocksize must be a power of two >= 2, got 0"),
    ({"blocksize": 3}, ValueError, "power of two"),
    ({"blocksize": 256.0}, ValueError, "power of two"),
    ({"code": torch.randn(16)}, ValueError, "256 entries"),
    ({"code": torch.arange(256)}, ValueError, "float32 tensor of 256 entries"),
    ({"dtype": torch.int32}, TypeError, "dtype must be float32"),
    ({"dtype": torch.float64}, TypeError, "dtype must be float32"),
])
def test_dequantize_blockwise_argument_checks(kwargs, err, match):
    q, absmax = qk.quantize_blockwise(torch.randn(1000))
    with pytest.raises(err, match=match):
        qk.dequantize_blockwise(q, absmax, **kwargs)


def test_dequantize_blockwise_absmax_and_q_checks():
    q, absmax = qk.quantize_blockwise(torch.randn(1000))
    with pytest.raises(TypeError, match="absmax must be float32"):
        qk.dequantize_blockwise(q, absmax.int())
    with pytest.raises(TypeError, match="absmax must be a torch.Tensor"):
        qk.dequantize_blockwise(q, absmax.tolist())
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        qk.dequantize_blockwise(q.tolist(), absmax)
    with pytest.raises(ValueError, match="absmax is on cpu but q is on meta"):
        qk.dequantize_blockwise(q.to("meta"), absmax, code=qk.formats.get_code("dynamic", "meta"))


# --- qlora_linear ------------------------------------------------------------------------------


def _linear_args():
    packed, state = qk.quantize_4bit(torch.randn(16, 64))
    return torch.randn(3, 64), packed, state, torch.randn(4, 64), torch.randn(16, 4)


def test_qlora_linear_0d_x():
    x, packed, state, a, b = _linear_args()
    with pytest.raises(ValueError, match="at least one dimension"):
        qk.qlora_linear(torch.tensor(1.0), packed, state, a, b, 2.0)


@pytest.mark.parametrize("which", ["x", "packed+state", "lora_A", "lora_B", "bias"])
def test_qlora_linear_tensors_on_different_devices(which):
    x, packed, state, a, b = _linear_args()
    bias = torch.zeros(16)
    if which == "x":
        x = x.to("meta")
        match = "packed is on cpu but x is on meta"
    elif which == "packed+state":
        packed, state = packed.to("meta"), state.to("meta")
        match = "packed is on meta but x is on cpu"
    elif which == "lora_A":
        a = a.to("meta")
        match = "lora_A is on meta but x is on cpu"
    elif which == "lora_B":
        b = b.to("meta")
        match = "lora_B is on meta but x is on cpu"
    else:
        bias = bias.to("meta")
        match = "bias is on meta but x is on cpu"
    with pytest.raises(ValueError, match=match):
        qk.qlora_linear(x, packed, state, a, b, 2.0, bias=bias)


def test_qlora_linear_all_on_meta_still_runs():
    x, packed, state, a, b = _linear_args()
    y = qk.qlora_linear(x.to("meta"), packed.to("meta"), state.to("meta"), a.to("meta"), b.to("meta"), 2.0,
                        bias=torch.zeros(16, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 16)


def test_qlora_linear_and_dequantize_containers_instead_of_tensors():
    x, packed, state, a, b = _linear_args()
    with pytest.raises(TypeError, match="packed must be a torch.Tensor, got list"):
        qk.qlora_linear(x, packed.tolist(), state, a, b, 2.0)
    with pytest.raises(TypeError, match="state must be a qlora_kernels QuantState, got dict"):
        qk.qlora_linear(x, packed, state.as_dict(), a, b, 2.0)
    with pytest.raises(TypeError, match="absmax must be a torch.Tensor, got list"):
        qk.qlora_linear(x, packed, dataclasses.replace(state, absmax=state.absmax.tolist()), a, b, 2.0)
    with pytest.raises(TypeError, match="packed must be a torch.Tensor, got list"):
        qk.dequantize_4bit(packed.tolist(), state)
    with pytest.raises(TypeError, match="nested_absmax must be a torch.Tensor, got dict"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, nested_absmax={"x": 1}))
