"""Files (issue 4): adapters in PEFT's layout, 4-bit bases in bitsandbytes' Linear4bit layout, and
bad files refused with the model left as it was.

Interop is checked against the real libraries: peft 0.21 (PeftModel.from_pretrained /
save_pretrained) and bitsandbytes 0.50.2 on the CPU (Linear4bit, Params4bit.from_prequantized).
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
import torch.nn as nn

import qlora_kernels as qk
from qlora_kernels import (QLoRALinear, load_adapter, load_quantized, replace_linear, save_adapter,
                           save_pretrained_quantized, save_quantized)
from qlora_kernels import io as qk_io
from qlora_kernels.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFileError

from helpers import fill_trainable, train_causal_lm, write_hf_shards

os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is a runtime dependency")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed: int = 0, hidden: int = 64) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float().eval()


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _qlora_llama(targets=("q_proj", "v_proj"), r=4, train=True) -> nn.Module:
    model = replace_linear(_llama(), target_modules=list(targets), r=r, lora_alpha=2 * r, compute_dtype=torch.float32)
    return fill_trainable(model, 11) if train else model


def _dequantized_base(qmodel: nn.Module) -> nn.Module:
    """The original model with each replaced Linear's weight = dequant(W): the base PEFT sees."""
    base = _llama()
    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if isinstance(mod, QLoRALinear):
                base.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
    return base


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: (m.lora_alpha, m.lora_dropout, m.use_rslora) for n, m in model.named_modules() if isinstance(m, QLoRALinear)})


def _assert_unchanged(model, snap):
    types, flags, state, hyper = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: (m.lora_alpha, m.lora_dropout, m.use_rslora) for n, m in model.named_modules() if isinstance(m, QLoRALinear)} == hyper


def _assert_refused_unchanged(model, load, match, errors=AdapterFileError):
    """load() raises `errors` matching `match`, and the model is as it was before."""
    snap = _snapshot(model)
    with pytest.raises(errors, match=match):
        load()
    _assert_unchanged(model, snap)


# --- adapters ------------------------------------------------------------------------------------


def test_adapter_round_trip_with_mixed_ranks_and_head(tmp_path):
    model = replace_linear(_llama(), target_modules=["q_proj"], r=4, lora_alpha=8, compute_dtype=torch.float32)
    replace_linear(model, target_modules=["down_proj"], r=8, lora_alpha=32, compute_dtype=torch.float32, train_bias=False)
    model.lm_head.weight.requires_grad_(True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    expected = _logits(model)
    save_adapter(model, tmp_path, modules_to_save=["lm_head"])
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] in (4, 8) and cfg["bias"] == "none"
    assert cfg["modules_to_save"] == ["lm_head"]
    assert sorted(cfg["target_modules"]) == sorted(model.qlora_replaced)
    keys = safetensors_torch.load_file(str(tmp_path / ADAPTER_WEIGHTS)).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.weight" in keys

    fresh = replace_linear(_llama(), target_modules=["q_proj"], r=4, compute_dtype=torch.float32)
    replace_linear(fresh, target_modules=["down_proj"], r=8, compute_dtype=torch.float32)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=0)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_our_adapter_loads_in_peft(tmp_path, use_rslora):
    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    model = replace_linear(_llama(), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, compute_dtype=torch.float32,
                           use_rslora=use_rslora)
    replace_linear(model, target_modules=["up_proj"], r=8, lora_alpha=8, compute_dtype=torch.float32,
                   use_rslora=use_rslora)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ours = _logits(model)
    save_adapter(model, tmp_path)

    pm = peft.PeftModel.from_pretrained(_dequantized_base(model), str(tmp_path)).eval()
    lora_layers = [m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 3 * 2  # q, v (r=4) and up (r=8: rank_pattern) in both blocks
    assert {m.scaling["default"] for m in lora_layers} == ({8 / 2, 8 / 8 ** 0.5} if use_rslora else {2.0, 1.0})
    torch.testing.assert_close(_logits(pm), ours, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_what_peft_s_disable_adapter_gives(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    model = _qlora_llama()
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(_dequantized_base(model), str(tmp_path)).eval()
    with pm.disable_adapter():
        theirs = _logits(pm)
    with qk.disable_adapter(model):
        ours = _logits(model)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model), ours, rtol=1e-3, atol=1e-3)  # the adapter is back, and it matters


def test_our_adapter_loads_in_peft_on_a_bitsandbytes_base(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (interop target)")
    model = _qlora_llama()
    ours = _logits(model)
    save_adapter(model, tmp_path)
    base = _bnb_model(_llama(), ["q_proj", "v_proj"], bnb)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(_logits(pm), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_trained_adapter_loads_into_ours(tmp_path, use_rslora):
    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    qmodel = _qlora_llama(train=False, r=8)
    base = _dequantized_base(qmodel)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0, use_rslora=use_rslora))
    train_causal_lm(pm, IDS)
    expected = _logits(pm)
    pm.save_pretrained(str(tmp_path))
    load_adapter(qmodel, tmp_path)
    layers = [m for m in qmodel.modules() if isinstance(m, QLoRALinear)]
    assert any(torch.count_nonzero(m.lora_B) for m in layers)
    assert {m.scale for m in layers} == {16 / 8 ** 0.5 if use_rslora else 2.0}
    torch.testing.assert_close(_logits(qmodel), expected, rtol=1e-5, atol=1e-5)


def test_save_adapter_refuses_layers_that_mix_rslora_and_lora(tmp_path):
    model = _qlora_llama(targets=("q_proj",))
    replace_linear(model, target_modules=["v_proj"], r=4, compute_dtype=torch.float32, use_rslora=True)
    with pytest.raises(ValueError, match="some layers use rsLoRA.*v_proj.*Nothing was written"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def _write_adapter(tmp_path, model, edit):
    save_adapter(model, tmp_path)
    tensors = safetensors_torch.load_file(str(tmp_path / ADAPTER_WEIGHTS))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))


