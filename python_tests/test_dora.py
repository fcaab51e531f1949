"""DoRA (weight-decomposed LoRA) on QLoRALinear, against PEFT's use_dora=True as the oracle.

PEFT's LoRA layer with use_dora=True, on an nn.Linear holding our dequantized base, is what our
layer must compute (forward, every gradient, merge) and exchange adapters with. Ours computes the
weight norm ||W + s B A|| from cached base row norms and W A^T (never a dequantized W); PEFT's
from the dequantized weight: test_weight_norm_without_dequantizing checks the two agree.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import qlora_kernels as qk
from qlora_kernels import QLoRALinear, load_adapter, load_quantized, replace_linear, save_adapter, save_quantized
from qlora_kernels.io import ADAPTER_CONFIG, AdapterFileError

from helpers import train_causal_lm

peft = pytest.importorskip("peft", reason="peft is a test dependency (the DoRA oracle)")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

PROJ = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))


def _dora_layer(seed: int = 0, in_f: int = 96, out_f: int = 40, bias: bool = True, **kw) -> QLoRALinear:
    torch.manual_seed(seed)
    kw = {"r": 4, "lora_alpha": 8, "compute_dtype": torch.float32, "use_dora": True, **kw}
    layer = QLoRALinear.from_linear(nn.Linear(in_f, out_f, bias=bias), **kw)
    with torch.no_grad():  # a trained adapter: B and the magnitudes away from their start
        layer.lora_B.normal_(0, 0.1)
        layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(out_f))
    return layer


def _peft_twin(layer: QLoRALinear, dropout: float = 0.0) -> nn.Module:
    """PEFT's DoRA layer on an nn.Linear holding our dequantized base, with our adapter's values."""
    base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        base.weight.copy_(layer.dequantize(torch.float32))
        if layer.bias is not None:
            base.bias.copy_(layer.bias)
    pm = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(
        r=layer.r, lora_alpha=layer.lora_alpha, target_modules=["0"], use_dora=True, lora_dropout=dropout,
        use_rslora=layer.use_rslora))
    twin = pm.base_model.model[0]
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
        twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    return pm


def _peft_params(pm):
    twin = pm.base_model.model[0]
    return (twin.lora_A["default"].weight, twin.lora_B["default"].weight,
            twin.lora_magnitude_vector["default"].weight)


def test_fresh_dora_layer_is_its_base():
    """m starts at the base's row norms and B at zero, so m / n is exactly 1."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(96, 40), r=4, compute_dtype=torch.float32, use_dora=True)
    assert layer.lora_magnitude_vector.requires_grad is True
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.dequantize(torch.float32).norm(dim=1),
                               rtol=1e-6, atol=0)
    x = torch.randn(3, 96)
    with qk.disable_adapter(layer):
        base = layer(x)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_weight_norm_without_dequantizing(rslora):
    layer = _dora_layer(use_rslora=rslora, in_f=320, out_f=72, r=16)
    direct = torch.linalg.norm(layer.dequantize(torch.float32) + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach(),
                               dim=1)
    torch.testing.assert_close(layer.dora_weight_norm(), direct, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_forward_and_gradients_equal_peft_dora(backend, bias):
    layer = _dora_layer(bias=bias)
    pm = _peft_twin(layer)
    x = torch.randn(2, 7, 96)
    x_ours, x_peft = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with qk.use_backend(backend):
        y = layer(x_ours)
    y_peft = pm(x_peft)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    with qk.use_backend(backend):
        y.backward(g)
    y_peft.backward(g)
    torch.testing.assert_close(x_ours.grad, x_peft.grad, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip((layer.lora_A, layer.lora_B, layer.lora_magnitude_vector), _peft_params(pm)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_is_peft_s_form():
    """With lora_dropout in training, PEFT computes base(x) + (m/n - 1) base(d) + (m/n) s d A^T B^T,
    d = dropout(x): the same random mask (same seed, one dropout call each) gives the same output
    and gradients."""
    layer = _dora_layer(lora_dropout=0.3).train()
    pm = _peft_twin(layer, dropout=0.3).train()
    x = torch.randn(4, 96)
    x_ours, x_peft = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(123)
    y = layer(x_ours)
    torch.manual_seed(123)
    y_peft = pm(x_peft)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y_peft.sum().backward()
    torch.testing.assert_close(x_ours.grad, x_peft.grad, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip((layer.lora_A, layer.lora_B, layer.lora_magnitude_vector), _peft_params(pm)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, layer.eval()(x), rtol=1e-3, atol=1e-3)  # the mask did something


def test_compiled_dora_layer_equals_eager():
    layer = _dora_layer()
    x = torch.randn(2, 3, 96)
    compiled = torch.compile(layer, fullgraph=True)
    # The op is opaque to the compiler; the elementwise (m / n) * y + bias around it is fused by
    # Inductor (an fma: one rounding fewer), hence not bit-equal.
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


def test_merge_folds_the_magnitudes_in_as_peft_does():
    layer = _dora_layer()
    pm = _peft_twin(layer)
    merged = layer.merge()
    torch.testing.assert_close(merged.weight, pm.merge_and_unload()[0].weight, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 96)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    requantized = layer.merge_and_requantize()
    assert requantized.use_dora and torch.count_nonzero(requantized.lora_B) == 0
    # its base is the merged weight quantized; its fresh DoRA adapter leaves that base as it is
    expected = qk.dequantize_4bit(*qk.quantize_4bit(merged.weight.detach(), blocksize=64), torch.float32)
    torch.testing.assert_close(requantized.dequantize(torch.float32), expected, rtol=0, atol=0)
    with qk.disable_adapter(requantized):
        base_out = requantized(x)
    torch.testing.assert_close(requantized(x), base_out, rtol=0, atol=0)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _trained_dora_llama(steps: int = 3) -> nn.Module:
    model = replace_linear(_llama(), target_modules=PROJ, r=4, lora_alpha=8, compute_dtype=torch.float32,
                           use_dora=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n.endswith("lora_magnitude_vector") for n in trainable) == 2 * len(PROJ)
    train_causal_lm(model, IDS, steps=steps, make_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    return model


def test_dora_adapter_round_trips_through_peft(tmp_path):
    model = _trained_dora_llama()
    ours = _logits(model)
    save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())["use_dora"] is True

    base = qk.unload(_trained_dora_llama(steps=0))  # the same dequantized base, as nn.Linear
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(pm), ours, rtol=1e-5, atol=1e-5)

    # PEFT's files (its key names, its own save) back into a fresh DoRA model
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = replace_linear(_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32, use_dora=True)
    load_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(_logits(fresh), ours, rtol=0, atol=0)

    # merged: plain Linears with (m / n)(W + s B A)
    qk.merge_and_unload(model)
    torch.testing.assert_close(_logits(model), ours, rtol=1e-4, atol=1e-4)


def test_dora_and_plain_adapters_do_not_mix(tmp_path):
    model = _trained_dora_llama(steps=1)
    save_adapter(model, tmp_path / "dora")
    plain = replace_linear(_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    save_adapter(plain, tmp_path / "plain")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"the adapter is DoRA \(use_dora=True\) but the layer is not"):
        load_adapter(plain, tmp_path / "dora")
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    with pytest.raises(AdapterFileError, match=r"the adapter is not DoRA \(use_dora=False\) but the layer is"):
        load_adapter(model, tmp_path / "plain")

    # a DoRA file without its magnitudes, or with magnitudes its config does not ask for
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "dora" / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "magnitude" not in k}, str(tmp_path / "dora" / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="needs lora_magnitude_vector of shape"):
        load_adapter(model, tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / ADAPTER_CONFIG).read_text())
    config["use_dora"] = False
    (tmp_path / "plain" / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file({**load_file(str(tmp_path / "plain" / "adapter_model.safetensors")),
               **{k: v for k, v in weights.items() if "magnitude" in k}}, str(tmp_path / "plain" / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="lora_magnitude_vector for .* use_dora=false"):
        load_adapter(plain, tmp_path / "plain")

    mixed = replace_linear(_llama(), target_modules=["q_proj"], r=4, compute_dtype=torch.float32, use_dora=True)
    replace_linear(mixed, target_modules=["v_proj"], r=4, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="some layers use DoRA"):
        save_adapter(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


def test_the_cached_base_norms_follow_the_base(tmp_path):
    """A new base (load_quantized, load_state_dict) refreshes the cached row norms; module casts
    keep them fp32; the state dict holds the magnitudes but not the cache."""
    source = _trained_dora_llama(steps=1)
    save_quantized(source, tmp_path / "base.safetensors")
    target = replace_linear(_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32, use_dora=True,
                            blocksize=128)  # another quantization of the same weights: other norms
    load_quantized(target, tmp_path / "base.safetensors")
    for name in target.qlora_replaced:
        src, dst = source.get_submodule(name), target.get_submodule(name)
        torch.testing.assert_close(dst.dora_base_sq_norm, src.dora_base_sq_norm, rtol=0, atol=0)

    layer = _dora_layer()
    other = _dora_layer(seed=1)
    assert "dora_base_sq_norm" not in layer.state_dict() and "lora_magnitude_vector" in layer.state_dict()
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer.dora_base_sq_norm, other.dora_base_sq_norm, rtol=0, atol=0)
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    layer.to(torch.bfloat16)
    assert layer.dora_base_sq_norm.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16


def test_use_dora_must_be_a_bool():
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        QLoRALinear(64, 32, use_dora=1)


def test_dora_layers_built_empty_start_from_the_loaded_base(tmp_path):
    """replace_linear(use_dora=True) on a model built without memory, then load_quantized: the
    magnitudes start at the loaded base's row norms (not at anything computed on meta)."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is a test dependency (empty models)")
    save_quantized(_trained_dora_llama(steps=1), tmp_path / "base.safetensors")
    with accelerate.init_empty_weights():
        model = _llama()
    replace_linear(model, target_modules=PROJ, r=4, compute_dtype=torch.float32, use_dora=True)
    load_quantized(model, tmp_path / "base.safetensors")
    for name in model.qlora_replaced:
        layer = model.get_submodule(name)
        assert not layer.lora_magnitude_vector.is_meta and layer.lora_magnitude_vector.requires_grad
        torch.testing.assert_close(layer.lora_magnitude_vector, layer.dequantize(torch.float32).norm(dim=1),
                                   rtol=1e-6, atol=0)
    with qk.disable_adapter(model):
        base = _logits(model)
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)


def test_a_zero_row_gives_zero_not_nan():
    """A row of W that is all zeros (pruned) with B's row zero has n = 0: PEFT's m / n is NaN
    there; ours is 0, so that output is the bias and every gradient stays finite."""
    lin = nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight[7] = 0.0
    layer = QLoRALinear.from_linear(lin, r=4, compute_dtype=torch.float32, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_B[7] = 0.0
    assert layer.dora_weight_norm()[7] == 0 and layer.lora_magnitude_vector[7] == 0
    x = torch.randn(5, 96, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y[:, 7], layer.bias[7].expand(5), rtol=0, atol=0)
    y.sum().backward()
    assert all(bool(torch.isfinite(t).all()) for t in (y, x.grad, layer.lora_A.grad, layer.lora_B.grad,
                                                      layer.lora_magnitude_vector.grad))
    assert bool(torch.isfinite(layer.merge().weight).all())
    pm = _peft_twin(layer)
    assert torch.isnan(pm(x.detach())[:, 7]).all()  # what PEFT gives there
    torch.testing.assert_close(pm(x.detach())[:, :7], y.detach()[:, :7], rtol=1e-5, atol=1e-5)
