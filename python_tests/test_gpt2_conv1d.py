"""GPT-2's linear layers (transformers' Conv1D: y = x @ W + b, W stored [in, out]) as QLoRALinear.

The oracles are the real libraries: transformers + bitsandbytes quantize a GPT-2 checkpoint on the
CPU (BitsAndBytesConfig(load_in_4bit=True)), transposing each Conv1D's weight to [out, in] first;
PEFT puts LoRA on Conv1D with fan_in_fan_out=True. Ours must give the same bytes, logits and
adapter files, and merge/unload must hand Conv1D layers back (GPT-2's own state-dict layout).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import qlora_kernels as qk
from qlora_kernels import QLoRALinear, load_adapter, load_quantized, replace_linear, save_adapter
from qlora_kernels.io import ADAPTER_CONFIG

from helpers import bnb_4bit_model, fill_trainable, train_causal_lm

os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (GPT-2's Conv1D)")
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONV1D_NAMES = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


def _gpt2(seed: int = 0) -> nn.Module:
    # vocab 96: token ids 0 (not GPT-2's 50256) keep the config valid for this vocabulary.
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).float().eval()
    with torch.no_grad():  # GPT-2 starts its biases at zero; non-zero ones check that they are carried
        for name in CONV1D_NAMES:
            model.get_submodule(name).bias.normal_(0, 0.02)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _qlora_gpt2(targets=None, seed: int = 0, **kw) -> nn.Module:
    kw = {"r": 4, "lora_alpha": 8, "compute_dtype": torch.float32, **kw}
    return replace_linear(_gpt2(seed), target_modules=targets, **kw)


@pytest.fixture(scope="module")
def bnb_gpt2(tmp_path_factory):
    """(fp32 checkpoint dir, transformers + bitsandbytes 4-bit model, its saved "bnb-4bit" dir)."""
    src, quantized = tmp_path_factory.mktemp("gpt2"), tmp_path_factory.mktemp("gpt2_bnb4bit")
    _gpt2().save_pretrained(src)
    return src, bnb_4bit_model(transformers.GPT2LMHeadModel, src, quantized), quantized


@pytest.mark.parametrize("targets", [None, "all-linear", ["c_attn", "c_proj", "c_fc"]], ids=["none", "all-linear", "names"])
def test_replace_linear_quantizes_conv1d_as_transformers_bitsandbytes_does(bnb_gpt2, targets):
    _, bnb_model, _ = bnb_gpt2
    model = _qlora_gpt2(targets)
    assert sorted(model.qlora_replaced) == sorted(CONV1D_NAMES)  # lm_head is tied to the embedding: left
    theirs = bnb_model.state_dict()
    for name in CONV1D_NAMES:
        layer, conv = model.get_submodule(name), _gpt2().get_submodule(name)
        assert layer.fan_in_fan_out and (layer.out_features, layer.in_features) == (conv.nf, conv.nx)
        assert torch.equal(layer.packed_weight, theirs[f"{name}.weight"])
        assert torch.equal(layer.absmax, theirs[f"{name}.weight.absmax"])
        assert torch.equal(layer.nested_absmax, theirs[f"{name}.weight.nested_absmax"])
        assert torch.equal(layer.bias, conv.bias)
    # Fresh adapters (B = 0): the model is the 4-bit base, bitsandbytes' to rounding.
    torch.testing.assert_close(_logits(model), _logits(bnb_model), rtol=1e-5, atol=1e-5)
    assert "fan_in_fan_out=True" in repr(model.get_submodule(CONV1D_NAMES[0]))


@pytest.mark.parametrize("empty", [False, True], ids=["plain", "empty"])
def test_bitsandbytes_gpt2_checkpoint_loads_into_a_plain_gpt2(bnb_gpt2, empty):
    """A pre-quantized GPT-2 directory (what transformers saves for a bnb-4bit model) into GPT-2 as
    transformers builds it, or built without memory: its Conv1Ds become QLoRALinear."""
    _, bnb_model, quantized = bnb_gpt2
    if empty:
        accelerate = pytest.importorskip("accelerate", reason="accelerate is a test dependency (empty models)")
        with accelerate.init_empty_weights():
            model = _gpt2()
        with pytest.raises(qk.io.AdapterFileError, match=r"tied to \['transformer.wte.weight'\].*tie_weights\(\)"):
            load_quantized(model, quantized)
        model.tie_weights()  # transformers ties at from_pretrained, not under init_empty_weights
    else:
        model = _gpt2(seed=5)
    load_quantized(model, quantized, r=4, compute_dtype=torch.float32)
    assert sorted(model.qlora_replaced) == sorted(CONV1D_NAMES)
    assert all(model.get_submodule(n).fan_in_fan_out for n in CONV1D_NAMES)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    torch.testing.assert_close(_logits(model.eval()), _logits(bnb_model), rtol=1e-5, atol=1e-5)


def test_our_gpt2_adapter_loads_in_peft_on_the_bitsandbytes_model(bnb_gpt2, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    _, bnb_model, quantized = bnb_gpt2
    model = fill_trainable(_qlora_gpt2())  # every Conv1D, as the bitsandbytes model quantizes them all
    ours = _logits(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["fan_in_fan_out"] is True  # PEFT then loads it onto Conv1D and Linear4bit bases without a warning
    base = transformers.GPT2LMHeadModel.from_pretrained(quantized, device_map="cpu", dtype=torch.float32)
    for m in base.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules()) == len(CONV1D_NAMES)
    torch.testing.assert_close(_logits(pm), ours, rtol=1e-5, atol=1e-5)

    # and back into a fresh QLoRA GPT-2: the same model, bit for bit
    fresh = _qlora_gpt2()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), ours, rtol=0, atol=0)


def test_peft_gpt2_adapter_with_fan_in_fan_out_loads_into_ours(tmp_path):
    """PEFT's LoRA on GPT-2's Conv1D (fan_in_fan_out=True, trained a few steps on the dequantized
    base) loads into QLoRALinear layers and gives PEFT's logits."""
    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    qmodel = _qlora_gpt2(["c_attn", "c_proj"])
    base = qk.unload(_qlora_gpt2(["c_attn", "c_proj"]))  # Conv1D layers holding dequant(W)^T
    assert all(isinstance(base.get_submodule(n), Conv1D) for n in CONV1D_NAMES)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                   fan_in_fan_out=True, lora_dropout=0.0))
    train_causal_lm(pm, IDS)
    expected = _logits(pm)
    pm.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    load_adapter(qmodel, tmp_path)
    assert any(torch.count_nonzero(m.lora_B) for m in qmodel.modules() if isinstance(m, QLoRALinear))
    torch.testing.assert_close(_logits(qmodel), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_trains_then_merges_and_unloads_back_to_conv1d():
    model = _qlora_gpt2()
    losses = train_causal_lm(model, IDS, steps=4, make_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    assert losses[-1] < losses[0]
    assert all(model.get_submodule(n).lora_B.abs().sum() > 0 for n in CONV1D_NAMES)
    qlogits = _logits(model)
    layers = {n: model.get_submodule(n) for n in CONV1D_NAMES}
    expected = {n: (l.dequantize(torch.float32) + l.scale * l.lora_B.detach() @ l.lora_A.detach()).t()
                for n, l in layers.items()}
    requantized = layers[CONV1D_NAMES[0]].merge_and_requantize()
    assert requantized.fan_in_fan_out and isinstance(requantized.merge(), Conv1D)

    qk.merge_and_unload(model)
    original = _gpt2().state_dict()
    merged = model.state_dict()
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in original.items()}
    for n in CONV1D_NAMES:
        conv = model.get_submodule(n)
        assert type(conv) is Conv1D and not conv.weight.requires_grad and conv.weight.is_contiguous()
        torch.testing.assert_close(conv.weight, expected[n], rtol=0, atol=0)
        torch.testing.assert_close(conv.bias, layers[n].bias, rtol=0, atol=0)
    merged_logits = _logits(model)
    torch.testing.assert_close(merged_logits, qlogits, rtol=1e-5, atol=1e-5)
    fresh = _gpt2(seed=1)
    fresh.load_state_dict(merged)  # GPT-2's own layout: save_pretrained / from_pretrained take it
    torch.testing.assert_close(_logits(fresh), merged_logits, rtol=0, atol=0)


def test_unload_gives_conv1d_with_the_dequantized_base():
    model = fill_trainable(_qlora_gpt2(["c_fc"]))
    dequantized = {n: model.get_submodule(n).dequantize(torch.float32) for n in model.qlora_replaced}
    qk.unload(model)
    for n, w in dequantized.items():
        conv = model.get_submodule(n)
        assert type(conv) is Conv1D
        torch.testing.assert_close(conv.weight, w.t(), rtol=0, atol=0)


def test_conv1d_that_cannot_be_replaced_is_refused_or_skipped_with_the_reason():
    class ScaledConv1D(Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _gpt2()
    model.transformer.h[0].mlp.c_fc = ScaledConv1D(256, 64)
    replace_linear(model, target_modules=["c_fc"])
    assert model.qlora_replaced == ["transformer.h.1.mlp.c_fc"]
    assert "ScaledConv1D overrides Conv1D.forward" in model.qlora_replace_report.skipped["transformer.h.0.mlp.c_fc"]

    model = _gpt2()
    conv = model.transformer.h[0].attn.c_attn
    conv.weight = nn.Parameter(conv.weight.data.t().contiguous())  # the shape nn.Linear would have
    with pytest.raises(ValueError, match=r"not nn.Linear: \['transformer.h.0.attn.c_attn \(Conv1D\)'\]"):
        replace_linear(model, target_modules=["c_attn"])
    assert isinstance(model.transformer.h[1].attn.c_attn, Conv1D)  # nothing was replaced
    with pytest.raises(TypeError, match=r"Conv1D does not hold a plain float weight of shape \(64, 192\)"):
        QLoRALinear.from_linear(conv)


def test_gpt2_dora_adapter_loads_in_peft_on_conv1d(tmp_path):
    """DoRA's row norms are per output feature: [out, in] rows here, PEFT's transposed Conv1D rows."""
    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    model = fill_trainable(_qlora_gpt2(["c_attn", "c_proj"], use_dora=True))
    ours = _logits(model)
    save_adapter(model, tmp_path)
    base = qk.unload(_qlora_gpt2(["c_attn", "c_proj"]))
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(_logits(pm), ours, rtol=1e-5, atol=1e-5)
    qk.merge_and_unload(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(_logits(model), ours, rtol=1e-5, atol=1e-5)


def test_dense_gpt2_checkpoint_quantizes_into_an_empty_replaced_gpt2(bnb_gpt2):
    """GPT-2's own fp32 checkpoint (Conv1D weights [in, out]) into an empty GPT-2 whose Conv1Ds
    were replaced on meta: each is transposed and quantized as it loads, to bitsandbytes' bytes."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is a test dependency (empty models)")
    src, bnb_model, _ = bnb_gpt2
    with accelerate.init_empty_weights():
        model = _gpt2()
    model.tie_weights()
    replace_linear(model, r=4, compute_dtype=torch.float32)
    load_quantized(model, src)
    theirs = bnb_model.state_dict()
    for name in CONV1D_NAMES:
        layer = model.get_submodule(name)
        assert layer.fan_in_fan_out and torch.equal(layer.packed_weight, theirs[f"{name}.weight"])
    torch.testing.assert_close(_logits(model.eval()), _logits(bnb_model), rtol=1e-5, atol=1e-5)


def test_gpt2_saved_pretrained_quantized_loads_in_transformers(bnb_gpt2, tmp_path):
    """Our 4-bit GPT-2 as a "bnb-4bit" directory: transformers loads it (its Conv1Ds as Linear4bit,
    the tied lm_head from the embedding) to the logits of its own bitsandbytes GPT-2."""
    _, bnb_model, _ = bnb_gpt2
    qk.save_pretrained_quantized(_qlora_gpt2(), tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, device_map="cpu").eval()
    for m in hf.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    assert hf.lm_head.weight is hf.transformer.wte.weight
    torch.testing.assert_close(_logits(hf), _logits(bnb_model), rtol=1e-5, atol=1e-5)
