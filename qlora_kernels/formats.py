"""Code tables and the quantization state of the 4-bit and 8-bit blockwise formats.

Everything here is data and bookkeeping: no kernel math (that is reference.py, the spec, and the
backends). The tables are bit-identical to bitsandbytes 0.50 (DESIGN.md section 3), so bytes move
between the two libraries unchanged.

Layout of a quantized weight W of `shape` (numel n), blocksize B:
    packed   uint8 [ceil(n/2), 1]  byte j = (q[2j] << 4) | q[2j+1]; odd n: last low nibble 0.
                                   (Any `quant_storage` dtype only reinterprets these bytes.)
    absmax   fp32 [ceil(n/B)]      without double quantization, or
             uint8 [ceil(n/B)]     with it: absmax[i] = code2[q[i]] * absmax2[i // 256] + offset
    absmax2  fp32 [ceil(ceil(n/B)/256)], code2 fp32 [256] (signed dynamic map), offset fp32 scalar.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import torch

try:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # a torch without fake tensors cannot trace with them either
    def _is_fake(t: torch.Tensor) -> bool:
        return False

# NF4 levels, index 0..15 (the QLoRA paper's NormalFloat4; bitsandbytes' table bit for bit).
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits, scaled to max 1). Index 8 (the bit
# pattern "sign=1, zero") is +0.0 as in bitsandbytes' table (and thus its state dicts'
# quant_map); its own C decoders disagree on that zero's sign (-0.0 in the scalar path, +0.0 in the
# vectorised one), so FP4 decodes are compared modulo the sign of zero.
FP4_CODE_VALUES = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)

QUANT_TYPES = ("nf4", "fp4")
# The dtypes a quantized weight may have (and dequantize may return).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES_4BIT = tuple(2**i for i in range(5, 13))  # 32 .. 4096
NESTED_BLOCKSIZE = 256
# Resolution of the table the 8-bit encoder looks values up in (see reference.quantize_blockwise).
DYNAMIC_LUT_SIZE = 65536


def derive_nf4_code() -> torch.Tensor:
    """NF4 from normal quantiles with scipy, the way the QLoRA paper builds it (for the table test).

    8 positive levels at norm.ppf of linspace(0.9677083, 0.5, 9)[:-1], 7 negative ones at
    -norm.ppf of linspace(0.9677083, 0.5, 8)[:-1], an exact zero; sorted, divided by the max.
    """
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].numpy())).tolist()
    values = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    return (values / values.max()).to(torch.float32)


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry 8-bit dynamic map (signed: absmax/offset, optimizer m; unsigned: optimizer v).

    Seven exponent ranges 10^(i-6); in each, the midpoints of a float32 linspace(0.1, 1, n) with
    n = 2^i + 1 (signed, mirrored to negatives) or 2^(i+1) + 1 (unsigned); then 0 and 1.0, zero
    padding to 256, sorted. Equal to bitsandbytes' create_dynamic_map bit for bit.
    """
    values: list[float] = []
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        b = torch.linspace(0.1, 1, n, dtype=torch.float32)
        mids = (b[:-1] + b[1:]) / 2.0
        scaled = (10 ** (i - 6)) * mids  # fp32 tensor times a Python float: fp32 product
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(values, dtype=torch.float32).sort().values


@lru_cache(maxsize=None)
def _code_cpu(name: str) -> torch.Tensor:
    # On the CPU whatever default device is set: a model built under `with torch.device("meta")`
    # (or "cuda") would otherwise build (and cache) the tables there, and meta has no values.
    with torch.device("cpu"):
        if name == "nf4":
            return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)
        if name == "fp4":
            return torch.tensor(FP4_CODE_VALUES, dtype=torch.float32)
        if name == "dynamic":
            return create_dynamic_map(signed=True)
        if name == "dynamic_unsigned":
            return create_dynamic_map(signed=False)
    raise ValueError(f"unknown code table {name!r}; expected nf4, fp4, dynamic or dynamic_unsigned")


_code_cache: dict[tuple[str, torch.device], torch.Tensor] = {}