KEY_A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.mark.parametrize("case", ["rank", "shape", "missing_B", "unknown_module", "truncated", "garbage",
                                  "bad_json", "not_lora", "no_files"])
def test_bad_adapter_files_leave_model_unchanged(tmp_path, case):
    source = _qlora_llama()
    target = _qlora_llama(train=False)
    with torch.no_grad():  # distinct from the source, so a partial load would show
        for m in target.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.fill_(0.01)
    if case == "rank":
        save_adapter(_qlora_llama(r=8), tmp_path)
        match = "rank 8"
    elif case == "shape":
        _write_adapter(tmp_path, source, lambda t: t.__setitem__(KEY_A, torch.randn(4, 63)))
        match = "do not fit the layer"
    elif case == "missing_B":
        _write_adapter(tmp_path, source, lambda t: t.pop(KEY_B))
        match = "lora_B missing"
    elif case == "unknown_module":
        _write_adapter(tmp_path, source, lambda t: t.__setitem__(
            "base_model.model.model.layers.0.mlp.nope.lora_A.weight", torch.randn(4, 64)) or t.__setitem__(
            "base_model.model.model.layers.0.mlp.nope.lora_B.weight", torch.randn(64, 4)))
        match = "not a QLoRALinear"
    elif case == "truncated":
        save_adapter(source, tmp_path)
        data = (tmp_path / ADAPTER_WEIGHTS).read_bytes()
        (tmp_path / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
        match = "truncated or corrupt"
    elif case == "garbage":
        save_adapter(source, tmp_path)
        (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"\xff" * 64 + b"not safetensors")
        match = "truncated or corrupt"
    elif case == "bad_json":
        save_adapter(source, tmp_path)
        (tmp_path / ADAPTER_CONFIG).write_text("{r: 4,")
        match = "not valid JSON"
    elif case == "not_lora":
        save_adapter(source, tmp_path)
        cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
        cfg["peft_type"] = "IA3"
        (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
        match = "only LORA"
    else:
        match = "no such file"
    _assert_refused_unchanged(target, lambda: load_adapter(target, tmp_path), match,
                              errors=(AdapterFileError, FileNotFoundError))


def test_strict_adapter_must_cover_every_layer(tmp_path):
    save_adapter(_qlora_llama(targets=("q_proj",)), tmp_path)
    target = _qlora_llama(targets=("q_proj", "v_proj"), train=False)
    _assert_refused_unchanged(target, lambda: load_adapter(target, tmp_path), "no adapter weights for")
    load_adapter(target, tmp_path, strict=False)


def test_save_adapter_needs_qlora_layers(tmp_path):
    with pytest.raises(ValueError, match="no QLoRALinear"):
        save_adapter(_llama(), tmp_path)


# --- quantized bases (bitsandbytes Linear4bit) ----------------------------------------------------


def _bnb_linear(lin: nn.Linear, bnb) -> nn.Module:
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return _exact_cpu_path(q.to("cpu"))  # .to quantizes


def _exact_cpu_path(layer):
    # On CPUs with AVX512-BF16, bitsandbytes' eval forward repacks the weight and multiplies in
    # bf16 (about 1e-3 off on these logits); its other CPU path dequantizes and multiplies in the
    # compute dtype, which is what "identical base outputs" can be checked against.
    layer.support_avx512bf16_for_cpu = False
    return layer


def _bnb_model(model: nn.Module, targets, bnb) -> nn.Module:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _bnb_linear(mod, bnb))
    return model.eval()


def test_bitsandbytes_checkpoint_loads_into_qlora_linear(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (interop target)")
    bmodel = _bnb_model(_llama(), PROJ, bnb)
    expected = _logits(bmodel)
    sd = bmodel.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bnb.safetensors"))

    # into a plain model: its Linears at those names become QLoRALinear
    model = load_quantized(_llama(seed=5), tmp_path / "bnb.safetensors", r=4, compute_dtype=torch.float32)
    assert len(model.qlora_replaced) == 2 * 7
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, QLoRALinear)
    assert torch.equal(q.packed_weight, sd["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(q.absmax, sd["model.layers.1.mlp.down_proj.weight.absmax"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{w}" for n in model.qlora_replaced for w in ("lora_A", "lora_B")}
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)

    # into a model already replaced: the adapters stay, the bases become bitsandbytes'
    qmodel = replace_linear(_llama(seed=9), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    lora_before = {n: p.clone() for n, p in qmodel.named_parameters() if p.requires_grad}
    load_quantized(qmodel, tmp_path / "bnb.safetensors")
    assert all(torch.equal(p, lora_before[n]) for n, p in qmodel.named_parameters() if p.requires_grad)
    torch.testing.assert_close(_logits(qmodel), expected, rtol=1e-5, atol=1e-5)


def _llama_config(tie: bool = False):
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tie)


def _empty_llama(tie: bool = False) -> nn.Module:
    accelerate = pytest.importorskip("accelerate", reason="accelerate is a test dependency (empty-weights init)")
    with accelerate.init_empty_weights():  # parameters on meta, buffers real (as from_pretrained builds)
        return transformers.LlamaForCausalLM(_llama_config(tie)).eval()


def test_sharded_bitsandbytes_checkpoint_directory_loads_into_an_empty_model(tmp_path):
    """A pre-quantized bnb-4bit checkpoint directory (shards + index, as Hugging Face saves them)
    into a model built without memory: every tensor comes from the files, no fp32 copy is ever
    made, and the logits are bitsandbytes' own."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (interop target)")
    bmodel = _bnb_model(_llama(), PROJ, bnb)
    expected = _logits(bmodel)
    write_hf_shards(tmp_path, bmodel.state_dict())
    model = _empty_llama()
    load_quantized(model, tmp_path, r=4, compute_dtype=torch.float32)
    assert len(model.qlora_replaced) == 2 * 7
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{w}" for n in model.qlora_replaced for w in ("lora_A", "lora_B")}
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)

    # The same directory with one file instead of shards.
    single = tmp_path / "single"
    single.mkdir()
    safetensors_torch.save_file({k: v.contiguous() for k, v in bmodel.state_dict().items()},
                                str(single / "model.safetensors"))
    torch.testing.assert_close(_logits(load_quantized(_empty_llama(), single, r=4, compute_dtype=torch.float32)),
                               expected, rtol=0, atol=0)


@pytest.mark.parametrize("torch_save", [False, True], ids=["safetensors", "torch_save"])
def test_dense_checkpoint_quantizes_into_an_empty_model_one_tensor_at_a_time(tmp_path, monkeypatch, torch_save):
    """replace_linear on an empty model, then a 16/32-bit sharded checkpoint: each QLoRALinear
    quantizes its weight as it loads (bit for bit what replace_linear on the loaded model gives),
    and each dense weight is gone before the next is read (the model is never held in 16 bits).
    Shards in torch.save's format too (memory-mapped, each tensor copied out as it is read)."""
    import weakref

    source = _llama()
    write_hf_shards(tmp_path, source.state_dict(), n_shards=3, torch_save=torch_save)
    expected = replace_linear(_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    model = replace_linear(_empty_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)

    dense_keys = {f"{n}.weight" for n in model.qlora_replaced}
    alive: list = []
    most_alive = []
    real_load = qk_io._Checkpoint.load

    def spying_load(self, key):
        t = real_load(self, key)
        if key in dense_keys:
            most_alive.append(sum(r() is not None for r in alive))
            alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(qk_io._Checkpoint, "load", spying_load)
    load_quantized(model, tmp_path)
    assert len(most_alive) == len(dense_keys) and max(most_alive) == 0
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for name in expected.qlora_replaced:
        ours, theirs = model.get_submodule(name), expected.get_submodule(name)
        for buf in ("packed_weight", "absmax", "nested_absmax", "offset"):
            assert torch.equal(getattr(ours, buf), getattr(theirs, buf)), (name, buf)
        assert ours.lora_A.requires_grad and torch.count_nonzero(ours.lora_B) == 0
    torch.testing.assert_close(_logits(model), _logits(expected), rtol=0, atol=0)


def test_dense_checkpoint_with_a_bad_weight_leaves_the_empty_model_as_it_was(tmp_path):
    sd = _llama().state_dict()
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    write_hf_shards(tmp_path, sd)
    model = replace_linear(_empty_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    with pytest.raises(AdapterFileError, match=r"model.layers.1.mlp.down_proj.weight cannot be quantized.*nothing was loaded"):
        load_quantized(model, tmp_path)
    assert all(t.is_meta for t in model.parameters())
    real = replace_linear(_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="device='cpu' places an empty model's tensors"):
        load_quantized(real, tmp_path, device="cpu")

    sd = _llama().state_dict()
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:, :32].contiguous()
    (tmp_path / "model.safetensors.index.json").unlink()
    safetensors_torch.save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"q_proj.weight: torch.float32 \(64, 32\) in the file; QLoRALinear "
                                               r"model.layers.0.self_attn.q_proj quantizes .* of shape \(64, 64\)"):
        load_quantized(model, tmp_path / "model.safetensors")
    assert all(t.is_meta for t in model.parameters())


def test_replace_linear_on_an_empty_model_then_load_quantized_starts_fresh_adapters(tmp_path):
    model = replace_linear(_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    save_quantized(model, tmp_path / "base.safetensors")
    expected = _logits(model)  # lora_B is zero: the base alone
    empty = replace_linear(_empty_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    load_quantized(empty, tmp_path / "base.safetensors")
    layers = [m for m in empty.modules() if isinstance(m, QLoRALinear)]
    assert len(layers) == 14 and all(not t.is_meta for t in [*empty.parameters(), *empty.buffers()])
    assert all(m.lora_A.requires_grad and torch.count_nonzero(m.lora_A) and not torch.count_nonzero(m.lora_B)
               for m in layers)
    torch.testing.assert_close(_logits(empty), expected, rtol=0, atol=0)


def test_empty_layers_with_a_bias_take_the_file_s_bias(tmp_path):
    def block():
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))

    torch.manual_seed(0)
    model = replace_linear(block(), r=4, compute_dtype=torch.float32)
    save_quantized(model, tmp_path / "base.safetensors")
    with torch.device("meta"):
        empty = replace_linear(block(), r=4, compute_dtype=torch.float32)
    load_quantized(empty, tmp_path / "base.safetensors")
    assert all(isinstance(m.bias, nn.Parameter) and not m.bias.is_meta and not m.bias.requires_grad
               for m in empty.modules() if isinstance(m, QLoRALinear))
    x = torch.randn(3, 64)
    torch.testing.assert_close(empty(x), model(x), rtol=0, atol=0)

@pytest.mark.parametrize("empty", [False, True], ids=["real", "empty"])
def test_tied_lm_head_saved_under_one_name_loads_tied(tmp_path, empty):
    """Hugging Face writes a tied lm_head once (under the embedding's name): it loads, and stays
    the embedding's tensor, into a real model and into an empty one."""
    torch.manual_seed(0)
    source = replace_linear(transformers.LlamaForCausalLM(_llama_config(tie=True)).eval(), target_modules=PROJ, r=4,
                            compute_dtype=torch.float32)
    expected = _logits(source)
    sd = qk_io.quantized_state_dict(source)
    del sd["lm_head.weight"]
    safetensors_torch.save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / "tied.safetensors"))
    if empty:
        target = _empty_llama(tie=True)
        target.tie_weights()  # transformers ties at from_pretrained, not under init_empty_weights
        assert target.lm_head.weight is target.model.embed_tokens.weight
    else:
        torch.manual_seed(1)
        target = transformers.LlamaForCausalLM(_llama_config(tie=True)).eval()
    load_quantized(target, tmp_path / "tied.safetensors", r=4, compute_dtype=torch.float32)
    assert target.lm_head.weight is target.model.embed_tokens.weight
    torch.testing.assert_close(_logits(target), expected, rtol=0, atol=0)


