"""Named adapters on one 4-bit base (nn.py: add_adapter / set_adapter / delete_adapter /
adapter_active; io.py: load_adapter / save_adapter with adapter_name), PEFT's multi-adapter API.

Oracle: PEFT itself. A PEFT model with two LoRA (or DoRA) adapters over the dequantized base saves
them (save_pretrained writes the second into a subfolder); ours loads both by name and, switched to
either, gives PEFT's outputs switched to the same one. The rest pins what PEFT users rely on:
switching keeps the parameter objects (an optimizer holds them), only the active adapter trains,
state dicts carry every adapter, and a refused call changes nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import qlora_kernels as qk
from qlora_kernels import QLoRALinear, replace_linear
from qlora_kernels.io import AdapterFileError

peft = pytest.importorskip("peft", reason="peft is a test dependency (the oracle for adapter switching)")

TARGETS = ["fc1", "fc2"]
X = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Net().eval()


def _ours(use_dora: bool = False, r: int = 4) -> nn.Module:
    return replace_linear(_net(), target_modules=TARGETS, r=r, lora_alpha=8, compute_dtype=torch.float32,
                          use_dora=use_dora)


def _randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _layers(model) -> list[QLoRALinear]:
    return [m for m in model.modules() if isinstance(m, QLoRALinear)]


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_two_adapters_peft_saved_switch_as_in_peft(tmp_path, use_dora):
    ours = _ours(use_dora)
    base = _net()
    with torch.no_grad():  # the base PEFT sees: ours dequantized
        for name in TARGETS:
            base.get_submodule(name).weight.copy_(ours.get_submodule(name).dequantize(torch.float32))
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora))
    pm.add_adapter("other", peft.LoraConfig(r=8, lora_alpha=4, target_modules=TARGETS, use_dora=use_dora,
                                            use_rslora=True))
    _randomize([p for n, p in pm.named_parameters() if "lora_" in n], seed=1)
    pm.eval().save_pretrained(str(tmp_path))  # "default" in tmp_path, "other" in tmp_path/other
    qk.load_adapter(ours, tmp_path)
    qk.load_adapter(ours, tmp_path / "other", adapter_name="other")
    assert all(layer.adapter_names == ("default", "other") for layer in _layers(ours))
    for name in ("default", "other", "default"):
        pm.set_adapter(name)
        qk.set_adapter(ours, name)
        layer = ours.fc1
        assert (layer.active_adapter, layer.r, layer.use_rslora) == (name, *((4, False) if name == "default" else (8, True)))
        torch.testing.assert_close(_outputs(ours), _outputs(pm), rtol=1e-5, atol=1e-5)
        # the trainable parameters are the active adapter's, as PEFT's set_adapter leaves them
        report = qk.memory_report(ours)  # print_trainable_parameters' numbers, every adapter counted in "all"
        assert (report.trainable_params, report.all_params) == pm.get_nb_trainable_parameters(), name

    # save_adapter(adapter_name) writes that one; PEFT loads it as it was
    qk.save_adapter(ours, tmp_path / "again", adapter_name="other")
    reloaded = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "again"))
    with torch.no_grad():
        for name in TARGETS:
            reloaded.base_model.model.get_submodule(name).base_layer.weight.copy_(
                ours.get_submodule(name).dequantize(torch.float32))
    pm.set_adapter("other")
    torch.testing.assert_close(_outputs(reloaded.eval()), _outputs(pm), rtol=1e-5, atol=1e-5)
    assert ours.fc1.active_adapter == "default"


def test_switching_keeps_parameter_objects_and_trains_only_the_active_adapter():
    """An optimizer built over both adapters keeps updating each (set_adapter moves the parameter
    objects, never copies); steps taken with "b" active leave "default" bit for bit as it was."""
    model = _ours()
    _randomize([p for p in model.parameters() if p.requires_grad], seed=2)
    qk.add_adapter(model, "b", r=2, lora_alpha=4)
    default_params = [model.fc1.lora_A, model.fc1.lora_B]
    b_params = list(model.fc1.lora_stored["b"].parameters())
    assert not any(p.requires_grad for p in b_params)
    y_default = _outputs(model)
    with qk.disable_adapter(model):
        y_base = _outputs(model)
    qk.set_adapter(model, "b")
    assert model.fc1.lora_A is b_params[0] and model.fc1.lora_stored["default"].lora_A is default_params[0]
    assert torch.equal(_outputs(model), y_base)  # a fresh adapter is the identity update (B = 0)
    opt = torch.optim.SGD([p for layer in _layers(model) for p in layer._adapter_tensors()], lr=0.5)
    before = {id(p): p.detach().clone() for p in default_params}
    for _ in range(2):
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(_outputs(model), y_default)
    assert all(torch.equal(p, before[id(p)]) for p in default_params)
    qk.set_adapter(model, "default")
    assert torch.equal(_outputs(model), y_default)
    with qk.adapter_active(model, "b"):  # switches without touching requires_grad, restores on exit
        assert not torch.equal(_outputs(model), y_default)
        assert not model.fc1.lora_A.requires_grad and model.fc1.lora_stored["default"].lora_A.requires_grad
    assert model.fc1.active_adapter == "default" and torch.equal(_outputs(model), y_default)


def test_state_dict_carries_every_adapter_and_refuses_one_the_model_lacks():
    model = _ours()
    qk.add_adapter(model, "b", r=2)
    _randomize([p for layer in _layers(model) for p in layer._adapter_tensors()], seed=3)
    sd = model.state_dict()
    assert {"fc1.lora_stored.b.lora_A", "fc1.lora_stored.b.lora_B"} <= set(sd)
    fresh = qk.add_adapter(_ours(), "b", r=2)
    fresh.load_state_dict(sd)
    for name in ("default", "b"):
        with qk.adapter_active(model, name), qk.adapter_active(fresh, name):
            assert torch.equal(_outputs(fresh), _outputs(model)), name

    def unchanged(target, load, match):
        snap = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            load()
        assert all(torch.equal(target.state_dict()[k], v) for k, v in snap.items())

    plain = _ours()  # no adapter "b": refused before anything is copied
    unchanged(plain, lambda: plain.load_state_dict(sd), r"adapter\(s\) \['b'\] that the layer does not hold")
    other_rank = qk.add_adapter(_ours(), "b", r=3)
    unchanged(other_rank, lambda: other_rank.load_state_dict(sd), r"lora_stored\.b\.lora_A .*\(2, 64\).*\(3, 64\)")
    qk.delete_adapter(model, "b")
    assert not any("lora_stored" in k for k in model.state_dict())  # one adapter: the state dict it always had


def test_bad_adapter_calls_change_nothing(tmp_path):
    model = _ours()
    qk.add_adapter(model, "b")
    for bad in ("", "a.b", 3):
        with pytest.raises(ValueError, match="adapter name must be a non-empty string"):
            qk.add_adapter(model, bad)
    for taken in ("keys", "training", "_x"):  # names a ModuleDict entry cannot have
        with pytest.raises(ValueError, match="taken by nn.ModuleDict's own attributes"):
            qk.add_adapter(model, taken)
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        qk.add_adapter(model, "b")
    with pytest.raises(ValueError, match="LoftQ / PiSSA change the base"):
        qk.add_adapter(model, "c", init_lora_weights="loftq")
    with pytest.raises(ValueError, match="hold no adapter named 'zzz'"):
        qk.set_adapter(model, "zzz")
    with pytest.raises(ValueError, match="'default' is the active adapter"):
        qk.delete_adapter(model, "default")
    assert all(layer.adapter_names == ("default", "b") and layer.active_adapter == "default"
               for layer in _layers(model))
    with pytest.raises(ValueError, match="r must be a positive int"):  # the first layer's was added, then undone
        qk.add_adapter(model, "c", r=0)
    assert all(layer.adapter_names == ("default", "b") for layer in _layers(model))

    # a named load that does not fit leaves no trace of the new adapter
    qk.save_adapter(_ours(r=4), tmp_path / "dora_file")
    dora = _ours(use_dora=True)
    with pytest.raises(AdapterFileError, match="is not DoRA"):
        qk.load_adapter(dora, tmp_path / "dora_file", adapter_name="new")
    assert all(layer.adapter_names == ("default",) for layer in _layers(dora))
    # bias / modules_to_save are the model's own: not loaded as an inactive adapter
    source = _ours()
    source.head.weight.requires_grad_(True)
    qk.save_adapter(source, tmp_path / "with_head", modules_to_save=["head"])
    target = _ours()
    with pytest.raises(AdapterFileError, match="entries besides LoRA weights.*head"):
        qk.load_adapter(target, tmp_path / "with_head", adapter_name="new")
    assert all(layer.adapter_names == ("default",) for layer in _layers(target))
    # a name some layers hold and others not
    half = _ours()
    half.fc1.add_adapter("b")
    with pytest.raises(ValueError, match="held by 1 of the model's 2"):
        qk.load_adapter(half, tmp_path / "dora_file", adapter_name="b")


def test_merge_unload_and_memory_report_with_stored_adapters():
    """merge_and_unload merges the active adapter (PEFT's); the stored ones go with the layer.
    memory_report counts every adapter's bytes in the layer's row."""
    model = _ours()
    qk.add_adapter(model, "b", r=8)
    qk.set_adapter(model, "b")
    _randomize(model.fc1._adapter_tensors() + model.fc2._adapter_tensors(), seed=4)
    report = qk.memory_report(model)
    row = next(r for r in report.rows if r.name == "fc1")
    assert row.lora_bytes == sum(p.numel() * 4 for p in model.fc1._adapter_tensors()) == (4 + 8) * (64 + 48) * 4
    assert not any("lora_stored" in r.name for r in report.rows)
    expected = _outputs(model)
    merged = qk.merge_and_unload(copy.deepcopy(model))
    assert type(merged.fc1) is nn.Linear
    torch.testing.assert_close(_outputs(merged), expected, rtol=1e-5, atol=1e-5)


def test_stored_adapters_stay_out_of_base_files_and_come_alive_in_an_empty_model(tmp_path):
    """save_quantized writes the base without any adapter (stored ones included); an empty model
    (init_empty_weights) given a second adapter before load_quantized has both made real."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is a test dependency (empty-weights init)")
    from safetensors import safe_open

    model = qk.add_adapter(_ours(), "b", r=2)
    path = qk.save_quantized(model, tmp_path / "base.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert not any("lora" in k for k in f.keys())
    with accelerate.init_empty_weights():
        empty = _Net().eval()
    replace_linear(empty, target_modules=TARGETS, r=4, lora_alpha=8, compute_dtype=torch.float32)
    qk.add_adapter(empty, "b", r=2)
    qk.load_quantized(empty, path)
    assert not any(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
    assert empty.fc1.lora_stored["b"].lora_A.shape == (2, 64)
    assert torch.count_nonzero(empty.fc1.lora_stored["b"].lora_B) == 0
    with qk.disable_adapter(model):
        base = _outputs(model)
    qk.set_adapter(empty, "b")
    assert torch.equal(_outputs(empty), base)
