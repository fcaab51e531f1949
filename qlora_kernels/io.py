"""Files: LoRA adapters in PEFT's layout, 4-bit bases in bitsandbytes' layout. Written as safetensors
and JSON only. Read from those, and from torch.save files (.bin, what transformers and PEFT wrote
before safetensors) through torch.load(weights_only=True), whose restricted unpickler builds tensors
and plain containers only: loading a file never runs code.

Adapter directory (what PEFT 0.21's save_pretrained writes and from_pretrained reads for LoRA):
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]   (or adapter_model.bin)
                               base_model.model.<module>.lora_B.weight [out, r]
                               base_model.model.<module>.lora_magnitude_vector [out]  (use_dora)
                               base_model.model.<module>.base_layer.bias   (bias="lora_only")
                               base_model.model.<module>.<param>           (modules_to_save)
Quantized base (one .safetensors file): the model's state dict without the adapters, each
QLoRALinear written as a bitsandbytes Linear4bit: <module>.weight (packed), .weight.absmax,
.weight.quant_map, .weight.nested_absmax, .weight.nested_quant_map,
.weight.quant_state.bitsandbytes__<nf4|fp4>, and <module>.bias (save_quantized; with config.json
and generation_config.json, a Hugging Face "bnb-4bit" directory: save_pretrained_quantized).

Every loader checks the whole file against the model first and changes the model only when
everything fits, so a bad file leaves the model as it was. load_quantized checks a checkpoint by
its headers, then reads it one tensor at a time (a dense weight is quantized and dropped before the
next is read), so a checkpoint larger than memory loads into an empty model. from_pretrained does
all of it for a Hugging Face checkpoint directory (build empty, replace_linear, load_quantized).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .formats import QuantState, get_code
from .nn import (
    ALL_LINEAR,
    QLoRALinear,
    _check_adapter_name,
    adapter_active,
    _module_paths,
    _own_forward,
    _take_place,
    dense_shape,
    finite_real,
    freeze_all_but_adapters,
    guard_state_dict_loads,
    is_conv1d,
    replace_linear,
)

PathLike = Union[str, os.PathLike]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What older PEFT versions wrote (torch.save of the adapter's state dict); read when no .safetensors is there.
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
# A Hugging Face checkpoint directory: one file, or shards listed by an index.
CHECKPOINT_FILE = "model.safetensors"
CHECKPOINT_INDEX = "model.safetensors.index.json"
# The same in torch.save's format, as transformers wrote checkpoints before safetensors (read, never
# written here; safetensors is preferred when a directory has both, as transformers prefers it).
CHECKPOINT_FILE_PICKLE = "pytorch_model.bin"
CHECKPOINT_INDEX_PICKLE = "pytorch_model.bin.index.json"
# Suffixes of files in torch.save's format (the rest are read as safetensors).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_BIAS_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.bias$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector$")
_QS_KEY = re.compile(r"^(?P<module>.+)\.weight\.quant_state\.bitsandbytes__(?P<qt>[a-z0-9]+)$")
_QLORA_INTERNAL = ("packed_weight", "absmax", "nested_absmax", "offset", "lora_A", "lora_B", "lora_magnitude_vector")


def _layer_internal(key: str, layers) -> bool:
    """Whether state-dict `key` is a QLoRALinear's own state (its 4-bit base, its active adapter or
    a stored one: <layer>.lora_stored.<name>.lora_A), which files of the base leave out."""
    module, _, leaf = key.rpartition(".")
    if module in layers and leaf in _QLORA_INTERNAL:
        return True
    owner, stored, _ = key.partition(".lora_stored.")
    return bool(stored) and owner in layers


class AdapterFileError(ValueError):
    """An adapter or quantized-base file that is unreadable or does not fit the model."""


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors (or torch.save) file (small files: an adapter)."""
    file = _Checkpoint(path)
    return {k: file.load(k) for k in file.keys()}