def test_meta_buffers_no_file_can_fill_are_refused_before_any_change(tmp_path):
    """Built under torch.device("meta"), a model's non-persistent buffers (rotary inv_freq) are meta
    too and in no checkpoint: refused, naming them and what to do, and nothing loaded."""
    model = replace_linear(_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    save_quantized(model, tmp_path / "base.safetensors")
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(_llama_config()).eval()
    with pytest.raises(AdapterFileError, match=r"inv_freq.*would stay on the meta device.*init_empty_weights"):
        load_quantized(meta, tmp_path / "base.safetensors", r=4)
    assert not any(isinstance(m, QLoRALinear) for m in meta.modules())
    assert all(t.is_meta for t in meta.state_dict().values())


@pytest.mark.parametrize("case", ["missing_shard", "key_in_other_shard", "key_in_no_shard", "not_json", "outside_path",
                                  "empty_dir"])
def test_bad_checkpoint_directories_are_refused(tmp_path, case):
    model = replace_linear(_llama(), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    write_hf_shards(tmp_path, qk_io.quantized_state_dict(model))
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    errors, match = AdapterFileError, None
    if case == "missing_shard":
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
        errors, match = FileNotFoundError, "no such file"
    elif case == "key_in_other_shard":
        key = next(k for k, f in index["weight_map"].items() if f.startswith("model-00001"))
        index["weight_map"][key] = "model-00002-of-00002.safetensors"
        match = "which the index maps elsewhere"
    elif case == "key_in_no_shard":
        index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
        match = "are in no shard.*model.extra.weight"
    elif case == "not_json":
        index = None
        index_path.write_text("{weight_map: ")
        match = "not a JSON object"
    elif case == "outside_path":
        index["weight_map"] = {k: "../" + f for k, f in index["weight_map"].items()}
        match = "plain file names"
    else:
        for f in tmp_path.iterdir():
            f.unlink()
        errors, match = FileNotFoundError, "without model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
    if index is not None and case not in ("missing_shard", "empty_dir"):
        index_path.write_text(json.dumps(index))
    target = replace_linear(_llama(seed=3), target_modules=PROJ, r=4, compute_dtype=torch.float32)
    _assert_refused_unchanged(target, lambda: load_quantized(target, tmp_path), match, errors=errors)


def test_save_pretrained_quantized_loads_in_transformers_and_back(tmp_path):
    """A merged, re-quantized model published as a "bnb-4bit" checkpoint directory: transformers
    loads it with bitsandbytes' Linear4bit layers (the unquantized Linears skipped), and
    load_quantized loads it into an empty model, both giving the model's logits."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (interop target)")
    model = qk.merge_and_unload(_qlora_llama(targets=("q_proj", "v_proj", "up_proj")), requantize=True)
    expected = _logits(model)
    save_pretrained_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"]
    assert "lm_head" in qc["llm_int8_skip_modules"] and "model.layers.1.self_attn.k_proj" in qc["llm_int8_skip_modules"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    for m in hf.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            _exact_cpu_path(m)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(hf.model.layers[0].self_attn.k_proj) is nn.Linear
    torch.testing.assert_close(_logits(hf), expected, rtol=1e-5, atol=1e-5)

    back = load_quantized(_empty_llama(), tmp_path, r=4, compute_dtype=torch.float32)
    assert sorted(back.qlora_replaced) == sorted(model.qlora_replaced)
    torch.testing.assert_close(_logits(back), expected, rtol=0, atol=0)


def test_save_pretrained_quantized_refuses_what_bitsandbytes_cannot_describe(tmp_path):
    mixed = replace_linear(_llama(), target_modules=["q_proj"], r=4, compute_dtype=torch.float32)
    replace_linear(mixed, target_modules=["v_proj"], r=4, compute_dtype=torch.float32, quant_type="fp4")
    with pytest.raises(ValueError, match=r"quant_type differ \(\['fp4', 'nf4'\]\).*Nothing was written"):
        save_pretrained_quantized(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(TypeError, match="takes a Hugging Face model"):
        save_pretrained_quantized(replace_linear(nn.Sequential(nn.Linear(64, 64)), r=4), tmp_path / "plain")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_pretrained_quantized(_qlora_llama(), tmp_path / "a_file")


def test_our_quantized_base_loads_into_bitsandbytes(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (interop target)")
    model = _qlora_llama(targets=PROJ, train=False)
    expected = _logits(model)
    path = save_quantized(model, tmp_path / "base.safetensors")
    sd = safetensors_torch.load_file(str(path))
    assert not any("lora_" in k for k in sd)

    bmodel = _llama(seed=3)
    for name in list(model.qlora_replaced):
        lin = bmodel.get_submodule(name)
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
        stats = {k[len(name) + len(".weight."):]: v for k, v in sd.items() if k.startswith(f"{name}.weight.")}
        layer.weight = bnb.nn.Params4bit.from_prequantized(sd[f"{name}.weight"], stats, requires_grad=False,
                                                           device="cpu", module=layer)
        _exact_cpu_path(layer)
        parent, _, child = name.rpartition(".")
        setattr(bmodel.get_submodule(parent), child, layer)
    rest = {k: v for k, v in sd.items() if not any(k.startswith(f"{n}.weight") for n in model.qlora_replaced)}
    missing, unexpected = bmodel.load_state_dict(rest, strict=False)
    assert not unexpected
    assert all(any(m.startswith(f"{n}.weight") for n in model.qlora_replaced) for m in missing)
    torch.testing.assert_close(_logits(bmodel.eval()), expected, rtol=1e-5, atol=1e-5)


def test_quantized_round_trip_ours(tmp_path):
    model = _qlora_llama(targets=PROJ)
    save_quantized(model, tmp_path / "base.safetensors")
    save_adapter(model, tmp_path / "adapter")
    fresh = load_quantized(_llama(seed=4), tmp_path / "base.safetensors", r=4, lora_alpha=8,
                           compute_dtype=torch.float32)
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["truncated", "other_shape", "missing_key", "unexpected_key", "no_quantized"])
def test_bad_quantized_files_leave_model_unchanged(tmp_path, case):
    source = _qlora_llama(targets=PROJ, train=False)
    path = tmp_path / "base.safetensors"
    save_quantized(source, path)
    if case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
        match = "truncated or corrupt"
    elif case == "other_shape":
        other = replace_linear(_llama(hidden=128), target_modules=PROJ, r=4)
        save_quantized(other, path)
        match = "does not fit"
    else:
        sd = safetensors_torch.load_file(str(path))
        if case == "missing_key":
            sd.pop("model.norm.weight")
            match = "missing from the file.*model.norm.weight"
        elif case == "unexpected_key":
            sd["model.extra.weight"] = torch.zeros(3)
            match = "not in the model.*model.extra.weight"
        else:
            sd = {k: v for k, v in sd.items() if ".weight." not in k}
            match = "no 4-bit quantized weights"
        safetensors_torch.save_file(sd, str(path))
    target = _llama(seed=1)
    _assert_refused_unchanged(target, lambda: load_quantized(target, path, r=4), match)


# --- input validation ------------------------------------------------------------------------------


class _Blk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)


class _Nested(nn.Module):
    """Module names where one ("a") is a "."-suffix of another ("blk.a"), as PEFT's patterns see them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.blk = _Blk()

    def forward(self, x):
        return self.blk.c(self.blk.a(self.a(x)))


def _nested(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return _Nested().eval()


X64 = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))


def _nested_qlora(case: str, train: bool = True) -> nn.Module:
    # "a" differs from the (majority) default, "blk.a" and "blk.c" have the default
    r_a, alpha_a = (8, 16) if case == "rank" else (4, 3.0)
    model = replace_linear(_nested(), target_modules=["blk.a", "blk.c"], r=4, lora_alpha=16,
                           compute_dtype=torch.float32)
    replace_linear(model, target_modules=r"a", r=r_a, lora_alpha=alpha_a, compute_dtype=torch.float32)
    return fill_trainable(model, 5) if train else model


@pytest.mark.parametrize("case", ["alpha", "rank"])
def test_nested_names_round_trip_exactly(tmp_path, case):
    model = _nested_qlora(case)
    save_adapter(model, tmp_path)
    fresh = _nested_qlora(case, train=False)
    with torch.no_grad():  # wrong hyperparameters on purpose: the load must set them
        for m in fresh.modules():
            if isinstance(m, QLoRALinear):
                m.lora_alpha = 1.0
    load_adapter(fresh, tmp_path)
    hyper = {n: (m.r, m.lora_alpha) for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert {n: (m.r, m.lora_alpha) for n, m in fresh.named_modules() if isinstance(m, QLoRALinear)} == hyper
    torch.testing.assert_close(fresh(X64), model(X64), rtol=0, atol=0)

    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    base = _nested()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, QLoRALinear):
                base.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    inner = pm.base_model.model
    assert {n: (inner.get_submodule(n).r["default"], inner.get_submodule(n).lora_alpha["default"])
            for n in hyper} == hyper
    torch.testing.assert_close(pm(X64), model(X64), rtol=1e-5, atol=1e-5)


def test_adapter_peft_wrote_in_torch_save_format_loads(tmp_path):
    """adapter_model.bin (what PEFT writes with safe_serialization=False, and what adapters saved
    before safetensors hold) loads as its safetensors twin does: the trained layers' outputs, bit for
    bit. Beside an adapter_model.safetensors it is not read (PEFT's preference)."""
    peft = pytest.importorskip("peft", reason="peft is a test dependency (interop target)")
    model = _nested_qlora("alpha")
    save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(_nested(), str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "peft_bin"), safe_serialization=False)
    assert (tmp_path / "peft_bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "peft_bin" / ADAPTER_WEIGHTS).exists()
    fresh = _nested_qlora("alpha", train=False)
    load_adapter(fresh, tmp_path / "peft_bin")
    torch.testing.assert_close(fresh(X64), model(X64), rtol=0, atol=0)

    # torch.save's format before torch 1.6 (no zip archive, so it cannot be memory-mapped): read whole
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / ADAPTER_CONFIG).write_text((tmp_path / "peft_bin" / ADAPTER_CONFIG).read_text())
    torch.save(torch.load(tmp_path / "peft_bin" / "adapter_model.bin", weights_only=True),
               legacy / "adapter_model.bin", _use_new_zipfile_serialization=False)
    fresh = _nested_qlora("alpha", train=False)
    load_adapter(fresh, legacy)
    torch.testing.assert_close(fresh(X64), model(X64), rtol=0, atol=0)

    # both files: the safetensors one is read (here the .bin is garbage, so reading it would fail)
    save_adapter(_nested_qlora("alpha"), tmp_path / "both")
    (tmp_path / "both" / "adapter_model.bin").write_bytes(b"not a torch file")
    load_adapter(_nested_qlora("alpha", train=False), tmp_path / "both")


