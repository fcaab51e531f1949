"""Files: LoRA adapters in PEFT's layout, 4-bit bases in bitsandbytes' layout. safetensors and JSON
only (no pickle: loading a file never runs code).

Adapter directory (what PEFT 0.21's save_pretrained writes and from_pretrained reads for LoRA):
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]
                               base_model.model.<module>.lora_B.weight [out, r]
                               base_model.model.<module>.base_layer.bias   (bias="lora_only")
                               base_model.model.<module>.<param>           (modules_to_save)
Quantized base (one .safetensors file): the model's state dict without the adapters, each
QLoRALinear written as a bitsandbytes Linear4bit: <module>.weight (packed), .weight.absmax,
.weight.quant_map, .weight.nested_absmax, .weight.nested_quant_map,
.weight.quant_state.bitsandbytes__<nf4|fp4>, and <module>.bias.

Every loader reads and checks the whole file against the model first and changes the model only
when everything fits, so a bad file leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .formats import QuantState, get_code
from .nn import QLoRALinear, _set_submodule, freeze_all_but_adapters

PathLike = Union[str, os.PathLike]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_BIAS_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.bias$")
_QS_KEY = re.compile(r"^(?P<module>.+)\.weight\.quant_state\.bitsandbytes__(?P<qt>[a-z0-9]+)$")
_QLORA_INTERNAL = ("packed_weight", "absmax", "nested_absmax", "offset", "lora_A", "lora_B")


class AdapterFileError(ValueError):
    """An adapter or quantized-base file that is unreadable or does not fit the model."""


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types (and OSError) for bad bytes
        raise AdapterFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors, metadata


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (tied weights); give each its own bytes.
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(key)
        out[k] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


# --- adapters (PEFT layout) -------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    directory: PathLike,
    modules_to_save: Optional[Sequence[str]] = None,
    task_type: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
) -> Path:
    """Write the LoRA weights of every QLoRALinear in `model` in PEFT's adapter layout.

    modules_to_save: names of other modules trained in full (e.g. a classification head), saved
    whole as PEFT saves its modules_to_save. task_type: PEFT's task type string (e.g.
    "SEQ_CLS"), None for a plain PeftModel. Returns the directory.
    """
    layers = _qlora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no QLoRALinear layers (call replace_linear first)")
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    train_bias = [n for n, m in layers.items() if m.train_bias and m.bias is not None]
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if name in train_bias:
            tensors[f"{PEFT_PREFIX}{name}.base_layer.bias"] = layer.bias
    for mname in modules_to_save or ():
        try:
            mod = model.get_submodule(mname)
        except AttributeError:
            raise ValueError(f"save_adapter: modules_to_save names {mname!r}, which the model lacks") from None
        if isinstance(mod, QLoRALinear):
            raise ValueError(f"save_adapter: {mname!r} is a QLoRALinear; its adapter is saved already")
        for k, v in mod.state_dict().items():
            tensors[f"{PEFT_PREFIX}{mname}.{k}"] = v

    ranks = Counter(m.r for m in layers.values())
    alphas = Counter(m.lora_alpha for m in layers.values())
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    dropouts = {m.lora_dropout for m in layers.values()}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        # Full module names: PEFT matches a list entry against a name or a name's "."-suffix, so
        # these select exactly the layers that were replaced.
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "lora_dropout": max(dropouts),
        "fan_in_fan_out": False,
        "bias": "lora_only" if train_bias else "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        # PEFT reads these keys as regexes matched at the end of a module name; full names pin one layer.
        "rank_pattern": {re.escape(n): m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {re.escape(n): m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
    }
    directory.mkdir(parents=True, exist_ok=True)
    _write_safetensors(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _pattern_value(patterns: dict, name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(model: nn.Module, directory: PathLike, strict: bool = True) -> nn.Module:
    """Load a LoRA adapter in PEFT's layout (ours or PEFT's) into the QLoRALinear layers of `model`.

    The model's layers must already be QLoRALinear (replace_linear) with the adapter's rank at the
    adapter's module names. Sets each layer's lora_A, lora_B, lora_alpha (and dropout, bias and
    modules_to_save when the adapter has them). strict: every QLoRALinear of the model must get an
    adapter. Raises (AdapterFileError / ValueError / FileNotFoundError) and leaves the model
    unchanged when the files are unreadable or do not fit.
    """
    directory = Path(directory)
    cfg_path = directory / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no such file (not a PEFT adapter directory?)")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{cfg_path}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}, "
                               "only LORA adapters load here")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            raise AdapterFileError(f"{cfg_path}: {flag}=true is not supported by QLoRALinear")
    try:
        r_default = int(config["r"])
        alpha_default = float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{cfg_path}: needs integer r and numeric lora_alpha ({e})") from None
    dropout = float(config.get("lora_dropout") or 0.0)
    tensors, _ = _read_safetensors(directory / ADAPTER_WEIGHTS)

    layers = _qlora_layers(model)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    others: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"key {key!r} lacks the {PEFT_PREFIX!r} prefix")
            continue
        k = key[len(PEFT_PREFIX):]
        if (m := _LORA_KEY.match(k)) is not None:
            lora.setdefault(m["module"], {})[m["which"]] = t
        elif (m := _BIAS_KEY.match(k)) is not None:
            biases[m["module"]] = t
        else:
            others[k] = t

    plan: list[tuple[QLoRALinear, torch.Tensor, torch.Tensor, float]] = []
    for name, pair in sorted(lora.items()):
        layer = layers.get(name)
        if layer is None:
            try:
                found = type(model.get_submodule(name)).__name__
            except AttributeError:
                found = "no such module"
            problems.append(f"{name}: the adapter has LoRA weights for it but the model's module is not a "
                            f"QLoRALinear ({found})")
            continue
        missing = [w for w in ("lora_A", "lora_B") if w not in pair]
        if missing:
            problems.append(f"{name}: {' and '.join(missing)} missing from the adapter file")
            continue
        r = int(_pattern_value(config.get("rank_pattern"), name, r_default))
        a, b = pair["lora_A"], pair["lora_B"]
        want_a, want_b = (layer.r, layer.in_features), (layer.out_features, layer.r)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            problems.append(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have the "
                            f"config's rank {r}")
        elif r != layer.r:
            problems.append(f"{name}: the adapter has rank {r}, the layer rank {layer.r} "
                            f"(replace_linear(..., r={r}))")
        elif tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the layer "
                            f"(expected {want_a} / {want_b})")
        elif not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{name}: LoRA weights must be floating point, got {a.dtype} / {b.dtype}")
        else:
            alpha = float(_pattern_value(config.get("alpha_pattern"), name, alpha_default))
            plan.append((layer, a, b, alpha))
    for name, bias in biases.items():
        layer = layers.get(name)
        if layer is None or layer.bias is None or tuple(bias.shape) != (layer.out_features,):
            problems.append(f"{name}: a bias of shape {tuple(bias.shape)} that the model's layer cannot take")
    current = model.state_dict()
    for k, t in others.items():
        if k not in current:
            problems.append(f"unexpected key {PEFT_PREFIX + k!r} (no such parameter in the model)")
        elif tuple(current[k].shape) != tuple(t.shape):
            problems.append(f"{k}: shape {tuple(t.shape)} in the file, {tuple(current[k].shape)} in the model")
    if strict:
        untouched = sorted(set(layers) - set(lora))
        if untouched:
            problems.append(f"no adapter weights for the model's QLoRALinear layer(s) {untouched[:10]}"
                            f"{' ...' if len(untouched) > 10 else ''} (strict=False loads the rest)")
    if not lora:
        problems.append("the adapter file holds no lora_A/lora_B weights")
    if problems:
        raise AdapterFileError(f"{directory}: adapter does not fit the model:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        for layer, a, b, alpha in plan:
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            layer.lora_alpha = alpha
            layer.lora_dropout = dropout
        for name, bias in biases.items():
            layers[name].bias.copy_(bias)
        for k, t in others.items():
            current[k].copy_(t)
    return model


# --- quantized base (bitsandbytes Linear4bit layout) ------------------------------------------


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters, QLoRALinear entries under Linear4bit's keys."""
    layers = _qlora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        module, _, leaf = k.rpartition(".")
        if module in layers and leaf in _QLORA_INTERNAL:
            continue
        out[k] = v
    for name, layer in layers.items():
        out[f"{name}.weight"] = layer.packed_weight
        for k, v in layer.quant_state.as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v
    return out


