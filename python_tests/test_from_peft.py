"""qk.from_peft: a PEFT LoRA model (transformers + bitsandbytes 4-bit base, or a dense one) taken over
in memory (nn.py). The oracle is the PEFT model itself: the model from_peft gives must compute what
it computed (logits, and the same losses over training steps), keeping bitsandbytes' bytes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qlora_kernels as qk
from qlora_kernels import QLoRALinear

from helpers import bnb_4bit_model, fill_trainable, train_causal_lm

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
peft = pytest.importorskip("peft", reason="peft is a test dependency (the oracle and the model taken over)")

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(5))
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def bnb_dir(tmp_path_factory):
    src, quantized = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("llama_bnb")
    _llama().save_pretrained(src)
    bnb_4bit_model(transformers.LlamaForCausalLM, src, quantized)
    return src


def _bnb_peft(src, **lora):
    """PEFT's QLoRA: transformers + bitsandbytes 4-bit Llama (fp32 compute) with LoRA, adapters filled."""
    base = bnb_4bit_model(transformers.LlamaForCausalLM, src, src.parent / f"{src.name}_again")
    model = peft.get_peft_model(base, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": PROJ, **lora}))
    return fill_trainable(model)


def _our_name(peft_name: str) -> str:
    """PEFT's parameter name -> ours: X.lora_A.default.weight -> X.lora_A (lora_magnitude_vector too);
    lm_head.modules_to_save.default.weight -> lm_head.weight."""
    name = peft_name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
    return name.replace(".default.weight", "")


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("lora", [{}, {"use_dora": True, "use_rslora": True, "modules_to_save": ["lm_head"]}],
                         ids=["lora", "dora-rslora-modules_to_save"])
def test_bitsandbytes_peft_model_computes_the_same_as_ours(bnb_dir, lora):
    peft_model = _bnb_peft(bnb_dir, **lora)
    expected = _logits(peft_model)
    trainable = {_our_name(n): p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    packed = {n: m.get_base_layer().state_dict()["weight"].clone() for n, m in peft_model.get_base_model().named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    model = qk.from_peft(peft_model)
    assert type(model) is transformers.LlamaForCausalLM
    assert sorted(model.qlora_replaced) == sorted(packed) and len(packed) == 14
    for name in packed:
        layer = model.get_submodule(name)
        assert isinstance(layer, QLoRALinear) and torch.equal(layer.packed_weight, packed[name]), name
        assert (layer.r, layer.lora_alpha, layer.compute_dtype) == (4, 8, torch.float32)
        assert (layer.use_dora, layer.use_rslora) == (bool(lora), bool(lora))
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == trainable.keys()
    assert all(torch.equal(ours[n], trainable[n]) for n in ours)
    if lora:
        assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.requires_grad
    # fp32 compute on both sides: the same math in another order
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)


def test_several_peft_adapters_come_over_by_name(bnb_dir):
    """A PEFT model with two adapters (the second with its own r, alpha and rsLoRA): PEFT's active one
    is active here, the other stored under its name; switched to either, the logits are PEFT's."""
    peft_model = _bnb_peft(bnb_dir)
    peft_model.add_adapter("other", peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=PROJ))
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for n, p in peft_model.named_parameters():
            if ".other." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    expected = {}
    for name in ("other", "default"):
        peft_model.set_adapter(name)
        expected[name] = _logits(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    model = qk.from_peft(peft_model)  # "default" active, as PEFT's was last
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.adapter_names == ("default", "other") and layer.lora_stored["other"].r == 8
    assert {_our_name(n) for n in trainable} == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(_logits(model), expected["default"], rtol=1e-5, atol=1e-5)
    qk.set_adapter(model, "other")
    assert (layer.r, layer.lora_alpha, layer.use_rslora) == (8, 4, True)
    torch.testing.assert_close(_logits(model), expected["other"], rtol=1e-5, atol=1e-5)


def test_training_continues_as_peft_would(bnb_dir):
    """3 SGD steps after from_peft give PEFT's losses (no dropout: the same draws on both sides)."""
    expected = train_causal_lm(_bnb_peft(bnb_dir), IDS)
    got = train_causal_lm(qk.from_peft(_bnb_peft(bnb_dir)), IDS)
    assert got[-1] < got[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_dense_peft_model_is_quantized_as_replace_linear_would():
    peft_model = fill_trainable(peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ,
                                                                              lora_dropout=0.1)))
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    model = qk.from_peft(peft_model)
    expected = qk.replace_linear(_llama(), target_modules=PROJ, r=4, lora_alpha=8, compute_dtype=torch.float32)
    for name in expected.qlora_replaced:
        ours, theirs = model.get_submodule(name), expected.get_submodule(name)
        assert torch.equal(ours.packed_weight, theirs.packed_weight) and torch.equal(ours.absmax, theirs.absmax)
        assert ours.lora_dropout == 0.1 and ours.compute_dtype == torch.float32
        assert torch.equal(ours.lora_A, adapters[f"base_model.model.{name}.lora_A.default.weight"])
        assert torch.equal(ours.lora_B, adapters[f"base_model.model.{name}.lora_B.default.weight"])


def test_what_has_no_qlora_form_is_refused_with_the_model_unchanged(bnb_dir):
    with pytest.raises(TypeError, match="takes a peft.PeftModel"):
        qk.from_peft(_llama())

    other_targets = _bnb_peft(bnb_dir)
    other_targets.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"k_proj: has adapters \['default'\] of the model's \['default', 'other'\]"):
        qk.from_peft(other_targets)
    assert not any(isinstance(m, QLoRALinear) for m in other_targets.modules())
    mixed = _bnb_peft(bnb_dir)
    mixed.add_adapter("other", peft.LoraConfig(r=2, target_modules=PROJ, use_dora=True))
    with pytest.raises(ValueError, match="some of its adapters are DoRA and some not"):
        qk.from_peft(mixed)
    saved_twice = _bnb_peft(bnb_dir, modules_to_save=["lm_head"])
    saved_twice.add_adapter("other", peft.LoraConfig(r=2, target_modules=PROJ, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"lm_head: modules_to_save copies for adapters \['other'\]"):
        qk.from_peft(saved_twice)
    assert not any(isinstance(m, QLoRALinear) for m in saved_twice.modules())

    merged = _bnb_peft(bnb_dir)
    merged.base_model.model.model.layers[0].self_attn.q_proj.merged_adapters.append("default")
    with pytest.raises(ValueError, match="q_proj: its adapter is merged"):
        qk.from_peft(merged)
    assert not any(isinstance(m, QLoRALinear) for m in merged.modules())

    embed = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match="embed_tokens: LoRA on a Embedding"):
        qk.from_peft(embed)
    assert not any(isinstance(m, QLoRALinear) for m in embed.modules())

    with pytest.raises(TypeError, match="compute_dtype must be"):
        qk.from_peft(_bnb_peft(bnb_dir), compute_dtype=torch.float64)