class _RunsCodeWhenUnpickled:
    """An object whose unpickling would create a directory: proof of code run by a load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("case", ["runs_code", "not_a_dict", "truncated", "garbage"])
def test_bad_torch_save_files_are_refused_without_running_code(tmp_path, case):
    """A .bin adapter or checkpoint is read with torch.load(weights_only=True): a pickle that would run
    code is refused and the code never runs; anything but a dict of named tensors, or a damaged file,
    is refused naming the file, and the model is unchanged."""
    source = _nested_qlora("alpha")
    save_adapter(source, tmp_path)
    tensors = safetensors_torch.load_file(str(tmp_path / ADAPTER_WEIGHTS))
    (tmp_path / ADAPTER_WEIGHTS).unlink()
    weights = tmp_path / "adapter_model.bin"
    marker = tmp_path / "code_ran"
    if case == "runs_code":
        torch.save({**tensors, "extra": _RunsCodeWhenUnpickled(marker)}, weights)
        match = r"holds objects other than tensors.*refused, nothing run \(.*GLOBAL posix\.mkdir"
    elif case == "not_a_dict":
        torch.save(list(tensors.values()), weights)
        match = "holds a list, not a dict of named tensors"
    elif case == "truncated":
        torch.save(tensors, weights)
        weights.write_bytes(weights.read_bytes()[:-200])
        match = "truncated or corrupt"
    else:
        weights.write_bytes(b"\x80\x02not a zip archive at all")
        match = "not a readable torch.save file .truncated or corrupt.*Unsupported operand"
    target = _nested_qlora("alpha", train=False)
    _assert_refused_unchanged(target, lambda: load_adapter(target, tmp_path), rf"adapter_model\.bin: .*{match}")
    assert not marker.exists()
    # the same file as a checkpoint
    plain = _nested()
    _assert_refused_unchanged(plain, lambda: load_quantized(plain, weights), rf"adapter_model\.bin: .*{match}")
    assert not marker.exists()


@pytest.mark.parametrize("patterns", [
    {"a": 8}, {"^a": 8}, {"blk\\.a": 8, "a": 2}, {"a": 2, "blk\\.a": 8}, {".*c": 8, "^blk\\.a": 6}, {"zzz": 1},
])
def test_pattern_resolution_is_peft_s(tmp_path, patterns):
    # Files written by PEFT (or by hand) resolve as PEFT resolves them: first matching key wins.
    peft_other = pytest.importorskip("peft.utils.other", reason="peft is a test dependency (interop target)")
    from qlora_kernels.io import _pattern_value, _read_patterns

    compiled = _read_patterns({"rank_pattern": patterns}, "rank_pattern", lambda v: v, tmp_path)
    for name in ("a", "blk.a", "blk.c", "x.blk.a"):
        key = peft_other.get_pattern_key(patterns.keys(), name)
        assert _pattern_value(compiled, name, 4) == patterns.get(key, 4), name


def _small(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 4)).eval()


def _small_qlora(seed=0) -> nn.Module:
    return replace_linear(_small(seed), target_modules=["0", "1"], r=4, compute_dtype=torch.float32)


@pytest.mark.parametrize("into", ["qlora", "plain"])
@pytest.mark.parametrize("key,value,match", [
    ("0.bias", torch.tensor([7.0]), r"0\.bias: .*shape \(1,\).*\(32,\)"),
    ("1.bias", torch.zeros(5), r"1\.bias: .*shape \(5,\).*\(16,\)"),
    ("1.bias", torch.zeros(16, dtype=torch.int64), r"1\.bias: torch\.int64.*floating-point"),
    ("2.weight", torch.zeros(4, 16, dtype=torch.int32), r"2\.weight: dtype torch\.int32"),
])
def test_load_quantized_checks_biases_and_dtypes_before_any_change(tmp_path, into, key, value, match):
    path = tmp_path / "base.safetensors"
    save_quantized(_small_qlora(seed=1), path)
    sd = safetensors_torch.load_file(str(path))
    sd[key] = value
    safetensors_torch.save_file(sd, str(path))
    target = _small_qlora() if into == "qlora" else _small()
    _assert_refused_unchanged(target, lambda: load_quantized(target, path, r=4), match)


def test_load_quantized_into_plain_linears_keeps_their_hooks(tmp_path):
    """A plain Linear that takes a 4-bit weight from the file becomes a QLoRALinear with the
    Linear's hooks, as replace_linear gives them: registered forward / backward hooks and an
    accelerate device hook fire on the new layer, and their handles still remove them."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CountCalls(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    path = tmp_path / "base.safetensors"
    save_quantized(_small_qlora(seed=1), path)
    target = _small()
    seen = []
    handles = [target[0].register_forward_hook(lambda m, args, out: seen.append(("fwd", type(m).__name__))),
               target[1].register_full_backward_hook(lambda m, gin, gout: seen.append(("bwd", type(m).__name__)))]
    add_hook_to_module(target[1], CountCalls())
    load_quantized(target, path, r=4, compute_dtype=torch.float32)
    assert isinstance(target[0], QLoRALinear) and isinstance(target[1], QLoRALinear)
    assert isinstance(target[1]._hf_hook, CountCalls)
    target(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert seen == [("fwd", "QLoRALinear"), ("bwd", "QLoRALinear")] and CountCalls.calls == 1
    for h in handles:
        h.remove()
    seen.clear()
    target(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert seen == [] and CountCalls.calls == 2


@pytest.mark.parametrize("why", ["instance_forward", "subclass_forward", "offloaded"])
def test_load_quantized_refuses_a_linear_whose_forward_does_more(tmp_path, why):
    """A 4-bit weight in the file for a Linear whose forward is more than nn.Linear.forward (replaced
    on the instance, overridden by a subclass, or offloaded by accelerate): a QLoRALinear in its
    place would drop that behaviour, so the load is refused, naming the layer, and nothing changes
    (replace_linear skips such a Linear; here the file's weight would have nowhere to go)."""
    path = tmp_path / "base.safetensors"
    save_quantized(_small_qlora(seed=1), path)
    target = _small()
    if why == "instance_forward":
        target[1].forward = lambda x: nn.functional.linear(x, target[1].weight, target[1].bias) * 2
    elif why == "subclass_forward":
        class Doubled(nn.Linear):
            def forward(self, x):
                return super().forward(x) * 2

        old = target[1]
        target[1] = Doubled(32, 16)
        target[1].load_state_dict(old.state_dict())
    else:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        add_hook_to_module(target[1], AlignDevicesHook(execution_device="cpu", offload=True))
    match = {"instance_forward": "forward was replaced on the instance", "subclass_forward": "Doubled overrides",
             "offloaded": "offloads its weights"}[why]
    pattern = rf"\b1: cannot take .*{match}"
    if why != "offloaded":
        _assert_refused_unchanged(target, lambda: load_quantized(target, path, r=4), pattern)
    else:  # the offloaded Linear's tensors are on meta (the hook keeps them): compare the others
        before = target[0].weight.clone()
        with pytest.raises(AdapterFileError, match=pattern):
            load_quantized(target, path, r=4)
        assert torch.equal(target[0].weight, before) and target[1].weight.is_meta
    assert type(target[0]) is nn.Linear and not any(isinstance(m, QLoRALinear) for m in target.modules())


LAYER = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("leaf", ["packed_weight", "absmax", "nested_absmax", "offset", "lora_A", "bias"])
def test_adapter_cannot_write_into_qlora_internals(tmp_path, leaf):
    target = _qlora_llama(train=False)
    if leaf == "bias":  # Llama's projections have none; give this one a bias the file could overwrite
        target.get_submodule(LAYER).bias = nn.Parameter(torch.zeros(32), requires_grad=False)
    own = target.state_dict()[f"{LAYER}.{leaf}"]  # right shape and dtype: only the address is wrong
    _write_adapter(tmp_path, _qlora_llama(), lambda t: t.__setitem__(
        f"base_model.model.{LAYER}.{leaf}", torch.ones_like(own)))
    _assert_refused_unchanged(target, lambda: load_adapter(target, tmp_path),
                              rf"{LAYER}\.{leaf}'? addresses QLoRALinear '{LAYER}'")


@pytest.mark.parametrize("key,value,match", [
    ("lm_head.weight", torch.ones(96, 64, dtype=torch.bool), r"lm_head\.weight: dtype torch\.bool"),
    ("lm_head.weight", torch.ones(96, 64, dtype=torch.int64), r"lm_head\.weight: dtype torch\.int64"),
    ("step_count", torch.ones(3, dtype=torch.float32), r"step_count: dtype torch\.float32 .* torch\.int64"),
    ("step_count", torch.ones(3, dtype=torch.int32), r"step_count: dtype torch\.int32 .* torch\.int64"),
    (f"{LAYER}.base_layer.bias", torch.ones(32, dtype=torch.int64), r"base_layer\.bias: dtype torch\.int64"),
])
def test_adapter_entries_keep_their_dtype_kind(tmp_path, key, value, match):
    def model(train):
        m = _qlora_llama(train=train)
        m.register_buffer("step_count", torch.zeros(3, dtype=torch.int64))
        return m

    target = model(train=False)
    if "base_layer" in key:  # Llama's projections have no bias; give this one a bias the file may set
        target.get_submodule(LAYER).bias = nn.Parameter(torch.zeros(32), requires_grad=False)
    _write_adapter(tmp_path, model(train=True), lambda t: t.__setitem__(f"base_model.model.{key}", value))
    _assert_refused_unchanged(target, lambda: load_adapter(target, tmp_path), match)


def test_save_adapter_warns_when_layer_dropouts_differ(tmp_path):
    model = _qlora_llama()
    model.model.layers[1].self_attn.v_proj.lora_dropout = 0.1
    with pytest.warns(UserWarning, match=r"lora_dropout differ.*0\.1: \['model\.layers\.1\.self_attn\.v_proj'\]"):
        save_adapter(model, tmp_path)
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["lora_dropout"] == 0.1
    fresh = _qlora_llama(train=False)
    load_adapter(fresh, tmp_path)
    assert {m.lora_dropout for m in fresh.modules() if isinstance(m, QLoRALinear)} == {0.1}


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value,match", [
    ("lora_dropout", 1.0, "lora_dropout must be"), ("lora_dropout", -0.1, "lora_dropout must be"),
    ("lora_dropout", "0.1", "lora_dropout must be"), ("lora_dropout", NAN, "lora_dropout must be"),
    ("lora_alpha", NAN, "lora_alpha must be"), ("lora_alpha", INF, "lora_alpha must be"),
    ("lora_alpha", "8", "lora_alpha must be"),
    ("lora_alpha", None, "lora_alpha must be"), ("lora_alpha", True, "lora_alpha must be"),
    ("r", 4.7, "r must be"), ("r", 0, "r must be"), ("r", -4, "r must be"), ("r", "4", "r must be"),
    ("r", True, "r must be"), ("r", None, "r must be"),
    ("rank_pattern", [1], "rank_pattern must be an object"), ("rank_pattern", "v_proj", "rank_pattern must be"),
    ("rank_pattern", {"v_pr(oj": 4}, r"rank_pattern key 'v_pr\(oj' is not a valid regex"),
    ("rank_pattern", {"v_proj": "x"}, r"rank_pattern\['v_proj'\] must be a positive integer"),
    ("rank_pattern", {"v_proj": 4.5}, r"rank_pattern\['v_proj'\] must be a positive integer"),
    ("rank_pattern", {"v_proj": 0}, r"rank_pattern\['v_proj'\] must be a positive integer"),
    ("alpha_pattern", {"v_proj": "x"}, r"alpha_pattern\['v_proj'\] must be a finite number"),
    ("alpha_pattern", {"v_proj": NAN}, r"alpha_pattern\['v_proj'\] must be a finite number"),
    ("alpha_pattern", {"[": 8}, r"alpha_pattern key '\[' is not a valid regex"),
    ("alpha_pattern", 3, "alpha_pattern must be an object"),
    ("use_rslora", "true", "use_rslora must be true or false"), ("use_rslora", 1, "use_rslora must be true or false"),
    ("fan_in_fan_out", "false", "fan_in_fan_out must be true or false"),
    ("use_dora", "yes", "use_dora must be true or false"),
    ("use_dora", True, r"the adapter is DoRA \(use_dora=True\) but the layer is not"),
])
def test_bad_adapter_config_values_are_refused(tmp_path, field, value, match):
    save_adapter(_qlora_llama(), tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    cfg[field] = value
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    target = _qlora_llama(train=False)
    _assert_refused_unchanged(target, lambda: load_adapter(target, tmp_path), match)


def test_integral_float_rank_and_missing_dropout_still_load(tmp_path):
    model = _qlora_llama()
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    cfg["r"], cfg["lora_dropout"] = 4.0, None
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    fresh = _qlora_llama(train=False)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)