# safetensors' dtype names -> torch dtypes (what a header says, before any bytes are read).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Checkpoint:
    """A checkpoint file or a Hugging Face checkpoint directory (model.safetensors, or the shards
    model.safetensors.index.json maps every key to; else the same as pytorch_model.bin[.index.json]),
    opened without reading tensor bytes: keys, shapes and dtypes come from the headers (meta()), a
    tensor's bytes only from load(). So a checkpoint larger than memory can be checked whole, then
    loaded one tensor at a time.

    Files in torch.save's format (.bin / .pt / .pth) are opened with weights_only=True (a pickle that
    would run code, or holds anything but tensors, is refused) and memory-mapped, so they too are
    read a tensor at a time; load() copies each tensor out of the mapping."""

    def __init__(self, path: Path):
        self.path = path
        self._handles: dict[Path, object] = {}
        if not path.is_dir():
            self._file_of = dict.fromkeys(self._keys_of(path), path)
            return
        for file_name, index_name in ((CHECKPOINT_FILE, CHECKPOINT_INDEX),
                                      (CHECKPOINT_FILE_PICKLE, CHECKPOINT_INDEX_PICKLE)):
            if (path / index_name).is_file():
                self._file_of = self._shards(path, path / index_name)
                return
            if (path / file_name).is_file():
                self._file_of = dict.fromkeys(self._keys_of(path / file_name), path / file_name)
                return
        raise FileNotFoundError(f"{path}: a directory without {CHECKPOINT_FILE}, {CHECKPOINT_INDEX}, "
                                f"{CHECKPOINT_FILE_PICKLE} or {CHECKPOINT_INDEX_PICKLE}")

    def _shards(self, path: Path, index_path: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index_path.read_text()).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise AdapterFileError(f"{index_path}: not a JSON object: {e}") from None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise AdapterFileError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        outside = [f for f in shards if Path(f).name != f]
        if outside:  # a shard is a file beside the index, never a path elsewhere
            raise AdapterFileError(f"{index_path}: shard names must be plain file names, got {outside[:3]}")
        file_of = {}
        for shard in shards:
            keys = self._keys_of(path / shard)
            wrong = sorted(k for k in keys if weight_map.get(k) != shard)
            if wrong:
                raise AdapterFileError(f"{path / shard}: holds {wrong[:5]}, which the index maps elsewhere (or not at all)")
            file_of.update(dict.fromkeys(keys, path / shard))
        absent = sorted(set(weight_map) - set(file_of))
        if absent:
            raise AdapterFileError(f"{index_path}: {len(absent)} tensor(s) are in no shard: {absent[:5]}")
        return file_of

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise FileNotFoundError(f"{file}: no such file")
            self._handles[file] = self._open_pickle(file) if file.suffix in _PICKLE_SUFFIXES else self._open_safetensors(file)
        return self._handles[file]

    @staticmethod
    def _open_safetensors(file: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types (and OSError) for bad bytes
            raise AdapterFileError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None

    @staticmethod
    def _open_pickle(file: Path) -> dict[str, torch.Tensor]:
        import pickle

        def read(mmap: bool):
            return torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)

        try:
            try:
                tensors = read(mmap=True)
            except RuntimeError as e:
                if "_use_new_zipfile_serialization" not in str(e):
                    raise
                tensors = read(mmap=False)  # torch.save's format before torch 1.6 cannot be mapped: read whole
        except pickle.UnpicklingError as e:
            # torch's message is mostly advice (including "load with weights_only=False", which would
            # run whatever the file says); keep the lines that say what was found.
            # (torch 2.6 puts the finding after "WeightsUnpickler error:" on the line of its advice)
            found = (line.split("WeightsUnpickler error:", 1)[-1].strip() for line in str(e).splitlines())
            detail = "; ".join(line for line in found if line and not line.startswith(
                ("Weights only load failed", "Please file an issue", "Check the documentation")))
            if "GLOBAL" in detail:
                raise AdapterFileError(f"{file}: holds objects other than tensors, which only running code from the "
                                       f"file could build; refused, nothing run ({detail})") from None
            raise AdapterFileError(f"{file}: not a readable torch.save file (truncated or corrupt?): {detail}") from None
        except Exception as e:  # zipfile / storage errors of a damaged file
            raise AdapterFileError(f"{file}: not a readable torch.save file (truncated or corrupt?): {e}") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise AdapterFileError(f"{file}: holds a {type(tensors).__name__}, not a dict of named tensors "
                                   "(a state dict)")
        return tensors

    def _keys_of(self, file: Path) -> list[str]:
        return list(self._open(file).keys())

    def keys(self) -> list[str]:
        return list(self._file_of)

    def meta(self, key: str) -> torch.Tensor:
        """A tensor on the meta device with the entry's shape and dtype (from the header)."""
        file = self._file_of[key]
        handle = self._open(file)
        if isinstance(handle, dict):
            return torch.empty(handle[key].shape, dtype=handle[key].dtype, device="meta")
        try:
            piece = handle.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
            shape = piece.get_shape()
        except Exception as e:
            raise AdapterFileError(f"{file}: cannot read the header entry of {key!r}: {e}") from None
        if dtype is None:  # a rarer dtype (float8, unsigned >8 bits): read it to learn
            return self.load(key).to("meta")
        return torch.empty(shape, dtype=dtype, device="meta")

    def load(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        handle = self._open(file)
        try:
            if isinstance(handle, dict):
                # A tensor of its own: the mapped file's pages are not the model's (and tensors that
                # shared storage in the file, tied weights, come out apart, as safetensors gives them).
                return handle[key].clone(memory_format=torch.contiguous_format)
            return handle.get_tensor(key)
        except Exception as e:
            raise AdapterFileError(f"{file}: cannot read {key!r} (truncated or corrupt?): {e}") from None


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
    save_file(out, str(path), metadata=metadata)


def _temp_name(final: Path) -> Path:
    # Same directory as `final`, so os.replace is a rename on one file system; a random part keeps
    # two writers apart. Not mkstemp: its files are 0600, and the result should get the umask's mode.
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")


def _write_files(files: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write a set of files so that a failure leaves the previous set as it was.

    Each writer writes to a temporary name next to its file; only when every one has succeeded are
    they renamed onto the final names (os.replace), in order. Should a rename fail, the files
    already renamed get their previous content back (kept as hard links meanwhile), so a directory
    never ends up holding new weights next to an old config. Temporary files are removed either way.
    """
    temps: list[Path] = []
    done: list[tuple[Path, Optional[Path], bool]] = []  # (final, hard link to its old content, existed before)
    try:
        for final, write in files:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_name(final)
            temps.append(tmp)
            write(tmp)
        try:
            for (final, _), tmp in zip(files, temps):
                backup = None
                if final.is_file():
                    backup = _temp_name(final)
                    try:
                        os.link(final, backup)
                        temps.append(backup)
                    except OSError:  # no hard links on this file system: this one cannot be rolled back
                        backup = None
                existed = final.exists()
                os.replace(tmp, final)
                done.append((final, backup, existed))
        except BaseException:
            for final, backup, existed in reversed(done):
                try:
                    if backup is not None:
                        os.replace(backup, final)
                    elif not existed:
                        final.unlink()
                except OSError:
                    pass
            raise
    finally:
        for tmp in temps:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def _qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


def _check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module as `model`, got {type(model).__name__}")


def _dtype_mismatch(file_t: torch.Tensor, model_t: torch.Tensor) -> bool:
    """True when copying `file_t` into `model_t` would change what its values mean: floats load into
    floats of any width (as load_state_dict casts), anything else (ints, bools, ...) needs its own dtype."""
    if file_t.is_floating_point() or model_t.is_floating_point():
        return file_t.is_floating_point() != model_t.is_floating_point()
    return file_t.dtype != model_t.dtype


# The hyperparameter checks below return the value as it is used, or None when it is not one.
# save_adapter refuses what load_adapter would refuse, so every file it writes loads back.


def _as_rank(value) -> Optional[int]:
    """A positive integer; an integral float (8.0) is taken as that integer, 4.7 is refused."""
    v = finite_real(value)
    return int(v) if v is not None and v >= 1 and v == int(v) else None


def _as_alpha(value) -> Optional[float]:
    # Any finite real, as QLoRALinear.lora_alpha and PEFT take it (a negative one flips the update's sign).
    return finite_real(value)


def _as_dropout(value) -> Optional[float]:
    v = finite_real(value)
    return v if v is not None and 0.0 <= v < 1.0 else None


# --- adapters (PEFT layout) -------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    directory: PathLike,
    modules_to_save: Optional[Sequence[str]] = None,
    task_type: Optional[str] = None,
    base_model_name_or_path: Optional[PathLike] = None,
    adapter_name: Optional[str] = None,
) -> Path:
    """Write the LoRA weights of every QLoRALinear in `model` in PEFT's adapter layout (the active
    adapter's; adapter_name: that one of the model's named adapters, see add_adapter).

    modules_to_save: a list of names of other modules trained in full (e.g. a classification head),
    saved whole as PEFT saves its modules_to_save (a bare string is refused: PEFT would read it
    letter by letter). task_type: PEFT's task type string (e.g. "SEQ_CLS"), None for a plain
    PeftModel. Returns the directory.

    Ranks and alphas that differ between layers go into rank_pattern / alpha_pattern under
    "^"-anchored full module names, which select exactly that layer both in PEFT and in
    load_adapter. PEFT's config has a single lora_dropout: when the layers' dropouts differ, the
    largest is written (with a warning naming the layers), so load_adapter gives every layer that
    one value; dropout does not change the model's outputs in eval mode.

    Both files are written to temporary names and renamed into place only when both are complete,
    so a failure leaves the directory's previous adapter as it was.
    """
    _check_model(model, "save_adapter")
    if adapter_name is not None:
        with adapter_active(model, adapter_name):
            return save_adapter(model, directory, modules_to_save, task_type, base_model_name_or_path)
    if modules_to_save is not None:
        if isinstance(modules_to_save, (str, bytes)):
            # PEFT matches each element of modules_to_save, so a string would select modules by its letters.
            raise TypeError(f"save_adapter: modules_to_save must be a list of module names, got the string "
                            f"{modules_to_save!r} (use [{modules_to_save!r}])")
        try:
            modules_to_save = list(modules_to_save)
        except TypeError:
            raise TypeError(f"save_adapter: modules_to_save must be a list of module names, got "
                            f"{type(modules_to_save).__name__}") from None
        bad = [m for m in modules_to_save if not isinstance(m, str) or not m]
        if bad:
            raise TypeError(f"save_adapter: modules_to_save entries must be non-empty module names, got {bad!r}")
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"save_adapter: task_type must be a string or None, got {type(task_type).__name__}")
    if base_model_name_or_path is not None:
        if not isinstance(base_model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"save_adapter: base_model_name_or_path must be a string, a path or None, got "
                            f"{type(base_model_name_or_path).__name__}")
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    layers = _qlora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no QLoRALinear layers (call replace_linear first)")
    bad_hyper = [f"{n} (lora_alpha={m.lora_alpha!r})" for n, m in layers.items() if _as_alpha(m.lora_alpha) is None]
    bad_hyper += [f"{n} (lora_dropout={m.lora_dropout!r})" for n, m in layers.items()
                  if _as_dropout(m.lora_dropout) is None]
    if bad_hyper:
        raise ValueError(f"save_adapter: lora_alpha must be a finite number and lora_dropout in [0, 1); "
                         f"not so for {bad_hyper[:10]}")
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    train_bias = [n for n, m in layers.items() if m.train_bias and m.bias is not None]
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if layer.use_dora:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        if name in train_bias:
            tensors[f"{PEFT_PREFIX}{name}.base_layer.bias"] = layer.bias
    for mname in modules_to_save or ():
        try:
            mod = model.get_submodule(mname)
        except AttributeError:
            raise ValueError(f"save_adapter: modules_to_save names {mname!r}, which the model lacks") from None
        if isinstance(mod, QLoRALinear):
            raise ValueError(f"save_adapter: {mname!r} is a QLoRALinear; its adapter is saved already")
        inner = [n for n, m in mod.named_modules() if isinstance(m, QLoRALinear)]
        if inner:
            # Their 4-bit bases would go into the adapter file, which load_adapter refuses to write into.
            raise ValueError(f"save_adapter: modules_to_save entry {mname!r} contains QLoRALinear layer(s) "
                             f"{[f'{mname}.{n}' for n in inner][:5]}; name the fully trained modules themselves")
        for k, v in mod.state_dict().items():
            tensors[f"{PEFT_PREFIX}{mname}.{k}"] = v

    # Numbers as JSON writes them: an int alpha stays an int, any other real becomes a float.
    def alpha_of(m: QLoRALinear):
        return m.lora_alpha if isinstance(m.lora_alpha, int) else float(m.lora_alpha)

    for flag, what in (("use_rslora", "rsLoRA"), ("use_dora", "DoRA")):
        with_it = sorted(n for n, m in layers.items() if getattr(m, flag))
        if 0 < len(with_it) < len(layers):
            raise ValueError(f"save_adapter: some layers use {what} ({with_it[:5]}{' ...' if len(with_it) > 5 else ''}) "
                             f"and others do not; PEFT's adapter_config holds one {flag} for all of them. Nothing "
                             "was written")
    rslora = {m.use_rslora for m in layers.values()}
    ranks = Counter(m.r for m in layers.values())
    alphas = Counter(alpha_of(m) for m in layers.values())
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    dropouts: dict[float, list[str]] = {}
    for n, m in layers.items():
        dropouts.setdefault(float(m.lora_dropout), []).append(n)
    if len(dropouts) > 1:
        per_value = "; ".join(f"{d}: {names[:5]}{' ...' if len(names) > 5 else ''}"
                              for d, names in sorted(dropouts.items()))
        warnings.warn(f"save_adapter: the layers' lora_dropout differ ({per_value}); PEFT's adapter_config "
                      f"holds one lora_dropout, so {max(dropouts)} is written and every layer gets it on load",
                      UserWarning, stacklevel=2)
    if base_model_name_or_path is None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        base_model_name_or_path = name_or_path if isinstance(name_or_path, str) and name_or_path else None
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
        # PEFT's flag for Conv1D (GPT-2) targets. It changes no tensor in the file (lora_A is [r, in],
        # lora_B [out, r] either way) and PEFT corrects it per layer, with a warning, where a layer's
        # kind disagrees: the value most layers need is written.
        "fan_in_fan_out": 2 * sum(m.fan_in_fan_out for m in layers.values()) > len(layers),
        "bias": "lora_only" if train_bias else "none",
        "use_rslora": rslora.pop(),
        "use_dora": all(m.use_dora for m in layers.values()),
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        # PEFT (get_pattern_key) takes the first key K with re.match(rf"(.*\.)?({K})$", name): a bare
        # name "a" would also pick "blk.a". "^" + the escaped full name can only match at the start,
        # so it selects that one layer, in PEFT and in load_adapter alike.
        "rank_pattern": {_exact_key(n): m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {_exact_key(n): alpha_of(m) for n, m in layers.items() if alpha_of(m) != alpha},
    }
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_files([
        (directory / ADAPTER_WEIGHTS, lambda p: _write_safetensors(tensors, p, metadata={"format": "pt"})),
        (directory / ADAPTER_CONFIG, lambda p: p.write_text(config_text)),  # renamed last
    ])
    return directory


def _exact_key(name: str) -> str:
    return "^" + re.escape(name)


def _read_patterns(config: dict, field: str, check, cfg_path: Path) -> list[tuple[re.Pattern, object]]:
    """rank_pattern / alpha_pattern as PEFT reads them: {regex: value}, checked and compiled."""
    patterns = config.get(field)
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        raise AdapterFileError(f"{cfg_path}: {field} must be an object {{module-name regex: value}}, "
                               f"got {type(patterns).__name__} {patterns!r:.80}")
    out = []
    for key, value in patterns.items():
        try:  # compiled as PEFT uses it: the key matched at the end of a name, after a "." or alone
            pattern = re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise AdapterFileError(f"{cfg_path}: {field} key {key!r} is not a valid regex ({e})") from None
        v = check(value)
        if v is None:
            what = "a positive integer" if field == "rank_pattern" else "a finite number"
            raise AdapterFileError(f"{cfg_path}: {field}[{key!r}] must be {what}, got {value!r}")
        out.append((pattern, v))
    return out


def _pattern_value(patterns: list[tuple[re.Pattern, object]], name: str, default):
    # The first key that matches wins, as in PEFT's get_pattern_key (keys in the file's order).
    for pattern, value in patterns:
        if pattern.match(name):
            return value
    return default


def load_adapter(model: nn.Module, directory: PathLike, strict: bool = True,
                 adapter_name: Optional[str] = None) -> nn.Module:
    """Load a LoRA adapter in PEFT's layout (ours or PEFT's) into the QLoRALinear layers of `model`.

    The model's layers must already be QLoRALinear (replace_linear) with the adapter's rank at the
    adapter's module names. Sets each layer's lora_A, lora_B, lora_alpha, use_rslora (and dropout,
    bias and modules_to_save when the adapter has them; DoRA's magnitude vector: a DoRA adapter,
    use_dora, loads only into layers built with use_dora=True, and a plain one only into plain ones). strict: every QLoRALinear of the model must
    get an adapter. rank_pattern / alpha_pattern resolve as in PEFT (the first key matching the end of a
    module name wins). Other entries of the file load only into parameters and buffers outside the
    QLoRALinear layers (their 4-bit bases are load_quantized's), with the model's shape and a
    matching kind of dtype (floating into floating; anything else only into its own dtype).
    adapter_name (PEFT's load_adapter(path, adapter_name)): load it as that named adapter of the
    model instead of into the active one. A name the model's layers hold already (add_adapter) is
    overwritten; a new name is added to every QLoRALinear beside the active adapter, which stays
    active (set_adapter switches; the new one is frozen until then), with the file's ranks (a layer
    the file does not cover, strict=False, gets an identity adapter, B = 0). A file for an inactive
    adapter may carry LoRA weights only (no bias, no modules_to_save: those are the model's own,
    shared by all its adapters).
    Raises (AdapterFileError / ValueError / FileNotFoundError) and leaves the model unchanged when
    the files are unreadable, the config's hyperparameters are out of range, or the files do not fit.
    """
    _check_model(model, "load_adapter")
    directory = Path(directory)
    layers = _qlora_layers(model)
    actives = {layer.active_adapter for layer in layers.values()}
    if adapter_name is None or actives == {adapter_name}:
        return _load_adapter(model, directory, strict, lora_only=False)
    _check_adapter_name(adapter_name)
    holding = [n for n, layer in layers.items() if adapter_name in layer.adapter_names]
    if holding and len(holding) < len(layers):
        raise ValueError(f"load_adapter: adapter_name={adapter_name!r} is held by {len(holding)} of the model's "
                         f"{len(layers)} QLoRALinear layers (e.g. {holding[0]}); delete_adapter it or pick another name")
    if holding:
        with adapter_active(model, adapter_name):
            return _load_adapter(model, directory, strict, lora_only=True)
    # A new adapter: each layer's takes the file's rank (the load below checks it against the config).
    weights = _Checkpoint(_adapter_weights_path(directory))
    ranks = {}
    keys = set(weights.keys())
    for name in layers:
        key = f"{PEFT_PREFIX}{name}.lora_A.weight"
        shape = weights.meta(key).shape if key in keys else ()
        if len(shape) == 2 and shape[0] >= 1:
            ranks[name] = int(shape[0])
    added = []
    try:
        for name, layer in layers.items():
            layer.add_adapter(adapter_name, r=ranks.get(name))
            added.append(layer)
        with adapter_active(model, adapter_name):
            return _load_adapter(model, directory, strict, lora_only=True)
    except BaseException:
        for layer in added:  # the model as it was
            layer.delete_adapter(adapter_name)
        raise


def _adapter_weights_path(directory: Path) -> Path:
    """adapter_model.safetensors, or an older PEFT's adapter_model.bin when only that is there."""
    if not (directory / ADAPTER_WEIGHTS).is_file() and (directory / ADAPTER_WEIGHTS_PICKLE).is_file():
        return directory / ADAPTER_WEIGHTS_PICKLE
    return directory / ADAPTER_WEIGHTS


def _load_adapter(model: nn.Module, directory: Path, strict: bool, lora_only: bool) -> nn.Module:
    """load_adapter into the active adapters; lora_only: the file may carry LoRA weights only."""
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
    # fan_in_fan_out (PEFT's flag for Conv1D targets) is read and not used: the adapter's tensors are
    # laid out the same either way, and each layer knows whether it replaced a Conv1D.
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(config.get(flag, False), bool):
            raise AdapterFileError(f"{cfg_path}: {flag} must be true or false, got {config[flag]!r}")
    use_rslora = config.get("use_rslora", False)
    use_dora = config.get("use_dora", False)
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise AdapterFileError(f"{cfg_path}: no {field!r} in the config")
    r_default = _as_rank(config["r"])
    if r_default is None:
        raise AdapterFileError(f"{cfg_path}: r must be a positive integer, got {config['r']!r}")
    alpha_default = _as_alpha(config["lora_alpha"])
    if alpha_default is None:
        raise AdapterFileError(f"{cfg_path}: lora_alpha must be a finite number, got {config['lora_alpha']!r}")
    dropout = 0.0 if config.get("lora_dropout") is None else _as_dropout(config["lora_dropout"])
    if dropout is None:
        raise AdapterFileError(f"{cfg_path}: lora_dropout must be a number in [0, 1), got {config['lora_dropout']!r}")
    rank_pattern = _read_patterns(config, "rank_pattern", _as_rank, cfg_path)
    alpha_pattern = _read_patterns(config, "alpha_pattern", _as_alpha, cfg_path)
    tensors = _read_tensors(_adapter_weights_path(directory))

    layers = _qlora_layers(model)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
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
        elif (m := _MAGNITUDE_KEY.match(k)) is not None and m["module"] in layers:
            magnitudes[m["module"]] = t
        else:
            others[k] = t

    plan: list[tuple[QLoRALinear, torch.Tensor, torch.Tensor, Optional[torch.Tensor], float]] = []
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
        if use_dora != layer.use_dora:
            # A DoRA layer has a magnitude vector a plain one lacks (and computes otherwise): the
            # layers must be built for the adapter, as PEFT builds them from its config.
            problems.append(f"{name}: the adapter {'is' if use_dora else 'is not'} DoRA (use_dora={use_dora}) but "
                            f"the layer {'is not' if use_dora else 'is'} (replace_linear(..., use_dora={use_dora}))")
            continue
        magnitude = magnitudes.get(name)
        if use_dora and (magnitude is None or tuple(magnitude.shape) != (layer.out_features,)
                         or not magnitude.is_floating_point()):
            problems.append(f"{name}: a DoRA adapter needs lora_magnitude_vector of shape ({layer.out_features},) "
                            "in floating point; the file has "
                            + ("none" if magnitude is None else f"{magnitude.dtype} {tuple(magnitude.shape)}"))
            continue
        r = _pattern_value(rank_pattern, name, r_default)
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
            alpha = _pattern_value(alpha_pattern, name, alpha_default)
            plan.append((layer, a, b, magnitude, alpha))
    stray = sorted(n for n in magnitudes if not use_dora or n not in lora)
    if stray:
        problems.append(f"lora_magnitude_vector for {stray[:10]} " + (
            "in a file whose config has use_dora=false" if not use_dora else "without lora_A/lora_B weights"))
    for name, bias in biases.items():
        layer = layers.get(name)
        if layer is None or layer.bias is None or tuple(bias.shape) != (layer.out_features,):
            problems.append(f"{name}: a bias of shape {tuple(bias.shape)} that the model's layer cannot take")
        elif not bias.is_floating_point():
            problems.append(f"{name}.base_layer.bias: dtype {bias.dtype} in the file, the layer's bias is "
                            f"{layer.bias.dtype} (a floating-point bias is needed)")
    current = model.state_dict()
    for k, t in others.items():
        owner = _qlora_owner(k, layers)
        if owner is not None:
            # A QLoRALinear's base is frozen 4-bit state (packed_weight, absmax, ...): load_quantized
            # checks and replaces it as a whole; an adapter only carries its LoRA weights and bias.
            problems.append(f"{PEFT_PREFIX + k!r} addresses QLoRALinear {owner!r} outside its adapter: only "
                            f"{owner}.lora_A.weight, .lora_B.weight and .base_layer.bias load from an adapter file")
        elif k not in current:
            problems.append(f"unexpected key {PEFT_PREFIX + k!r} (no such parameter in the model)")
        elif tuple(current[k].shape) != tuple(t.shape):
            problems.append(f"{k}: shape {tuple(t.shape)} in the file, {tuple(current[k].shape)} in the model")
        elif _dtype_mismatch(t, current[k]):
            problems.append(f"{k}: dtype {t.dtype} in the file, {current[k].dtype} in the model (floating-point "
                            "values load only into floating-point tensors, other dtypes only into their own)")
    if strict:
        untouched = sorted(set(layers) - set(lora))
        if untouched:
            problems.append(f"no adapter weights for the model's QLoRALinear layer(s) {untouched[:10]}"
                            f"{' ...' if len(untouched) > 10 else ''} (strict=False loads the rest)")
    if not lora:
        problems.append("the adapter file holds no lora_A/lora_B weights")
    if lora_only and (biases or others):
        problems.append(f"entries besides LoRA weights ({sorted([*(f'{n}.base_layer.bias' for n in biases), *others])[:5]}): "
                        "bias and modules_to_save are the model's own, shared by its adapters; load this file as "
                        "the active adapter (set_adapter, then load_adapter without adapter_name)")
    if problems:
        raise AdapterFileError(f"{directory}: adapter does not fit the model:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        for layer, a, b, magnitude, alpha in plan:
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            if magnitude is not None:
                layer.lora_magnitude_vector.copy_(magnitude)
            layer.lora_alpha = alpha
            layer.lora_dropout = dropout
            layer.use_rslora = use_rslora
        for name, bias in biases.items():
            layers[name].bias.copy_(bias)
        for k, t in others.items():
            current[k].copy_(t)
    return model


def _qlora_owner(key: str, layers: dict[str, QLoRALinear]) -> Optional[str]:
    """The QLoRALinear whose state `key` (a state-dict name) addresses or lies under, or None."""
    if "" in layers:  # the model is itself a QLoRALinear
        return ""
    prefix = key
    while "." in prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in layers:
            return prefix
    return None


# --- quantized base (bitsandbytes Linear4bit layout) ------------------------------------------


def _alias_paths(model: nn.Module) -> set[str]:
    """The names a module is registered under besides its first (s.x = s.y = lin: "y"). Their
    state-dict entries are the first name's tensors again, so files hold each module once."""
    return {p for paths in _module_paths(model).values() for p in paths[1:]}


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters, QLoRALinear entries under Linear4bit's keys. A
    module registered under several names appears under its first (load_quantized restores the
    other names, which point to the same module)."""
    _check_model(model, "quantized_state_dict")
    layers = _qlora_layers(model)
    aliases = _alias_paths(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if _layer_internal(k, layers) or k.rpartition(".")[0] in aliases:
            continue
        out[k] = v
    for name, layer in layers.items():
        out[f"{name}.weight"] = layer.packed_weight
        for k, v in layer.quant_state.as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v
    return out


def save_quantized(model: nn.Module, path: PathLike) -> Path:
    """Write the 4-bit base of `model` (everything but the adapters) to one .safetensors file.

    The file is written under a temporary name and renamed into place when complete, so a failure
    leaves a previous file at `path` as it was.
    """
    _check_model(model, "save_quantized")
    if not _qlora_layers(model):
        raise ValueError("save_quantized: the model has no QLoRALinear layers (call replace_linear first)")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_quantized: {path} is a directory; give a file path "
                                f"(e.g. {path / 'model.safetensors'})")
    tensors = quantized_state_dict(model)
    _write_files([(path, lambda p: _write_safetensors(
        tensors, p, metadata={"format": "pt", "quantization": "bitsandbytes-4bit"}))])
    return path


def save_pretrained_quantized(model: nn.Module, directory: PathLike) -> Path:
    """Write a Hugging Face model with QLoRALinear layers as a pre-quantized "bnb-4bit" checkpoint
    directory: config.json with the bitsandbytes quantization_config, model.safetensors with the
    4-bit base (save_quantized's content; a tied weight once, under its first name), and
    generation_config.json when the model has one. transformers loads it with from_pretrained
    (bitsandbytes' Linear4bit layers), load_quantized into an empty model. The adapters are not
    written (save_adapter; or merge_and_unload(model, requantize=True) first to publish a merged
    model). Linears left unquantized are listed in llm_int8_skip_modules.

    Raises TypeError for a model without a Hugging Face config, ValueError when the layers differ in
    quant type, double quantization or storage dtype (bitsandbytes' config holds one of each); the
    files are written under temporary names and renamed into place together, so a failure leaves
    the directory's previous checkpoint as it was.
    """
    _check_model(model, "save_pretrained_quantized")
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_json_string", None)):
        raise TypeError(f"save_pretrained_quantized takes a Hugging Face model (one with a .config); "
                        f"{type(model).__name__} has none: use save_quantized for a file of its state dict")
    layers = _qlora_layers(model)
    if not layers:
        raise ValueError("save_pretrained_quantized: the model has no QLoRALinear layers (call replace_linear first)")
    for what in ("quant_type", "double_quant", "quant_storage"):
        values = {getattr(m, what) for m in layers.values()}
        if len(values) > 1:
            raise ValueError(f"save_pretrained_quantized: the layers' {what} differ ({sorted(map(str, values))}); a "
                             "bitsandbytes quantization_config holds one. Nothing was written")
    first = next(iter(layers.values()))
    # (bitsandbytes' config has one compute dtype too; layers' that differ get the most common)
    compute = Counter(m.compute_dtype for m in layers.values()).most_common(1)[0][0]
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained_quantized: {directory} is a file; give a directory")
    from transformers import BitsAndBytesConfig

    skip = sorted(n for n, m in model.named_modules() if dense_shape(m) is not None and not isinstance(m, QLoRALinear))
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]  # (what transformers' save_pretrained records too)
    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=first.quant_type, bnb_4bit_use_double_quant=first.double_quant,
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=first.quant_storage,
        llm_int8_skip_modules=skip or None).to_dict()
    tensors = quantized_state_dict(model)
    # A tied weight once, under its first name (Hugging Face's layout: transformers ties it again).
    tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()})
    for key in tied:
        tensors.pop(key, None)
    files = [(directory / CHECKPOINT_FILE, lambda p: _write_safetensors(
                 tensors, p, metadata={"format": "pt", "quantization": "bitsandbytes-4bit"})),
             (directory / "config.json", lambda p: p.write_text(config.to_json_string()))]
    generation = getattr(model, "generation_config", None)
    if callable(getattr(generation, "to_json_string", None)):
        files.append((directory / "generation_config.json", lambda p: p.write_text(generation.to_json_string())))
    _write_files(files)
    return directory


def _tensor_at(model: nn.Module, key: str) -> torch.Tensor:
    """The parameter or buffer object itself at state-dict `key` (state_dict() gives detached copies)."""
    module, _, leaf = key.rpartition(".")
    owner = model.get_submodule(module)
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _tensor_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter or buffer) -> every (module, attribute) holding it: a tied weight has several."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for leaf, t in table.items():
                if t is not None:
                    holders.setdefault(id(t), []).append((mod, leaf))
    return holders


def _assign(holders: dict[int, list[tuple[nn.Module, str]]], old: torch.Tensor, value: torch.Tensor) -> None:
    """Put `value` (in old's dtype) where the meta tensor `old` is held, everywhere it is (ties kept);
    a parameter stays a parameter with its requires_grad."""
    if id(old) not in holders:  # already replaced through a tied name
        return
    value = value.to(dtype=old.dtype)
    new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    for mod, leaf in holders.pop(id(old)):
        (mod._parameters if leaf in mod._parameters else mod._buffers)[leaf] = new


def load_quantized(model: nn.Module, path: PathLike, device: Optional[Union[str, torch.device]] = None,
                   *, ignore_unexpected: Sequence[str] = (), **layer_kwargs) -> nn.Module:
    """Load a checkpoint into a model with 4-bit layers: a 4-bit base (ours, or a bitsandbytes
    Linear4bit state dict such as a pre-quantized "bnb-4bit" model), or a dense 16/32-bit one whose
    weights the model's QLoRALinear layers quantize as they load.

    path: a .safetensors (or torch.save .bin / .pt) file, or a Hugging Face checkpoint directory
    (model.safetensors, or the shards model.safetensors.index.json lists; else pytorch_model.bin or
    its shards). The model may be empty (built under
    accelerate.init_empty_weights(): parameters on the meta device): its tensors then come from the
    file, on `device` (default: the CPU) in the dtypes the model was built with, and QLoRALinear
    layers on meta get a fresh adapter. A tied weight (lm_head = the embedding) may be in the file
    under either of its names.

    Each 4-bit entry goes into the QLoRALinear at that name (its adapter is kept), or replaces an
    nn.Linear (or transformers Conv1D, whose weight the file holds [out, in], as bitsandbytes
    quantizes it) there with a new QLoRALinear (layer_kwargs: r, lora_alpha, compute_dtype, ...;
    the model is then frozen but for the adapters, as replace_linear leaves it; the Linear's hooks,
    an accelerate device hook included, move to it, and a Linear whose forward does more than
    nn.Linear's is refused, as replace_linear skips it). A dense weight at
    a QLoRALinear's name (an [out, in] Linear weight; [in, out] for a layer that replaced a Conv1D)
    is quantized in that layer's format (quant type, blocksize, double quantization; a layer with
    init_lora_weights "loftq" / "pissa" also gets the adapter fitted with it), on the layer's device, or
    `device` for an empty layer: so `replace_linear` on an empty model and then
    this loads a 16-bit checkpoint as a 4-bit model, one tensor at a time, without ever holding
    the model (or the file) in 16 bits. Every other entry must match the model's state dict
    (shape, and a matching kind of dtype: floating into floating, anything else only into its own
    dtype); a quantized layer's bias must be floating point and of shape [out]. An entry the model
    has no place for is refused, unless a regex of `ignore_unexpected` finds it (re.search): it is
    then not read (what transformers' _keys_to_ignore_on_load_unexpected does, e.g. for buffers
    older releases saved and the model now computes).

    Nothing in the model changes until everything fits: the headers are checked first (no tensor
    read), then each tensor is read and made ready (moved, quantized: a NaN/Inf weight is refused
    here, naming it), and only then put into the model. Raises and leaves the model as it was.
    """
    _check_model(model, "load_quantized")
    target = None if device is None else torch.device(device)
    if target is not None and not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError(f"load_quantized: device={device!r} places an empty model's tensors, and this model has "
                         "none on the meta device: its tensors load where they are (move it with .to())")
    ckpt = _Checkpoint(Path(path))
    path = ckpt.path
    tensors = {k: ckpt.meta(k) for k in ckpt.keys()}  # shapes and dtypes only: nothing read yet
    problems: list[str] = []
    quantized: dict[str, tuple[QuantState, Optional[torch.Tensor]]] = {}
    consumed: set[str] = set()
    for key in tensors:
        if (m := _QS_KEY.match(key)) is None:
            continue
        name = m["module"]
        # The scales and the state's JSON (1/64 of the weight or less) are read now, to check them.
        group = {k: ckpt.load(k) for k in tensors if k.startswith(f"{name}.weight.")}
        consumed.update(group)
        packed = tensors.get(f"{name}.weight")
        if packed is None:
            problems.append(f"{name}: quant state without the packed weight {name}.weight")
            continue
        consumed.add(f"{name}.weight")
        try:
            state = QuantState.from_dict(group)
            state.to("meta").validate(packed)
        except (ValueError, TypeError) as e:
            problems.append(f"{name}: bad quant state: {e}")
            continue
        # (QuantState.validate already refused a quant_map that is not quant_type's table.)
        if state.nested and not torch.equal(state.nested_code, get_code("dynamic")):
            problems.append(f"{name}: nested_quant_map is not the signed dynamic map")
            continue
        if len(state.shape) != 2:
            problems.append(f"{name}: quantized weight of shape {tuple(state.shape)} is not a Linear weight")
            continue
        quantized[name] = (state, tensors.get(f"{name}.bias"))

    def device_of(mod: nn.Module) -> torch.device:
        dev = next((t.device for t in [*mod.parameters(), *mod.buffers()]), torch.device("cpu"))
        return (target or torch.device("cpu")) if dev.type == "meta" else dev

    swaps: list[tuple[str, nn.Module, Callable[[], QLoRALinear]]] = []
    updates: list[tuple[QLoRALinear, Callable[[], tuple[torch.Tensor, QuantState]], Optional[str]]] = []
    for name, (state, bias) in quantized.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: in the file but not in the model")
            continue
        out_f, in_f = (int(s) for s in state.shape)
        shape = dense_shape(mod) or (getattr(mod, "out_features", None), getattr(mod, "in_features", None))
        if shape != (out_f, in_f):
            problems.append(f"{name}: the file's weight is {out_f}x{in_f} (out x in), the model's "
                            f"{type(mod).__name__} is {'x'.join('?' if d is None else str(d) for d in shape)}")
            continue
        if (bias is None) != (getattr(mod, "bias", None) is None):
            problems.append(f"{name}: bias {'missing from' if bias is None else 'present in'} the file but "
                            f"{'present in' if bias is None else 'absent from'} the model")
            continue
        if bias is not None:
            consumed.add(f"{name}.bias")
            if tuple(bias.shape) != (out_f,) or not bias.is_floating_point():
                # Checked here, not left to copy_: a (1,) bias would broadcast silently, and any
                # failure in the apply phase would come after other layers were already changed.
                problems.append(f"{name}.bias: {bias.dtype} of shape {tuple(bias.shape)} in the file, the layer "
                                f"needs a floating-point bias of shape ({out_f},)")
                continue
        dev = device_of(mod)

        def read(name=name, state=state, dev=dev):
            return ckpt.load(f"{name}.weight").to(dev), state.to(dev)

        bias_key = None if bias is None else f"{name}.bias"
        if isinstance(mod, QLoRALinear):
            updates.append((mod, read, bias_key))
        elif dense_shape(mod) is not None:
            why = _own_forward(mod)
            if why is not None:  # the file's 4-bit weight has nowhere else to go: refuse, as replace_linear skips
                problems.append(f"{name}: cannot take the file's 4-bit weight in a QLoRALinear: {why}")
                continue
            conv = is_conv1d(mod)

            def build(read=read, bias_key=bias_key, dev=dev, conv=conv):
                packed, state = read()
                bias = None if bias_key is None else ckpt.load(bias_key).to(dev)
                layer = QLoRALinear.from_quantized(packed, state, bias, **layer_kwargs)
                # A Conv1D's weight is quantized [out, in] as well (bitsandbytes transposes GPT-2's too).
                layer.fan_in_fan_out = conv
                return layer
            try:  # the arguments are checked now, on an empty layer of the same format
                QLoRALinear.from_quantized(tensors[f"{name}.weight"], state.to("meta"), None, **layer_kwargs)
            except (TypeError, ValueError) as e:
                problems.append(f"{name}: cannot build a QLoRALinear: {e}")
                continue
            swaps.append((name, mod, build))
        else:
            problems.append(f"{name}: the model's module is a {type(mod).__name__}, not a Linear")

    # Dense weights of the model's QLoRALinear layers: quantized as they load.
    layers = _qlora_layers(model)
    dense: list[tuple[QLoRALinear, str]] = []
    for name, layer in layers.items():
        key = f"{name}.weight"
        if name in quantized or key not in tensors:
            continue
        consumed.add(key)
        w = tensors[key]
        want = (layer.in_features, layer.out_features) if layer.fan_in_fan_out else (layer.out_features, layer.in_features)
        if tuple(w.shape) != want or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            problems.append(f"{key}: {w.dtype} {tuple(w.shape)} in the file; QLoRALinear {name} quantizes a float32/"
                            f"bfloat16/float16 weight of shape {want}"
                            + (" (it replaced a Conv1D: [in, out])" if layer.fan_in_fan_out else ""))
            continue
        dense.append((layer, name))

    replaced = set(quantized)
    current = model.state_dict()
    expected = {}
    aliases = _alias_paths(model)
    for k, v in current.items():
        module, _, leaf = k.rpartition(".")
        if module in aliases:  # the same tensors as under the module's first name
            continue
        if module in replaced and (leaf in _QLORA_INTERNAL or leaf in ("weight", "bias")):
            continue
        if _layer_internal(k, layers):
            continue
        expected[k] = v
    rest = {k: v for k, v in tensors.items() if k not in consumed}
    holders = _tensor_holders(model)
    slots = {k: _tensor_at(model, k) for k in expected}
    # Tied weights (a Hugging Face lm_head sharing the embedding) are saved under one of their
    # names: any name of the same tensor in the file fills them all.
    names_of: dict[int, list[str]] = {}
    for k, t in slots.items():
        names_of.setdefault(id(t), []).append(k)
    source = {k: k if k in rest else next((o for o in names_of[id(slots[k])] if o in rest), None) for k in expected}
    missing = sorted(k for k, src in source.items() if src is None)
    unexpected = sorted(set(rest) - set(expected))
    if ignore_unexpected:
        ignored = re.compile("|".join(f"(?:{p})" for p in ignore_unexpected))
        unexpected = [k for k in unexpected if not ignored.search(k)]
    dense_names = {name for _, name in dense}
    qlora_without = sorted(set(layers) - set(quantized) - dense_names)
    if qlora_without:
        problems.append(f"the file has no weight (4-bit or dense) for the model's QLoRALinear layer(s) {qlora_without[:10]}")
    if missing:
        problems.append(f"missing from the file: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        # transformers ties weights at from_pretrained, not under init_empty_weights: say so when a
        # missing key is a tied weight whose partner the file has.
        tied = getattr(model, "all_tied_weights_keys", None)
        untied = [k for k in missing if isinstance(tied, dict) and tied.get(k) in rest]
        if untied:
            problems.append(f"{untied[:10]} {'is' if len(untied) == 1 else 'are'} tied to "
                            f"{[tied[k] for k in untied[:10]]} in the model's config but not in the model: call "
                            "model.tie_weights() first (transformers ties them at from_pretrained, not under "
                            "init_empty_weights)")
    if unexpected:
        problems.append(f"not in the model: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for k in sorted(k for k, src in source.items() if src is not None):
        t = rest[source[k]]
        if tuple(t.shape) != tuple(expected[k].shape):
            problems.append(f"{k}: shape {tuple(t.shape)} in the file, {tuple(expected[k].shape)} in the model")
        elif _dtype_mismatch(t, expected[k]):
            problems.append(f"{k}: dtype {t.dtype} in the file, {expected[k].dtype} in the model (floating-point "
                            "values load only into floating-point tensors, other dtypes only into their own)")
    # (A layer's adapters, stored ones included, are made real when its base loads.)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.is_meta and source.get(n) is None
                    and not any(owner in quantized or owner in dense_names
                                for owner in (n.rpartition(".")[0], n.partition(".lora_stored.")[0]))]
    if left_on_meta and not missing:
        problems.append(f"{left_on_meta[:10]} would stay on the meta device: the file has no values for them "
                        "(non-persistent buffers such as a rotary embedding's inv_freq never are in a checkpoint: "
                        "build the model under accelerate.init_empty_weights(), which keeps buffers real, rather "
                        "than under torch.device('meta'))")
    if not quantized and not dense:
        problems.append("the file holds no 4-bit quantized weights (no *.weight.quant_state.bitsandbytes__* key) "
                        "and the model no QLoRALinear layer to quantize a dense weight into")
    if problems:
        raise AdapterFileError(f"{path}: does not fit the model:\n  " + "\n  ".join(problems))

    # Read and make ready, one tensor at a time (a dense weight is dropped once quantized); the
    # model is not touched until all of it is ready.
    ready_updates = []
    for layer, read, bias_key in updates:
        packed, state = read()
        ready_updates.append((layer, packed, state, None if bias_key is None else ckpt.load(bias_key), None))
    ready_dense = []
    for layer, name in dense:
        w = ckpt.load(f"{name}.weight").to(device_of(layer))
        if layer.fan_in_fan_out:
            w = w.t()
        try:
            packed, state, fitted_adapter = layer._quantize_weight(w)
        except ValueError as e:  # NaN/Inf in the weight
            raise AdapterFileError(f"{path}: {name}.weight cannot be quantized: {e}; nothing was loaded") from None
        ready_dense.append((layer, packed, state, None, fitted_adapter))
        del w
    ready_swaps = [(name, old, build()) for name, old, build in swaps]
    values = {}
    for k in expected:
        value = ckpt.load(source[k])
        values[k] = value.to(device_of(model.get_submodule(k.rpartition(".")[0]))) if slots[k].is_meta else value

    paths = _module_paths(model)  # a Linear registered under several names is swapped at each
    with torch.no_grad():
        for layer, packed, state, bias, fitted_adapter in ready_updates + ready_dense:
            layer._set_quantized(packed, state)
            layer.weight_dtype = state.dtype
            if layer.lora_A.is_meta:
                layer._materialize_adapter(packed.device)
            if fitted_adapter is not None:  # LoftQ / PiSSA: the adapter goes with its base
                layer._init_adapter(fitted_adapter)
            if bias is not None:
                if layer.bias.is_meta:  # the file's tensor, on the device the layer's buffers took from it
                    _assign(holders, layer.bias, bias.to(packed.device))
                else:
                    layer.bias.copy_(bias)
        for k in expected:
            if slots[k].is_meta:
                _assign(holders, slots[k], values[k])
            else:
                current[k].copy_(values[k])
        for _, old, layer in ready_swaps:  # with the Linear's hooks, as replace_linear
            _take_place(model, paths, old, layer)
    if ready_swaps:
        freeze_all_but_adapters(model, [layer for _, _, layer in ready_swaps])
        guard_state_dict_loads(model)
        model.qlora_replaced = list(getattr(model, "qlora_replaced", [])) + [n for n, _, _ in ready_swaps]
    return model


# --- from_pretrained: a Hugging Face checkpoint directory as a 4-bit model, in one call ---------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # What transformers' from_pretrained builds a model under: parameters made in `dtype`, while
    # buffers a model computes in float32 on purpose (a rotary embedding's inv_freq) stay float32.
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _as_dtype(value, what: str) -> Optional[torch.dtype]:
    """A torch dtype from a config value (a torch.dtype or its name, e.g. "bfloat16"); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what}: {value!r} is not a torch dtype")
    return dtype


def _checkpoint_dtype(ckpt: _Checkpoint) -> torch.dtype:
    """The floating dtype most of the checkpoint's (non-4-bit) values are stored in: what
    transformers' dtype="auto" takes when the config names none. float32 when it holds none."""
    quantized = {m["module"] for k in ckpt.keys() if (m := _QS_KEY.match(k))}
    sizes: Counter = Counter()
    for key in ckpt.keys():
        module = key.partition(".weight")[0]
        if module in quantized and (key == f"{module}.weight" or key.startswith(f"{module}.weight.")):
            continue
        t = ckpt.meta(key)
        if t.is_floating_point():
            sizes[t.dtype] += t.numel()
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def from_pretrained(path: PathLike, model_class=None, *, target_modules=ALL_LINEAR, exclude=None,
                    dtype: Union[str, torch.dtype] = "auto", device: Optional[Union[str, torch.device]] = None,
                    **layer_kwargs) -> nn.Module:
    """A Hugging Face checkpoint directory as a QLoRA model in one call: transformers'
    from_pretrained, but the Linears are QLoRALinear layers (4-bit base, trainable adapters) and the
    model is never held in 16 bits (built empty, then filled one tensor at a time by load_quantized).

    path: a local directory with config.json and model.safetensors (or shards and their index;
      or, as older checkpoints have it, pytorch_model.bin, read a tensor at a time all the same).
      A dense (16/32-bit) checkpoint: the Linears replace_linear(target_modules, exclude) selects
      (default "all-linear": every Linear but the output layer) are quantized as they load
      (layer_kwargs: r, lora_alpha, lora_dropout, quant_type, blocksize, compute_dtype, use_dora, ...).
      A pre-quantized "bnb-4bit" checkpoint (config.json's quantization_config: load_in_4bit; e.g.
      one save_pretrained_quantized wrote): its 4-bit layers become QLoRALinear with bitsandbytes'
      bytes, computing in the config's bnb_4bit_compute_dtype unless layer_kwargs names one (as
      transformers does); which layers are 4-bit is the checkpoint's choice, so target_modules and
      exclude are refused there.
    model_class: the transformers class to build (default: the config's architectures[0], as
      the checkpoint was saved; e.g. AutoModelForCausalLM or a class of your own).
    dtype: of the layers left unquantized (embeddings, norms, lm_head) and of the weights the
      QLoRALinear layers record (what merge_and_unload gives back): "auto" (the config's dtype,
      else the checkpoint's), or a torch dtype.
    device: where every tensor goes as it is read (default the CPU).

    Returns the model in eval mode, frozen but for the adapters, with `qlora_replaced`, its
    weights tied as the config says and its generation_config.json read. Raises ImportError
    without transformers/accelerate, FileNotFoundError/ValueError naming what is wrong with the
    directory, its config or the arguments (before anything is read).
    """
    try:
        import accelerate
        import transformers
    except ImportError as e:
        raise ImportError(f"from_pretrained needs transformers and accelerate ({e}): "
                          "pip install transformers accelerate") from None
    if "torch_dtype" in layer_kwargs:  # transformers' old name (renamed dtype in transformers 5)
        raise TypeError("from_pretrained takes dtype=, not torch_dtype= (transformers' old name for it)")
    target = None if device is None else torch.device(device)
    if target is not None and target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"from_pretrained: device={device!r}, but torch sees no CUDA device here")
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"from_pretrained: {root} is not a Hugging Face checkpoint directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if archs else None
        if model_class is None:
            raise ValueError(f"from_pretrained: {root}/config.json names no transformers architecture "
                             f"({archs or 'none'}); pass model_class (e.g. transformers.AutoModelForCausalLM)")
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if quant is not None:
        if quant.get("quant_method", "bitsandbytes") != "bitsandbytes" or not quant.get("load_in_4bit"):
            raise ValueError(f"from_pretrained: {root} is quantized as {quant.get('quant_method')} "
                             f"(load_in_4bit={quant.get('load_in_4bit')}); only bitsandbytes 4-bit checkpoints "
                             "and dense ones load here")
        if target_modules != ALL_LINEAR or exclude is not None:
            raise ValueError(f"from_pretrained: {root} is a pre-quantized bnb-4bit checkpoint: its 4-bit layers "
                             "are the ones it holds, so target_modules / exclude cannot choose them")
        compute = _as_dtype(quant.get("bnb_4bit_compute_dtype"), f"{root}/config.json bnb_4bit_compute_dtype")
        layer_kwargs.setdefault("compute_dtype", compute or torch.float32)  # (transformers' default too)
        del config.quantization_config  # the model is built plain; load_quantized makes its 4-bit layers
    ckpt = _Checkpoint(root)  # headers only: the directory's files are checked before anything is built
    if dtype == "auto":
        # (transformers 5 names it dtype, and warns when torch_dtype, its old name, is read)
        named = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
        dtype = _as_dtype(named, f"{root}/config.json dtype") or _checkpoint_dtype(ckpt)
    elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"from_pretrained: dtype must be \"auto\" or a floating torch dtype, got {dtype!r}")

    with accelerate.init_empty_weights(), _default_dtype(dtype):  # parameters on meta, buffers real
        model = (model_class.from_config(config) if hasattr(model_class, "from_config")
                 else model_class(config))
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # (from_pretrained ties at load; a tied weight is then read once)
    # Entries transformers skips too: its model's own patterns, and entries at the name of a buffer
    # the model computes rather than saves (older releases saved BERT's position_ids, a rotary inv_freq).
    persistent = set(model.state_dict())
    computed = {n.rpartition(".")[2] for n, _ in model.named_buffers() if n not in persistent}
    ignore = [rf"(^|\.){re.escape(leaf)}$" for leaf in sorted(computed)]
    ignore += list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    if quant is None:
        replace_linear(model, target_modules=target_modules, exclude=exclude, **layer_kwargs)
        load_quantized(model, root, device=target, ignore_unexpected=ignore)
    else:
        load_quantized(model, root, device=target, ignore_unexpected=ignore, **layer_kwargs)
    if target is not None:
        model.to(target)  # the buffers init_empty_weights kept real (on the CPU); the rest is there already
    generation = root / "generation_config.json"
    if generation.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(root), local_files_only=True)
    return model.eval()


__all__ = ["AdapterFileError", "from_pretrained", "load_adapter", "load_quantized", "quantized_state_dict",
           "save_adapter", "save_pretrained_quantized", "save_quantized"]