def get_code(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """A code table (fp32) on `device`, cached per device. Never mutate the returned tensor."""
    device = torch.device(device)
    key = (name, device)
    if key not in _code_cache:
        _code_cache[key] = _code_cpu(name).to(device)
    return _code_cache[key]


def values_readable(t: torch.Tensor) -> bool:
    """Whether t's values can be read to check them: not on the meta device, not while torch.compile
    traces and not for fake tensors (all of which stand in for values not known yet)."""
    return t.device.type != "meta" and not torch.compiler.is_compiling() and not _is_fake(t)


def _is_shipped_code(code: Any, quant_type: Any) -> bool:
    """Whether `code` is the shared get_code(quant_type) tensor of its device (by identity: no values
    read, nothing created)."""
    return (isinstance(code, torch.Tensor) and quant_type in QUANT_TYPES
            and code is _code_cache.get((quant_type, code.device)))


def packed_numel(numel: int) -> int:
    """Bytes of packed 4-bit data for `numel` elements (two per byte, odd count rounded up)."""
    return (numel + 1) // 2


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(
            f"blocksize must be a power of two in 32..4096, got {blocksize}"
        )
    return blocksize


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in quant state")
    return dtype


@dataclass
class QuantState:
    """What it takes to decode a 4-bit packed tensor; field names follow bitsandbytes' QuantState.

    absmax: fp32 [nblocks] (nested=False) or uint8 [nblocks] (nested=True).
    shape, dtype: of the original weight (dtype is what dequantize returns by default).
    code: the 16-entry 4-bit table. offset (fp32 0-d), nested_absmax (fp32), nested_code (fp32
    [256]) and nested_blocksize (256) are set only when the absmax are double-quantized.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    nested_dtype: torch.dtype = field(default=torch.float32)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy on `device` (bitsandbytes' QuantState.to mutates; ours returns a new state)."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        if _is_shipped_code(self.code, self.quant_type):
            # The shared table on the new device, so that validate (every qlora_linear call) keeps
            # recognising it by identity instead of comparing values (a device sync on GPUs).
            moved["code"] = get_code(self.quant_type, moved["code"].device)
        return QuantState(**moved)

    def nbytes(self) -> int:
        """Bytes the scales take (packed weight excluded)."""
        tensors = [self.absmax, self.code, self.offset, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def validate(self, packed: Optional[torch.Tensor] = None) -> None:
        """Raise ValueError/TypeError when the state is inconsistent in itself or with `packed`.

        Checks types, dtypes, shapes and devices, and that `code` is the table of `quant_type` (the
        decoders use the table of quant_type, so any other code would be silently ignored). Values
        are compared only where they can be read without cost: a state holding the shared table
        (get_code) passes by identity, and nothing is read under torch.compile, fake tensors or
        on the meta device.
        """
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        if not isinstance(self.shape, (tuple, list)):
            raise TypeError(f"quant state shape must be a torch.Size or tuple of ints, got {type(self.shape).__name__}")
        for s in self.shape:
            if isinstance(s, bool) or not isinstance(s, (int, torch.SymInt)) or s < 0:
                raise ValueError(f"quant state shape must hold non-negative ints, got {tuple(self.shape)}")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"quant state dtype (the weight's dtype, dequantize's default) must be float32, bfloat16 "
                f"or float16, got {self.dtype}"
            )
        for name in ("absmax", "code", "offset", "nested_absmax", "nested_code"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) and (t is not None or name in ("absmax", "code")):
                raise TypeError(f"quant state {name} must be a torch.Tensor, got {type(t).__name__}")
        n = self.numel
        if n <= 0:
            raise ValueError(f"quant state describes an empty tensor (shape {tuple(self.shape)})")
        nb = num_blocks(n, self.blocksize)
        if self.absmax.dim() != 1 or self.absmax.numel() != nb:
            raise ValueError(
                f"absmax has shape {tuple(self.absmax.shape)}, expected [{nb}] for shape "
                f"{tuple(self.shape)} at blocksize {self.blocksize}"
            )
        if self.code.shape != (16,) or self.code.dtype != torch.float32:
            raise ValueError(
                f"code must be a float32 tensor of 16 entries, got {self.code.dtype} {tuple(self.code.shape)}"
            )
        if not _is_shipped_code(self.code, self.quant_type) and values_readable(self.code) \
                and not torch.equal(self.code, get_code(self.quant_type, self.code.device)):
            raise ValueError(
                f"code (bitsandbytes' quant_map) is not the standard {self.quant_type} table "
                f"(formats.get_code({self.quant_type!r})), which quant_type {self.quant_type!r} decodes with"
            )
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"double-quantized absmax must be uint8, got {self.absmax.dtype}")
            nb2 = num_blocks(nb, self.nested_blocksize)
            if self.nested_absmax.shape != (nb2,) or self.nested_absmax.dtype != torch.float32:
                raise ValueError(
                    f"nested_absmax must be float32 [{nb2}], got {self.nested_absmax.dtype} "
                    f"{tuple(self.nested_absmax.shape)}"
                )
            if self.nested_code is None or self.nested_code.shape != (256,) \
                    or self.nested_code.dtype != torch.float32:
                got = "None" if self.nested_code is None else f"{self.nested_code.dtype} {tuple(self.nested_code.shape)}"
                raise ValueError(f"nested_code must be a float32 tensor of 256 entries, got {got}")
            # 0-d as bitsandbytes makes it; [1] broadcasts the same way. Anything else would
            # broadcast the decoded absmax to the wrong shape.
            if self.offset is None or self.offset.dtype != torch.float32 or self.offset.shape not in ((), (1,)):
                got = "None" if self.offset is None else f"{self.offset.dtype} {tuple(self.offset.shape)}"
                raise ValueError(f"double-quantized state needs a float32 scalar offset (shape () or [1]), got {got}")
            if self.nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {self.nested_blocksize}")
            if self.nested_dtype != torch.float32:
                raise ValueError(f"nested_dtype must be float32 (that of nested_absmax), got {self.nested_dtype}")
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 without double quantization, got {self.absmax.dtype}")
        if packed is not None:
            if not isinstance(packed, torch.Tensor):
                raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
            nbytes = packed.numel() * packed.element_size()
            if nbytes != packed_numel(n):
                raise ValueError(
                    f"packed tensor holds {nbytes} bytes but the quant state's shape "
                    f"{tuple(self.shape)} needs {packed_numel(n)}"
                )
            for name in ("absmax", "code", "nested_absmax", "nested_code", "offset"):
                t = getattr(self, name)
                if t is not None and t.device != packed.device:
                    raise ValueError(
                        f"quant state's {name} is on {t.device} but the packed tensor is on {packed.device}"
                    )

    # --- bitsandbytes state-dict interop (Linear4bit keys, DESIGN.md section 3) ---

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes' QuantState.as_dict gives it.

        packed=False: tensors and plain values under bitsandbytes' names. packed=True: only tensors,
        the plain values JSON-encoded into a uint8 tensor under "quant_state.bitsandbytes__<type>"
        (safetensors-ready). Prefix the keys with "<module>.weight." for a Linear4bit state dict.
        """
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            d.update(
                {
                    "nested_absmax": self.nested_absmax,
                    "nested_blocksize": self.nested_blocksize,
                    "nested_quant_map": self.nested_code.clone(),
                    "nested_dtype": _dtype_name(self.nested_dtype),
                    "nested_offset": float(self.offset.item()),
                }
            )
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        blob = json.dumps(plain).encode("utf-8")
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        """Inverse of as_dict (packed or not); keys may carry a "<module>.weight." prefix.

        Raises ValueError/TypeError naming the entry when one is missing, of the wrong kind or
        inconsistent (then validate()'s checks)."""
        if not isinstance(qs_dict, Mapping):
            raise TypeError(f"quant state dict must be a dict (as_dict's layout), got {type(qs_dict).__name__}")
        flat: dict[str, Any] = {}
        blobs = []
        for k, v in qs_dict.items():
            if not isinstance(k, str):
                raise TypeError(f"quant state dict keys must be strings, got {k!r}")
            if "quant_state.bitsandbytes__" in k:
                blobs.append((k, v))
            else:
                flat[k.split(".")[-1]] = v
        if blobs:
            if len(blobs) != 1:
                raise ValueError(f"expected one quant_state.bitsandbytes__* entry, found {[k for k, _ in blobs]}")
            key, blob = blobs[0]
            suffix = key.rsplit("bitsandbytes__", 1)[1]
            if suffix not in QUANT_TYPES:
                raise ValueError(f"unknown quant type {suffix!r} in key {key!r}")
            if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
                raise TypeError(f"{key} must be a uint8 tensor holding JSON")
            try:
                plain = json.loads(bytes(blob.reshape(-1).cpu().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{key} does not hold valid UTF-8 JSON: {e}") from None
            if not isinstance(plain, dict):
                raise ValueError(f"{key} must hold a JSON object, got a JSON {type(plain).__name__}")
            if plain.get("quant_type", suffix) != suffix:
                raise ValueError(f"{key} says quant type {suffix!r} but its JSON says {plain['quant_type']!r}")
            flat.update(plain)
        required = ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape")
        nested = "nested_absmax" in flat
        if nested:
            required += ("nested_quant_map", "nested_offset")
        missing = [k for k in required if k not in flat]
        if missing:
            raise ValueError(f"quant state dict lacks {missing}")
        device = torch.device(device)
        state = cls(
            absmax=_tensor_entry(flat, "absmax").to(device),
            shape=_shape_entry(flat),
            dtype=_dtype_entry(flat, "dtype"),
            blocksize=_int_entry(flat, "blocksize"),
            quant_type=check_quant_type(flat["quant_type"]),
            code=_tensor_entry(flat, "quant_map").to(device=device, dtype=torch.float32),
            offset=torch.tensor(_offset_entry(flat), dtype=torch.float32, device=device) if nested else None,
            nested_absmax=_tensor_entry(flat, "nested_absmax").to(device) if nested else None,
            nested_code=_tensor_entry(flat, "nested_quant_map").to(device=device, dtype=torch.float32) if nested else None,
            nested_blocksize=_int_entry(flat, "nested_blocksize") if "nested_blocksize" in flat else NESTED_BLOCKSIZE,
            nested_dtype=_dtype_entry(flat, "nested_dtype") if "nested_dtype" in flat else torch.float32,
        )
        state.validate()
        # validate() found the values equal to the shared table: hold that one, so that later
        # validations (every qlora_linear call) recognise it by identity, without a device sync.
        state.code = get_code(state.quant_type, state.code.device)
        return state


# --- entries of a quant state dict (from_dict): the right kind, or an error naming the key ---


def _tensor_entry(flat: dict[str, Any], key: str) -> torch.Tensor:
    v = flat[key]
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"quant state dict entry {key!r} must be a torch.Tensor, got {type(v).__name__}")
    return v


def _int_entry(flat: dict[str, Any], key: str) -> int:
    v = flat[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"quant state dict entry {key!r} must be an int, got {v!r}")
    return int(v)


def _shape_entry(flat: dict[str, Any]) -> torch.Size:
    v = flat["shape"]
    if not isinstance(v, (tuple, list)) or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0
                                               for s in v):
        raise ValueError(f"quant state dict entry 'shape' must be a list of non-negative ints, got {v!r}")
    return torch.Size(int(s) for s in v)


def _dtype_entry(flat: dict[str, Any], key: str) -> torch.dtype:
    v = flat[key]
    if not isinstance(v, str):
        raise ValueError(f"quant state dict entry {key!r} must be a dtype name such as 'float32', got {v!r}")
    return _dtype_from_name(v)


def _offset_entry(flat: dict[str, Any]) -> float:
    v = flat["nested_offset"]
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"quant state dict entry 'nested_offset' must be a finite real number, got {v!r}")
    return float(v)