def save_quantized(model: nn.Module, path: PathLike) -> Path:
    """Write the 4-bit base of `model` (everything but the adapters) to one .safetensors file."""
    if not _qlora_layers(model):
        raise ValueError("save_quantized: the model has no QLoRALinear layers (call replace_linear first)")
    path = Path(path)
    _write_safetensors(quantized_state_dict(model), path, metadata={"format": "pt", "quantization": "bitsandbytes-4bit"})
    return path


def load_quantized(model: nn.Module, path: PathLike, **layer_kwargs) -> nn.Module:
    """Load a 4-bit base (ours, or a bitsandbytes Linear4bit state dict saved as safetensors).

    Each quantized entry goes into the QLoRALinear at that name (its adapter is kept), or replaces
    an nn.Linear there with a new QLoRALinear (layer_kwargs: r, lora_alpha, compute_dtype, ...; the
    model is then frozen but for the adapters, as replace_linear leaves it). Every other entry must
    match the model's state dict. Raises and leaves the model unchanged when the file does not fit.
    """
    path = Path(path)
    tensors, _ = _read_safetensors(path)
    problems: list[str] = []
    quantized: dict[str, tuple[torch.Tensor, QuantState, Optional[torch.Tensor]]] = {}
    consumed: set[str] = set()
    for key in tensors:
        if (m := _QS_KEY.match(key)) is None:
            continue
        name = m["module"]
        group = {k: v for k, v in tensors.items() if k.startswith(f"{name}.weight.")}
        consumed.update(group)
        packed = tensors.get(f"{name}.weight")
        if packed is None:
            problems.append(f"{name}: quant state without the packed weight {name}.weight")
            continue
        consumed.add(f"{name}.weight")
        try:
            state = QuantState.from_dict(group)
            state.validate(packed)
        except (ValueError, TypeError) as e:
            problems.append(f"{name}: bad quant state: {e}")
            continue
        if not torch.equal(state.code, get_code(state.quant_type)):
            problems.append(f"{name}: quant_map is not the standard {state.quant_type} table")
            continue
        if state.nested and not torch.equal(state.nested_code, get_code("dynamic")):
            problems.append(f"{name}: nested_quant_map is not the signed dynamic map")
            continue
        if len(state.shape) != 2:
            problems.append(f"{name}: quantized weight of shape {tuple(state.shape)} is not a Linear weight")
            continue
        quantized[name] = (packed, state, tensors.get(f"{name}.bias"))

    swaps: list[tuple[str, QLoRALinear]] = []
    updates: list[tuple[QLoRALinear, torch.Tensor, QuantState]] = []
    for name, (packed, state, bias) in quantized.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: in the file but not in the model")
            continue
        out_f, in_f = (int(s) for s in state.shape)
        if (getattr(mod, "out_features", None), getattr(mod, "in_features", None)) != (out_f, in_f):
            problems.append(f"{name}: the file's weight is {out_f}x{in_f}, the model's "
                            f"{type(mod).__name__} is {getattr(mod, 'out_features', '?')}x{getattr(mod, 'in_features', '?')}")
            continue
        if (bias is None) != (getattr(mod, "bias", None) is None):
            problems.append(f"{name}: bias {'missing from' if bias is None else 'present in'} the file but "
                            f"{'present in' if bias is None else 'absent from'} the model")
            continue
        if bias is not None:
            consumed.add(f"{name}.bias")
        device = next((t.device for t in mod.parameters()), torch.device("cpu"))
        if isinstance(mod, QLoRALinear):
            updates.append((mod, packed.to(device), state.to(device)))
        elif isinstance(mod, nn.Linear):
            try:
                swaps.append((name, QLoRALinear.from_quantized(
                    packed.to(device), state.to(device), None if bias is None else bias.to(device), **layer_kwargs)))
            except (TypeError, ValueError) as e:
                problems.append(f"{name}: cannot build a QLoRALinear: {e}")
        else:
            problems.append(f"{name}: the model's module is a {type(mod).__name__}, not a Linear")

    replaced = set(quantized)
    current = model.state_dict()
    expected = {}
    for k, v in current.items():
        module, _, leaf = k.rpartition(".")
        if module in replaced and (leaf in _QLORA_INTERNAL or leaf in ("weight", "bias")):
            continue
        if module in _qlora_layers(model) and leaf in _QLORA_INTERNAL:
            continue
        expected[k] = v
    rest = {k: v for k, v in tensors.items() if k not in consumed}
    missing = sorted(set(expected) - set(rest))
    unexpected = sorted(set(rest) - set(expected))
    qlora_without = sorted(set(_qlora_layers(model)) - set(quantized))
    if qlora_without:
        problems.append(f"the file has no quantized weight for the model's QLoRALinear layer(s) {qlora_without[:10]}")
    if missing:
        problems.append(f"missing from the file: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"not in the model: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for k in sorted(set(rest) & set(expected)):
        if tuple(rest[k].shape) != tuple(expected[k].shape):
            problems.append(f"{k}: shape {tuple(rest[k].shape)} in the file, {tuple(expected[k].shape)} in the model")
    if not quantized:
        problems.append("the file holds no 4-bit quantized weights (no *.weight.quant_state.bitsandbytes__* key)")
    if problems:
        raise AdapterFileError(f"{path}: does not fit the model:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        for layer, packed, state in updates:
            layer._set_quantized(packed, state)
            layer.weight_dtype = state.dtype
            name = next(n for n, m in model.named_modules() if m is layer)
            if f"{name}.bias" in tensors:
                layer.bias.copy_(tensors[f"{name}.bias"])
        for k in expected:
            current[k].copy_(rest[k])
        for name, layer in swaps:
            _set_submodule(model, name, layer)
    if swaps:
        freeze_all_but_adapters(model)
        model.qlora_replaced = list(getattr(model, "qlora_replaced", [])) + [n for n, _ in swaps]
    return model


__all__ = ["AdapterFileError", "load_adapter", "load_quantized", "quantized_state_dict", "save_adapter",
           "save_quantized"]