def test_negative_alpha_round_trips(tmp_path):
    """A negative lora_alpha (allowed by QLoRALinear and PEFT: it flips the update's sign) saves and
    loads back like any other."""
    model = _qlora_llama()
    layer = next(m for m in model.modules() if isinstance(m, QLoRALinear))
    layer.lora_alpha = -8
    save_adapter(model, tmp_path)
    fresh = _qlora_llama(train=False)
    load_adapter(fresh, tmp_path)
    assert next(m for m in fresh.modules() if isinstance(m, QLoRALinear)).lora_alpha == -8
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("call", ["save_adapter", "load_adapter", "save_quantized", "load_quantized"])
def test_io_functions_refuse_a_non_module(tmp_path, call):
    fn = {"save_adapter": save_adapter, "load_adapter": load_adapter, "save_quantized": save_quantized,
          "load_quantized": load_quantized}[call]
    with pytest.raises(TypeError, match=rf"{call} takes an nn.Module as `model`, got NoneType"):
        fn(None, tmp_path / "x")


@pytest.mark.parametrize("modules,error,match", [
    ("lm_head", TypeError, r"modules_to_save must be a list of module names, got the string 'lm_head'"),
    ([""], TypeError, r"non-empty module names"),
    ([3], TypeError, r"non-empty module names"),
    (5, TypeError, r"modules_to_save must be a list of module names, got int"),
    (["model.layers.0"], ValueError, r"'model.layers.0' contains QLoRALinear layer\(s\)"),
])
def test_save_adapter_checks_modules_to_save(tmp_path, modules, error, match):
    with pytest.raises(error, match=match):
        save_adapter(_qlora_llama(), tmp_path, modules_to_save=modules)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_save_adapter_failure_writing_the_config_keeps_the_previous_pair(tmp_path, monkeypatch):
    save_adapter(_qlora_llama(targets=("q_proj",)), tmp_path)
    before = _files(tmp_path)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(_qlora_llama(), tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == before  # old weights and config, no temporary files left
    load_adapter(_qlora_llama(targets=("q_proj",), train=False), tmp_path)


def test_save_adapter_failure_renaming_the_config_keeps_the_previous_pair(tmp_path, monkeypatch):
    save_adapter(_qlora_llama(targets=("q_proj",)), tmp_path)
    before = _files(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst).endswith(ADAPTER_CONFIG):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        save_adapter(_qlora_llama(), tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == before  # the weights already renamed into place were put back


def test_save_quantized_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "base.safetensors"
    save_quantized(_small_qlora(), path)
    before = _files(tmp_path)

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_torch, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_quantized(_small_qlora(seed=2), path)
    monkeypatch.undo()
    assert _files(tmp_path) == before


def test_save_quantized_refuses_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; give a file path"):
        save_quantized(_small_qlora(), tmp_path)
    assert not any(tmp_path.iterdir())


class _AliasedLinear(nn.Module):
    """One Linear registered under two names (x and y), as some models share a projection."""

    def __init__(self):
        super().__init__()
        self.x = nn.Linear(64, 32)
        self.y = self.x
        self.z = nn.Linear(32, 8)

    def forward(self, t):
        return self.z(self.y(self.x(t)[:, :32].repeat(1, 2)))


def test_quantized_file_of_a_model_with_an_aliased_linear_round_trips(tmp_path):
    """The file holds the shared layer once, under its first name; loading it into a fresh model
    swaps in one QLoRALinear at both names, with the same outputs."""
    torch.manual_seed(0)
    model = replace_linear(_AliasedLinear(), r=2)
    save_quantized(model, tmp_path / "q.safetensors")
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(tmp_path / "q.safetensors")) if k.startswith("y.")]
    torch.manual_seed(1)
    fresh = load_quantized(_AliasedLinear(), tmp_path / "q.safetensors", r=2)
    assert isinstance(fresh.x, QLoRALinear) and fresh.y is fresh.x
    t = torch.randn(3, 64)
    torch.testing.assert_close(fresh(t), model(t), rtol=0, atol=0)
