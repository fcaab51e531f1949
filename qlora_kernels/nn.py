"""QLoRALinear (an nn.Linear replacement with a frozen 4-bit base), replace_linear, memory_report.

A QLoRALinear holds W [out, in] only in its quantized form: packed nibbles and (double-quantized)
scales, as buffers, so state_dict(), to(), cuda() and load_state_dict() handle them like any other
module state. A QuantState is rebuilt from the buffers on each use (cheap: no data moves). The code
tables are constants (formats.get_code) rather than per-layer buffers: 1 KB per layer of data that
never differs would skew bits/param on small layers; io.py writes them out where bitsandbytes'
checkpoint format expects them.

Forward: y = x @ dequant(W)^T + scale * dropout(x) @ A^T @ B^T (+ bias), one call of
functional.qlora_linear (the fused op; nothing here dequantizes W for the forward or backward).
"""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import logging
import math
import numbers
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from .formats import QuantState, check_blocksize, check_quant_type, get_code, values_readable
from .functional import dequantize_4bit, qlora_linear, quantize_4bit

logger = logging.getLogger("qlora_kernels")

# Buffers that hold the quantized weight; their dtypes are part of the format and must survive
# module.to(dtype) / .half() (see QLoRALinear._apply).
_QUANT_BUFFERS = ("packed_weight", "absmax", "nested_absmax", "offset")
_NESTED_BUFFERS = ("nested_absmax", "offset")
# Buffers derived from the quantized weight, kept in fp32 through module casts too (not saved).
_DERIVED_BUFFERS = ("dora_base_sq_norm",)
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_READ_ONLY = (
    "QLoRALinear.weight is a read-only stand-in for the frozen 4-bit base (a QuantizedWeight, "
    "dequantized afresh on each use), so {what} would be lost. Train the adapter (lora_A / lora_B); to "
    "change the base, fold the adapter in with merge_and_requantize(), or build a new layer from the new "
    "weight with QLoRALinear.from_linear"
)


def conv1d_type() -> Optional[type]:
    """transformers' Conv1D (GPT-2's and OpenAI GPT's linear layer: y = x @ W + b with W stored
    [in, out], the transpose of nn.Linear's), or None while transformers.pytorch_utils is not
    imported: a model can hold one only after it is, so this never imports transformers itself."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(mod) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(mod, conv1d)


def dense_shape(mod: nn.Module) -> Optional[tuple[int, int]]:
    """(out_features, in_features) of an nn.Linear or a transformers Conv1D; None for other modules."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    if is_conv1d(mod):
        return mod.nf, mod.nx
    return None


def dense_weight(mod: nn.Module) -> Optional[torch.Tensor]:
    """The weight of an nn.Linear or a Conv1D as nn.Linear lays it out, [out, in] (a Conv1D's
    transposed view), when it is a plain floating-point tensor of the layer's shape; else None (a
    quantized or otherwise replaced weight)."""
    shape = dense_shape(mod)
    w = getattr(mod, "weight", None)
    if shape is None or not isinstance(w, torch.Tensor) or not w.is_floating_point():
        return None
    if is_conv1d(mod):
        w = w.t()
    return w if tuple(w.shape) == shape else None


def _written_args(func, args, kwargs) -> list:
    """The tensors an aten op writes to: arguments its schema marks mutable (Tensor(a!)), out= included."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written.extend(tree_leaves(args[i] if i < len(args) else kwargs.get(arg.name)))
    return written


def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real)  # bool (JSON's true) is not a number here


def finite_real(v) -> Optional[float]:
    """v as a float when it is a finite real number (int or float, not bool), else None."""
    if not _is_real(v):
        return None
    try:
        f = float(v)
    except OverflowError:  # an int too large for a float
        return None
    return f if math.isfinite(f) else None


def _check_real(what: str, v) -> None:
    """A finite real number (int or float, not bool), as LoRA's scalar settings must be."""
    if not _is_real(v):
        raise TypeError(f"{what} must be a real number (int or float), got {type(v).__name__} {v!r}")
    if finite_real(v) is None:
        raise ValueError(f"{what} must be finite, got {v!r}")


def _check_positive_int(what: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")


def _check_dropout(v) -> None:
    _check_real("lora_dropout", v)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {v}")


def _check_flag(what: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{what} must be True or False, got {v!r}")


def _magnitude_over_norm(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """DoRA's m / n per row, 0 where n = 0: such a row of W + s B A is all zeros, so its output is
    zero whatever the scale (PEFT divides by zero there and gives NaN); the denominator is made safe
    first so that m's gradient stays finite too."""
    nonzero = norm > 0
    return torch.where(nonzero, magnitude / torch.where(nonzero, norm, torch.ones_like(norm)),
                       torch.zeros_like(magnitude))


class QuantizedWeight(torch.Tensor):
    """What `QLoRALinear.weight` returns: a storage-less tensor that reports the shape
    [out, in], the compute dtype, the device and requires_grad=False of the weight an nn.Linear
    would have, so code that inspects `module.weight` (Hugging Face reads .dtype/.device) works
    without a dequantization. Any real use (an op taking it as an argument, e.g. F.linear or
    .float()) dequantizes afresh for that op; nothing is cached.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # What torch._C._disabled_torch_function_impl does (straight to __torch_dispatch__, results
        # not wrapped), but as an override torch can see: fast paths that read Linear weights
        # directly and skip the module's forward (nn.TransformerEncoderLayer's and
        # nn.MultiheadAttention's inference paths) stand down for arguments with a
        # __torch_function__, so the adapter is not bypassed there.
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @staticmethod
    def __new__(cls, packed: torch.Tensor, state: QuantState, dtype: torch.dtype):
        t = torch.Tensor._make_wrapper_subclass(
            cls, tuple(state.shape), dtype=dtype, device=packed.device, requires_grad=False
        )
        t._packed = packed
        t._state = state
        return t

    def __init__(self, packed, state, dtype):
        pass

    def dequantize_weight(self) -> torch.Tensor:
        """The dequantized weight as a plain tensor of this stand-in's dtype (a new copy)."""
        return dequantize_4bit(self._packed, self._state, self.dtype)

    # `.data` and detach() give another read-only stand-in of the same base, so a write through them
    # (weight.data.normal_()) is refused like one on the weight itself, instead of landing on a
    # dequantized copy and vanishing. Reads (numpy, tolist, deepcopy) dequantize.
    @property
    def data(self) -> "QuantizedWeight":
        return QuantizedWeight(self._packed, self._state, self.dtype)

    @data.setter
    def data(self, value) -> None:
        raise RuntimeError(_READ_ONLY.format(what="assigning its .data"))

    def numpy(self, *, force: bool = False):
        return self.dequantize_weight().numpy(force=force)

    def tolist(self):
        return self.dequantize_weight().tolist()

    def __deepcopy__(self, memo):
        return self.dequantize_weight()

    def __repr__(self, *, tensor_contents=None) -> str:
        s = self._state
        return (
            f"QuantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"{s.quant_type} blocksize={s.blocksize} double_quant={s.nested}; dequantized on use)"
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable and any(isinstance(t, QuantizedWeight) for t in _written_args(func, args, kwargs)):
            raise RuntimeError(_READ_ONLY.format(what=f"writing to it ({func.overloadpacket.__name__})"))
        if func is torch.ops.aten.detach.default:
            w = args[0]
            return QuantizedWeight(w._packed, w._state, w.dtype)

        def unwrap(t):
            return t.dequantize_weight() if isinstance(t, QuantizedWeight) else t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


@dataclass
class RequantizationError:
    """What re-quantizing a merged weight W' = W + s*B@A added: dequant(quant(W')) - W'."""

    max_abs: float
    rms: float
    rel_rms: float  # rms / rms(W')
    lora_delta_rms: float  # rms of W' - W (s*B@A without DoRA), for scale: the change the merge was meant to carry

    def __str__(self) -> str:
        return (
            f"re-quantization error: max |err| {self.max_abs:.3e}, rms {self.rms:.3e} "
            f"({100 * self.rel_rms:.2f}% of rms(W')); rms of the merged LoRA delta {self.lora_delta_rms:.3e}"
        )


# PEFT's init_lora_weights values supported here (True: kaiming-uniform A, zero B).
INIT_LORA_WEIGHTS = (True, "gaussian", "pissa", "loftq")
_FITTED_INITS = ("pissa", "loftq")  # the adapter fitted together with the base, from the dense weight


def _rank_r_fit(m: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with scale * B @ A the rank-r truncated SVD of m (fp32), split
    evenly (B = U sqrt(S / scale), A = sqrt(S / scale) V^T). A rank above min(out, in) leaves the
    extra directions at zero."""
    u, sv, vh = torch.linalg.svd(m / scale, full_matrices=False)
    root = sv[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    if b.shape[1] < r:
        b = torch.nn.functional.pad(b, (0, r - b.shape[1]))
        a = torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0]))
    return a, b


def pissa_decompose(w: torch.Tensor, r: int, scale: float, **quant):
    """PiSSA (Meng et al. 2024; QPiSSA with a 4-bit base): the adapter takes W's r principal
    components (scale * B @ A = the rank-r truncated SVD of W) and the base quantizes the rest,
    W - scale * B A, whose smaller range quantizes with a smaller error. Returns (packed, state,
    A, B) as loftq_decompose."""
    w = w.detach().float()
    a, b = _rank_r_fit(w, r, scale)
    return (*quantize_4bit(w - scale * (b @ a), **quant), a, b)


def loftq_decompose(w: torch.Tensor, r: int, scale: float, iters: int = 1, **quant):
    """LoftQ (Li et al. 2023): a 4-bit base W_q and a rank-r adapter with W_q + scale * B @ A ~ W,
    instead of W_q = quant(W) and B = 0. Each iteration quantizes what the adapter leaves
    (W - scale * B A; W itself first) and refits scale * B A to the rank-r truncated SVD of
    W - dequant(W_q). PEFT's loftq_init fits B A itself to that, right only when lora_alpha = r
    (scale 1); here the scale is divided out, so the sum is the fit whatever the scale.

    w: [out, in] dense weight (any float dtype; computed in fp32 on its device). quant: the
    quantize_4bit format arguments. Returns (packed, state, A [r, in] fp32, B [out, r] fp32).
    Each iteration costs a full SVD of the weight (as PEFT's and pissa's: done once, at init).
    """
    w = w.detach().float()
    target = w
    for _ in range(iters):
        packed, state = quantize_4bit(target, **quant)
        a, b = _rank_r_fit(w - dequantize_4bit(packed, state, torch.float32), r, scale)
        target = w - scale * (b @ a)
    return packed, state, a, b


# What each adapter of a layer has of its own besides its parameters (lora_A, lora_B and, with DoRA,
# lora_magnitude_vector; use_dora is the layer's, shared by its adapters as the base norms are).
_ADAPTER_SETTINGS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights")


def _set_lora_alpha(owner, value) -> None:
    # Checked on every assignment (load_adapter sets it too): a bad value would otherwise surface
    # only in the forward, as an obscure error from the scale.
    _check_real("lora_alpha", value)
    owner._lora_alpha = int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_adapter_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"an adapter name must be a non-empty string without '.', got {adapter_name!r}")
    if adapter_name.startswith("_") or hasattr(nn.ModuleDict(), adapter_name):  # (it names a ModuleDict entry)
        raise ValueError(f"adapter name {adapter_name!r} is taken by nn.ModuleDict's own attributes (or starts "
                         "with '_'); pick another")


class _StoredAdapter(nn.Module):
    """An adapter a QLoRALinear holds but does not compute with: its parameters (registered, so they
    move, cast and save with the layer: <layer>.lora_stored.<name>.lora_A, ...) and settings."""

    r: int
    lora_dropout: float
    use_rslora: bool
    init_lora_weights: Union[bool, str]

    lora_alpha = property(lambda self: self._lora_alpha, lambda self, value: _set_lora_alpha(self, value))

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"


class QLoRALinear(nn.Module):
    """y = x @ dequant(W)^T + scale * dropout(x) @ lora_A^T @ lora_B^T (+ bias), scale = lora_alpha / r
    (lora_alpha / sqrt(r) with use_rslora=True, PEFT's rank-stabilized LoRA).

    W [out, in] is frozen in 4 bits (NF4 or FP4, blockwise absmax, optionally double-quantized);
    lora_A [r, in] (kaiming-uniform, a=sqrt(5), as the LoRA paper / PEFT) and lora_B [out, r]
    (zeros, so a fresh layer equals the dequantized base) are the trainable parameters, kept in
    `lora_dtype` (fp32 by default, as PEFT keeps adapters, for stable optimizer updates). The bias
    trains only with train_bias=True (BitFit). The matmuls run in `compute_dtype` (x is cast to it);
    the output comes back in the dtype an nn.Linear would give: x's (as bitsandbytes' Linear4bit and
    PEFT's LoRA layers), or autocast's inside an autocast region. So a float32 model whose Linears
    compute in bf16 keeps float32 activations between them (its other layers, e.g. eager
    attention's probs @ V, need operands of one dtype).

    init_lora_weights (PEFT's): True, A kaiming-uniform (a=sqrt(5)) and B = 0, so a fresh layer is
    its 4-bit base; "gaussian", A normal with std 1/r; "pissa" and "loftq" (loftq_iter rounds) split
    the dense weight between base and adapter so that dequant(W) + scale * B A starts closer to the
    dense weight than quant(W) does (pissa_decompose, loftq_decompose): only from a dense weight.

    use_dora=True: DoRA (weight-decomposed LoRA, Liu et al. 2024), as PEFT's use_dora:
    y = (m / n) * (x @ dequant(W)^T + scale * x @ A^T @ B^T) + bias, with a trainable magnitude
    m [out] (`lora_magnitude_vector`, starting at the base's row norms) and n = ||W + scale * B @ A||
    per output row, detached (the paper's section 4.3). n is computed without dequantizing W: the
    base's row norms are cached (`dora_base_sq_norm`, refreshed whenever the quantized weight is set
    or loaded) and the rest needs only A through the base op (see dora_weight_norm). With
    lora_dropout in training it is PEFT's form: base(x) + (m/n - 1) * base(d) + (m/n) * scale * d A^T B^T,
    d = dropout(x), bias included.
    """

    # Class-level defaults: a layer pickled (torch.save(model)) before these existed loads as it was.
    use_rslora: bool = False
    # True when the layer replaced a transformers Conv1D (GPT-2), which stores its weight [in, out]:
    # PEFT's name for that. The quantized base is [out, in] all the same (as bitsandbytes
    # quantizes GPT-2); only what merge() / unload() give back, a Conv1D again, depends on it.
    fan_in_fan_out: bool = False
    # False inside disable_adapter(model): the layer computes its 4-bit base alone.
    adapter_enabled: bool = True
    use_dora: bool = False
    init_lora_weights: Union[bool, str] = True
    loftq_iter: int = 1
    # The name of the adapter in lora_A / lora_B (PEFT's "default"); others the layer holds wait in
    # the `lora_stored` ModuleDict (add_adapter / set_adapter), which exists only while there are some.
    active_adapter: str = "default"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 16,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype = torch.bfloat16,
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[Union[torch.device, str]] = None,
        train_bias: bool = False,
        lora_dtype: torch.dtype = torch.float32,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        loftq_iter: int = 1,
        *,
        _weight: Optional[torch.Tensor] = None,
        _bias: Optional[torch.Tensor] = None,
        _quantized: Optional[tuple[torch.Tensor, QuantState]] = None,
    ):
        super().__init__()
        for what, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            _check_positive_int(what, v)
        _check_real("lora_alpha", lora_alpha)
        _check_dropout(lora_dropout)
        check_blocksize(blocksize)
        check_quant_type(quant_type)
        for what, dt in (("compute_dtype", compute_dtype), ("lora_dtype", lora_dtype)):
            if dt not in _COMPUTE_DTYPES:
                raise TypeError(f"{what} must be float32, bfloat16 or float16, got {dt}")
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.blocksize = blocksize
        self.double_quant = bool(double_quant)
        self.quant_type = quant_type
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage
        self.train_bias = bool(train_bias)
        for what, flag in (("use_rslora", use_rslora), ("use_dora", use_dora)):
            _check_flag(what, flag)
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        if not (init_lora_weights is True or (isinstance(init_lora_weights, str)
                                              and init_lora_weights in INIT_LORA_WEIGHTS)):  # (1 == True)
            raise ValueError(f"init_lora_weights must be one of {INIT_LORA_WEIGHTS}, got {init_lora_weights!r}")
        _check_positive_int("loftq_iter", loftq_iter)
        self.init_lora_weights = init_lora_weights
        self.loftq_iter = loftq_iter
        fitted_adapter = None

        if _quantized is not None:
            if init_lora_weights in _FITTED_INITS:
                raise ValueError(f"init_lora_weights={init_lora_weights!r} splits the dense weight between the base "
                                 "and the adapter, and this layer is built from an already-quantized one "
                                 "(from_quantized, a bnb-4bit checkpoint): build it from the dense weight "
                                 "(from_linear, replace_linear, a dense checkpoint)")
            packed, state = _quantized
            self.weight_dtype = state.dtype
        else:
            if _weight is None:
                # The base an nn.Linear of this size would start from; only its quantized form is kept.
                _weight = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
                nn.init.kaiming_uniform_(_weight, a=math.sqrt(5))
            elif tuple(_weight.shape) != (out_features, in_features):
                raise ValueError(
                    f"weight has shape {tuple(_weight.shape)}, expected ({out_features}, {in_features})"
                )
            w = _weight.detach()
            if device is not None:
                w = w.to(device)
            self.weight_dtype = w.dtype  # the quant state's dtype (bitsandbytes records it too)
            packed, state, fitted_adapter = self._quantize_weight(w)
        self._set_quantized(packed, state)
        dev = packed.device

        if bias:
            if _bias is None:
                bound = 1.0 / math.sqrt(in_features)
                b = torch.empty(out_features, device=dev).uniform_(-bound, bound).to(compute_dtype)
            else:
                b = _bias.detach().to(dev).clone()
            self.bias = nn.Parameter(b, requires_grad=self.train_bias)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=dev, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=dev, dtype=lora_dtype))
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device=dev, dtype=lora_dtype))
        self._init_adapter(fitted_adapter)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Module, **kwargs) -> "QLoRALinear":
        """Quantize `linear`'s weight (on its device, from its dtype) into a new QLoRALinear.

        linear: an nn.Linear, or a transformers Conv1D (GPT-2's; weight [in, out]), whose weight is
        quantized transposed, as nn.Linear's, with fan_in_fan_out=True on the layer.
        kwargs: any constructor argument but in/out features and bias. The bias is copied as it is.
        """
        shape = dense_shape(linear)
        if shape is None:
            raise TypeError(f"from_linear takes an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        w = dense_weight(linear)
        if w is None:
            stored = shape[::-1] if is_conv1d(linear) else shape
            raise TypeError(
                f"{type(linear).__name__} does not hold a plain float weight of shape {stored} (already quantized?)"
            )
        for k in ("in_features", "out_features", "bias", "_weight", "_bias"):
            if k in kwargs:
                raise TypeError(f"from_linear takes {k} from the linear layer, not as an argument")
        layer = cls(shape[1], shape[0], bias=linear.bias is not None, _weight=w.data,
                    _bias=None if linear.bias is None else linear.bias.data, **kwargs)
        layer.fan_in_fan_out = is_conv1d(linear)
        return layer

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
                       **kwargs) -> "QLoRALinear":
        """A QLoRALinear around an already-quantized weight (e.g. from a bitsandbytes checkpoint).

        The format settings (blocksize, quant_type, double quantization, storage dtype) come from
        `state` and `packed`; kwargs: the other constructor arguments (r, lora_alpha, ...).
        """
        state.validate(packed)
        if len(state.shape) != 2:
            raise ValueError(f"a linear weight is 2-D; the quant state has shape {tuple(state.shape)}")
        for k in ("blocksize", "quant_type", "double_quant", "quant_storage", "device"):
            kwargs.pop(k, None)
        out_f, in_f = (int(s) for s in state.shape)
        return cls(in_f, out_f, bias=bias is not None, blocksize=state.blocksize, quant_type=state.quant_type,
                   double_quant=state.nested, quant_storage=packed.dtype, device=packed.device,
                   _bias=bias, _quantized=(packed, state), **kwargs)

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        self.register_buffer("packed_weight", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("nested_absmax", state.nested_absmax if state.nested else None)
        self.register_buffer("offset", state.offset.reshape(()) if state.nested else None)
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.double_quant = state.nested
        self.quant_storage = packed.dtype
        self._refresh_derived()

    def _refresh_derived(self) -> None:
        """Recompute what is derived from the quantized weight: DoRA's cached base row norms."""
        if not self.use_dora:
            return
        with torch.no_grad():
            w = dequantize_4bit(self.packed_weight, self.quant_state, torch.float32)
            # (A one-off full dequantization, when the base is set or loaded; never in forward.)
            self.register_buffer("dora_base_sq_norm", w.pow(2).sum(1), persistent=False)

    def _adapter_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B", "lora_magnitude_vector") if self.use_dora else ("lora_A", "lora_B")

    def _adapter_tensors(self) -> list[torch.Tensor]:
        """The parameters of every adapter the layer holds, the active one's first."""
        stored = self._modules.get("lora_stored")
        return [getattr(self, n) for n in self._adapter_names()] + ([] if stored is None else list(stored.parameters()))

    def _materialize_adapter(self, device: torch.device) -> None:
        """The adapters' parameters on the meta device (a layer built without memory; stored adapters
        too) made real on `device`, each a fresh adapter (reset_lora_parameters), keeping their dtypes
        and requires_grad."""
        for adapter in self.adapter_names:
            with self._adapter_swapped_in(adapter):
                for name in self._adapter_names():
                    old = getattr(self, name)
                    setattr(self, name, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device),
                                                     requires_grad=old.requires_grad))
                self.reset_lora_parameters()

    def _quantize_weight(self, w: torch.Tensor):
        """(packed, state, the adapter (A, B) "loftq" / "pissa" fit with the base, else None) of the
        dense weight w [out, in], in this layer's format: what the constructor and load_quantized (a
        dense checkpoint) store."""
        quant = dict(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                     quant_storage=self.quant_storage)
        if self.init_lora_weights in _FITTED_INITS and not w.is_meta:
            if self.init_lora_weights == "loftq":
                packed, state, a, b = loftq_decompose(w, self.r, self.scale, self.loftq_iter, **quant)
            else:
                packed, state, a, b = pissa_decompose(w, self.r, self.scale, **quant)
            return packed, state, (a, b)
        return (*quantize_4bit(w, **quant), None)

    def _init_adapter(self, fitted_adapter=None) -> None:
        """reset_lora_parameters(), then the (A, B) fitted with the base ("loftq" / "pissa") if given."""
        self.reset_lora_parameters()
        if fitted_adapter is not None:
            with torch.no_grad():
                self.lora_A.copy_(fitted_adapter[0])
                self.lora_B.copy_(fitted_adapter[1])
                if self.use_dora:  # m / n = 1 at the start, n now of W_q + s B A
                    self.lora_magnitude_vector.copy_(self.dora_weight_norm())

    def reset_lora_parameters(self) -> None:
        """B zeros and A kaiming-uniform (a=sqrt(5); init_lora_weights=True, PEFT's default) or
        normal with std 1/r ("gaussian", PEFT's): the adapter starts as the identity update (with
        DoRA, the magnitude starts at the base's row norms, so m / n = 1). A "loftq" / "pissa"
        layer's adapter is fitted with its base when the dense weight is quantized; reset gives the
        default start (B = 0) on that base."""
        with torch.no_grad():
            if self.init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
            if self.use_dora:
                self.lora_magnitude_vector.copy_(self.dora_base_sq_norm.sqrt())

    def dora_weight_norm(self) -> torch.Tensor:
        """DoRA's n = ||W + scale * B @ A|| per output row, [out] fp32, without gradient.

        n_i^2 = ||W_i||^2 + 2 s <W_i, (B A)_i> + s^2 ||(B A)_i||^2, where ||W_i||^2 is cached,
        <W_i, (B A)_i> = sum_j B_ij (W A^T)_ij needs W A^T: the base op over the r rows of A (a
        small-M product that reads the 4-bit W once, as a decode step does), and ||(B A)_i||^2 =
        B_i (A A^T) B_i^T costs r x r. PEFT instead dequantizes W on every forward.
        """
        with torch.no_grad():
            a, b = self.lora_A.detach().float(), self.lora_B.detach().float()
            w_at = self._base(self.lora_A.detach().to(self.compute_dtype), None).float().t()  # [out, r]
            cross = (b * w_at).sum(1)
            lora_sq = ((b @ (a @ a.t())) * b).sum(1)
            s = float(self.scale)
            # (clamped: rounding may take a row of W + s B A that is ~0 just below zero)
            return (self.dora_base_sq_norm + 2.0 * s * cross + s * s * lora_sq).clamp_min(0.0).sqrt()

    # --- named adapters (PEFT's add_adapter / set_adapter / delete_adapter) ---------------------

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The active adapter's name, then those of the adapters the layer holds unused."""
        return (self.active_adapter, *self._modules.get("lora_stored", {}))

    def add_adapter(self, adapter_name: str, r: Optional[int] = None, lora_alpha: Optional[float] = None,
                    lora_dropout: Optional[float] = None, use_rslora: Optional[bool] = None,
                    init_lora_weights: Union[bool, str] = True) -> None:
        """A fresh adapter (B = 0: the identity update) beside the active one, which stays active; the
        settings left None are the active adapter's. Its parameters are frozen until set_adapter
        makes it the active one. init_lora_weights: True or "gaussian" ("loftq" / "pissa" fit an
        adapter together with the base, which the layer's other adapters share)."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.adapter_names:
            raise ValueError(f"add_adapter: this layer already has an adapter named {adapter_name!r} "
                             f"(its adapters: {list(self.adapter_names)})")
        if init_lora_weights is not True and init_lora_weights != "gaussian":
            raise ValueError(f"add_adapter: init_lora_weights must be True or 'gaussian' for an added adapter, got "
                             f"{init_lora_weights!r} (LoftQ / PiSSA change the base, which every adapter shares)")
        settings = {name: getattr(self, name) if value is None else value for name, value in (
            ("r", r), ("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout), ("use_rslora", use_rslora))}
        _check_positive_int("r", settings["r"])
        _check_dropout(settings["lora_dropout"])
        _check_flag("use_rslora", settings["use_rslora"])
        slot = _StoredAdapter()
        slot.lora_alpha = settings["lora_alpha"]  # (checked by the property)
        slot.r, slot.lora_dropout = settings["r"], float(settings["lora_dropout"])
        slot.use_rslora, slot.init_lora_weights = settings["use_rslora"], init_lora_weights
        dev, dt = self.lora_A.device, self.lora_A.dtype
        shapes = {"lora_A": (slot.r, self.in_features), "lora_B": (self.out_features, slot.r),
                  "lora_magnitude_vector": (self.out_features,)}
        for name in self._adapter_names():
            slot.register_parameter(name, nn.Parameter(torch.empty(shapes[name], device=dev, dtype=dt),
                                                       requires_grad=False))
        if "lora_stored" not in self._modules:
            self.lora_stored = nn.ModuleDict()
        self.lora_stored[adapter_name] = slot
        with self._adapter_swapped_in(adapter_name):
            if not self.lora_A.is_meta:
                self.reset_lora_parameters()

    def _swap_adapter(self, adapter_name: str) -> None:
        """Make the stored adapter `adapter_name` the active one (its parameter objects, as they are:
        an optimizer holding them keeps them) and store the active one in its place."""
        stored = self._modules.get("lora_stored")
        if adapter_name == self.active_adapter:
            return
        if stored is None or adapter_name not in stored:
            raise ValueError(f"this layer has no adapter named {adapter_name!r} (its adapters: "
                             f"{list(self.adapter_names)})")
        incoming, outgoing = stored[adapter_name], _StoredAdapter()
        for name in _ADAPTER_SETTINGS:
            setattr(outgoing, name, getattr(self, name))
            setattr(self, name, getattr(incoming, name))
        for name in self._adapter_names():
            outgoing.register_parameter(name, self._parameters[name])
            self.register_parameter(name, incoming._parameters[name])
        del stored[adapter_name]
        stored[self.active_adapter] = outgoing
        self.active_adapter = adapter_name

    @contextlib.contextmanager
    def _adapter_swapped_in(self, adapter_name: str):
        """Within the block `adapter_name` is the active adapter; the previous one after it."""
        before = self.active_adapter
        self._swap_adapter(adapter_name)
        try:
            yield self
        finally:
            self._swap_adapter(before)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Compute with the adapter `adapter_name` from now on. As PEFT's set_adapter: its parameters
        become trainable (inference_mode=True: frozen) and every other adapter's frozen."""
        self._swap_adapter(adapter_name)
        for name in self._adapter_names():
            getattr(self, name).requires_grad_(not inference_mode)
        for p in self._modules.get("lora_stored", nn.ModuleDict()).parameters():
            p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the stored adapter `adapter_name` (the active one cannot go: set another first)."""
        if adapter_name == self.active_adapter:
            raise ValueError(f"delete_adapter: {adapter_name!r} is the active adapter; set_adapter another one first "
                             f"(this layer's adapters: {list(self.adapter_names)})")
        stored = self._modules.get("lora_stored")
        if stored is None or adapter_name not in stored:
            raise ValueError(f"delete_adapter: this layer has no adapter named {adapter_name!r} (its adapters: "
                             f"{list(self.adapter_names)})")
        del stored[adapter_name]
        if not len(stored):
            del self.lora_stored  # a layer with one adapter has the state dict it always had

    # --- the quantized weight ---------------------------------------------------------------

    lora_alpha = property(lambda self: self._lora_alpha, lambda self, value: _set_lora_alpha(self, value),
                          doc="LoRA's alpha: the update is scaled by lora_alpha / r (or / sqrt(r), use_rslora).")

    @property
    def scale(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (rank-stabilized LoRA, as PEFT's
        use_rslora: the update's size then does not shrink as r grows)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def quant_state(self) -> QuantState:
        """The QuantState of W, rebuilt from the buffers (shares their storage)."""
        dev = self.packed_weight.device
        nested = self.nested_absmax is not None
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            code=get_code(self.quant_type, dev),
            offset=self.offset if nested else None,
            nested_absmax=self.nested_absmax if nested else None,
            nested_code=get_code("dynamic", dev) if nested else None,
        )

    @property
    def weight(self) -> QuantizedWeight:
        """A stand-in answering shape/dtype/device/requires_grad like nn.Linear.weight; see QuantizedWeight."""
        return QuantizedWeight(self.packed_weight, self.quant_state, self.compute_dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """dequant(W) [out, in] in `dtype` (default compute dtype): a new tensor, not kept."""
        return dequantize_4bit(self.packed_weight, self.quant_state, dtype or self.compute_dtype)

    def quantized_nbytes(self) -> int:
        """Bytes of the quantized weight: packed nibbles + scales (the shared code tables excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.packed_weight, self.absmax, self.nested_absmax,
                                                          self.offset) if t is not None)

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / .half() would cast fp32 scales (lossy) or a float quant_storage (which
        # only reinterprets bytes). Let them move devices but keep their dtypes; the compute dtype
        # follows a floating cast as nn.Linear's weight would. A cast to a dtype the layer cannot
        # compute in (float64 by .double(), complex) is refused before anything changes, rather
        # than accepted and failing at the next forward.
        before = {n: self._buffers[n] for n in _QUANT_BUFFERS + _DERIVED_BUFFERS if self._buffers.get(n) is not None}
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.packed_weight.device))
        if (isinstance(probe, torch.Tensor) and (probe.is_floating_point() or probe.is_complex())
                and probe.dtype not in _COMPUTE_DTYPES):
            raise TypeError(
                f"QLoRALinear computes in float32, bfloat16 or float16 and cannot be cast to {probe.dtype} "
                f"(e.g. by .double() or .to({probe.dtype})); this layer was left in {self.compute_dtype} "
                "(modules cast before it in the same call were cast: cast them back, or convert only the "
                "modules that need it)"
            )
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
            # The dtype the replaced nn.Linear's weight would have now (what merge() and unload()
            # give back), and the quant state's dtype, follows the same casts.
            self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        return self

    # --- state dict -------------------------------------------------------------------------

    # The format settings a state dict records in its metadata (state_dict()._metadata[<module>],
    # which torch.save keeps; safetensors files do not): a state dict without them (older ones,
    # ones read back from safetensors) is checked by its tensors alone.
    _FORMAT_METADATA = ("quant_type", "blocksize", "double_quant")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {}).update(
                {k: getattr(self, k) for k in self._FORMAT_METADATA})

    def _load_problems(self, state_dict, prefix: str, metadata: Optional[dict]) -> list[str]:
        """Why `state_dict`'s entries under `prefix` cannot load into this layer ([] if they can).

        Looks only at keys, dtypes, shapes and the recorded format (no tensor values). The packed
        weight and its scales load as a whole or not at all (strict=False may leave all of them out,
        e.g. to load only an adapter); with them, dtypes must be this layer's (a copy_ would cast
        uint8 double-quantized scales into fp32 ones, or reinterpret packed bytes), and so must the
        quant type, blocksize and double quantization where the state dict records them.
        """
        problems = []
        if prefix + "weight" in state_dict:
            problems.append(
                f"{prefix}weight is a dense or bitsandbytes Linear4bit weight, which a QLoRALinear does not "
                "load (it holds packed_weight/absmax): load a Linear4bit checkpoint with "
                "qlora_kernels.load_quantized, or load dense weights into the nn.Linear model before "
                "replace_linear")
        mine = {n: self._buffers[n] for n in _QUANT_BUFFERS if self._buffers.get(n) is not None}
        present = [n for n in _QUANT_BUFFERS if prefix + n in state_dict]
        if present:
            for key in self._FORMAT_METADATA:
                theirs, ours = (metadata or {}).get(key), getattr(self, key)
                if theirs is not None and theirs != ours:
                    problems.append(f"{key} is {theirs!r} in the state dict, {ours!r} in the layer")
            extra = [n for n in present if n not in mine]
            missing = [n for n in mine if n not in present]
            if extra:
                problems.append(f"the state dict has {extra}: a double-quantized weight, but the layer has "
                                "double_quant=False")
            if missing:
                problems.append(
                    f"the state dict has {present} but not {missing}"
                    + (": a weight without double quantization, but the layer has double_quant=True"
                       if set(missing) <= set(_NESTED_BUFFERS) else
                       " (the packed weight and its scales load together)"))
        for n in present + list(self._adapter_names()) + ["bias"]:
            t, ours = state_dict.get(prefix + n), getattr(self, n)
            if t is None or ours is None:  # (extra double-quant keys are reported above)
                continue
            if not isinstance(t, torch.Tensor):
                problems.append(f"{n} is a {type(t).__name__} in the state dict, not a tensor")
            elif n in mine and t.dtype != ours.dtype:  # the format's root difference: named before shapes
                problems.append(f"{n} is {t.dtype} {tuple(t.shape)} in the state dict, {ours.dtype} "
                                f"{tuple(ours.shape)} in the layer")
            elif tuple(t.shape) != tuple(ours.shape):
                hint = (f" (r={t.shape[0 if n == 'lora_A' else 1]} vs r={self.r})"
                        if n in ("lora_A", "lora_B") and t.dim() == 2 else "")
                problems.append(f"{n} has shape {tuple(t.shape)} in the state dict, {tuple(ours.shape)} in the "
                                f"layer{hint}")
            elif n not in mine and not t.is_floating_point():
                problems.append(f"{n} is {t.dtype} in the state dict; a floating-point tensor is expected")
        stored = self._modules.get("lora_stored", {})
        for slot_name, slot in stored.items():
            for n, ours in slot._parameters.items():
                t = state_dict.get(f"{prefix}lora_stored.{slot_name}.{n}")
                if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()
                                          and tuple(t.shape) == tuple(ours.shape)):
                    problems.append(f"lora_stored.{slot_name}.{n} is {getattr(t, 'dtype', type(t).__name__)} "
                                    f"{tuple(getattr(t, 'shape', ()))} in the state dict; the layer's stored adapter "
                                    f"{slot_name!r} has a floating-point {tuple(ours.shape)}")
        unknown = sorted({k[len(prefix) + len("lora_stored."):].partition(".")[0] for k in state_dict
                          if k.startswith(f"{prefix}lora_stored.")} - set(stored))
        if unknown:
            problems.append(f"the state dict has adapter(s) {unknown} that the layer does not hold (its adapters: "
                            f"{list(self.adapter_names)}; add_adapter them first)")
        return problems

    def _describe(self) -> str:
        return (f"QLoRALinear({self.in_features}->{self.out_features}, {self.quant_type}, blocksize "
                f"{self.blocksize}, double_quant={self.double_quant}, quant_storage {self.quant_storage}, r={self.r})")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked before anything is copied (torch copies each tensor in turn, and copy_ casts
        # silently): on a mismatch none of this layer's tensors change.
        problems = self._load_problems(state_dict, prefix, local_metadata)
        if problems:
            where = f"{prefix[:-1]}: " if prefix else ""
            raise ValueError(f"load_state_dict: {where}the state dict does not fit {self._describe()}: "
                             + "; ".join(problems) + ". Nothing was loaded into this layer")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if any(prefix + n in state_dict for n in _QUANT_BUFFERS):
            self._refresh_derived()

    # --- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            # nn.Linear refuses these too; a silent cast would turn e.g. token ids into features.
            raise TypeError(f"QLoRALinear takes a floating-point input, got {getattr(x, 'dtype', type(x).__name__)}")
        cd = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(cd)
        if not self.adapter_enabled:
            y = self._base(x.to(cd), bias)
        elif self.use_dora:
            y = self._dora(x.to(cd), bias)
        else:
            y = qlora_linear(x.to(cd), self.packed_weight, self.quant_state, self.lora_A, self.lora_B, self.scale,
                             bias=bias, dropout=self.lora_dropout, training=self.training)
        dev = x.device.type
        # nn.Linear's output dtype: its input's, or autocast's inside an autocast region (HF Trainer's
        # bf16=True on a float32 model), so activations stay as small as they would have been.
        # (Asked only where the op can run: a meta model, e.g. for shape inference, has no autocast
        # and asking would raise; torch.amp.is_autocast_available would say so, but Dynamo before
        # torch 2.13 cannot trace it, and the layer must compile with fullgraph=True.)
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            return y.to(torch.get_autocast_dtype(dev))
        return y.to(x.dtype)

    def _base(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x @ dequant(W)^T (+ bias) alone, through the same op: a zero rank-1 adapter adds exact
        zeros (whatever lora_A / lora_B hold, NaN included), keeps the real adapter out of the
        autograd graph (no gradient, as in PEFT's disabled layers), and draws no dropout."""
        zeros = torch.zeros(self.in_features + self.out_features, dtype=self.lora_A.dtype,
                            device=self.packed_weight.device)
        zero_a, zero_b = zeros[:self.in_features].view(1, -1), zeros[self.in_features:].view(-1, 1)
        return qlora_linear(x, self.packed_weight, self.quant_state, zero_a, zero_b, 1.0, bias=bias,
                            dropout=0.0, training=False)

    def _dora(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        # m / n: the gradient reaches m, not n (detached, as DoRA's paper and PEFT do).
        row_scale = _magnitude_over_norm(self.lora_magnitude_vector, self.dora_weight_norm()).to(x.dtype)
        if self.lora_dropout == 0.0 or not self.training:
            y = qlora_linear(x, self.packed_weight, self.quant_state, self.lora_A, self.lora_B, self.scale)
            return row_scale * y if bias is None else torch.addcmul(bias, row_scale, y)
        # PEFT's form when the adapter's input is dropout(x): the base of x stays as it is.
        d = torch.nn.functional.dropout(x, self.lora_dropout, training=True)
        # (the adapter's matmuls in its own dtype, as PEFT runs them: fp32 adapters stay fp32)
        lora = ((d.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()).to(x.dtype)
        return self._base(x, bias) + (row_scale - 1) * self._base(d, None) + row_scale * (self.scale * lora)

    # --- merge --------------------------------------------------------------------------------

    def _merged_weight_fp32(self) -> torch.Tensor:
        with torch.no_grad():
            merged = self.dequantize(torch.float32) + self.scale * (self.lora_B.float() @ self.lora_A.float())
            if self.use_dora:  # W' = (m / ||W + s B A||) (W + s B A), row by row
                merged *= _magnitude_over_norm(self.lora_magnitude_vector.float(), merged.norm(dim=1)).unsqueeze(1)
            return merged

    def _as_linear(self, weight_fp32: torch.Tensor) -> nn.Module:
        """The kind of layer this one replaced (nn.Linear, or a Conv1D with fan_in_fan_out) holding
        `weight_fp32` [out, in] (rounded once) and this bias, in weight_dtype: the dtype of the
        layer this one replaced (following later casts of the module). Not the compute dtype: a
        QLoRALinear casts its input to that, an nn.Linear does not, so a bf16 Linear among a
        float32 model's layers would fail on their float32 activations."""
        dev, dt = self.packed_weight.device, self.weight_dtype
        if self.fan_in_fan_out:
            conv1d = conv1d_type()
            if conv1d is None:  # only a layer unpickled in a process without transformers
                raise RuntimeError("this QLoRALinear replaced a transformers Conv1D: import transformers to "
                                   "rebuild one")
            with torch.device("meta"):  # its random init, at full size, would be thrown away
                lin = conv1d(self.out_features, self.in_features)
            lin.weight = nn.Parameter(weight_fp32.detach().t().to(dev, dt, copy=True,
                                                                   memory_format=torch.contiguous_format))
            # (Conv1D's forward adds its bias unconditionally: a layer without one gets zeros.)
            bias = torch.zeros(self.out_features) if self.bias is None else self.bias.detach()
            lin.bias = nn.Parameter(bias.to(dev, dt, copy=True))
            return lin
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dev, dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(weight_fp32)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def merge(self) -> nn.Module:
        """An nn.Linear (a Conv1D with fan_in_fan_out) with W + s * B @ A (summed in fp32, rounded
        once to weight_dtype, the dtype of the layer this one replaced)."""
        return self._as_linear(self._merged_weight_fp32())

    def merge_and_requantize(self) -> "QLoRALinear":
        """A new QLoRALinear whose base is the merged weight re-quantized (W + s * B @ A; with DoRA
        its rows rescaled to the magnitudes m), with a fresh adapter and the same settings.

        The error re-quantization adds is on the result's `requantization_error`
        (RequantizationError) and logged. Raises ValueError when the merged weight has NaN/Inf
        (a diverged adapter): a 4-bit base cannot hold them.
        """
        merged = self._merged_weight_fp32()
        if values_readable(merged) and not bool(torch.isfinite(merged).all()):
            bad = [n for n in self._adapter_names() if not bool(torch.isfinite(getattr(self, n)).all())]
            raise ValueError(
                "merge_and_requantize: the merged weight W + scale * lora_B @ lora_A has NaN or Inf "
                + (f"entries ({' and '.join(bad)} {'hold' if len(bad) > 1 else 'holds'} NaN/Inf: the adapter diverged?)" if bad else
                   f"entries (an overflow: scale = {self.scale})")
                + ", which a 4-bit base cannot hold. Fix the adapter first (reset_lora_parameters(), or "
                "load a good one with load_adapter); merge() gives the merged weight unquantized, NaN included"
            )
        with torch.no_grad():
            delta = merged - self.dequantize(torch.float32)
        new = QLoRALinear(
            self.in_features, self.out_features, bias=self.bias is not None, r=self.r,
            lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, blocksize=self.blocksize,
            double_quant=self.double_quant, quant_type=self.quant_type, compute_dtype=self.compute_dtype,
            quant_storage=self.quant_storage, train_bias=self.train_bias, lora_dtype=self.lora_A.dtype,
            use_rslora=self.use_rslora, use_dora=self.use_dora, _weight=merged,
            _bias=None if self.bias is None else self.bias.data,
        )
        new.weight_dtype = self.weight_dtype
        new.fan_in_fan_out = self.fan_in_fan_out
        err = new.dequantize(torch.float32) - merged
        rms = err.pow(2).mean().sqrt().item()
        new.requantization_error = RequantizationError(
            max_abs=err.abs().max().item(), rms=rms,
            rel_rms=rms / max(merged.pow(2).mean().sqrt().item(), 1e-30),
            lora_delta_rms=delta.pow(2).mean().sqrt().item(),
        )
        logger.info("merge_and_requantize: %s", new.requantization_error)
        return new

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, {self.quant_type}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
            + (", use_rslora=True" if self.use_rslora else "")
            + (", use_dora=True" if self.use_dora else "")
            + ("" if self.init_lora_weights is True else f", init_lora_weights={self.init_lora_weights!r}")
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
            + ("" if self.adapter_enabled else ", adapter_enabled=False")
            + (f", active_adapter={self.active_adapter!r}" if "lora_stored" in self._modules else "")
        )


# --- replace_linear ---------------------------------------------------------------------------

Targets = Union[None, str, Sequence[str]]
# target_modules="all-linear": PEFT's name for every Linear but the output layer.
ALL_LINEAR = "all-linear"


def _matcher(spec: Targets, what: str):
    """Name predicate: a str is a regex that must match the whole module name; a list matches a
    name equal to an entry or ending in "." + entry (PEFT's target_modules rules)."""
    if spec is None:
        return None
    if isinstance(spec, (bytes, bytearray)) or not isinstance(spec, (str, collections.abc.Iterable)):
        raise TypeError(f"{what} must be None, a regex string or a list of module names, got "
                        f"{type(spec).__name__} {spec!r}")
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{what} regex {spec!r} does not compile: {e}") from None
        return lambda name: pattern.fullmatch(name) is not None
    entries = list(spec)
    if not all(isinstance(e, str) and e for e in entries):
        raise TypeError(f"{what} must be None, a regex string or a list of module names, got {spec!r}")
    return lambda name: any(name == e or name.endswith("." + e) for e in entries)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _module_paths(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name it is registered under (s.x = s.y = lin gives lin two), the name
    named_modules() reports first."""
    paths: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
    return paths


def _tied_linear_names(model: nn.Module) -> set[str]:
    """Linear modules whose weight another module shares (e.g. a tied lm_head). One module under two
    names (an alias) does not count: that is one layer, not two sharing a weight."""
    owners: dict[int, set[int]] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(mod))
    tied = set()
    for mname, mod in model.named_modules():
        if dense_shape(mod) is not None and isinstance(getattr(mod, "weight", None), nn.Parameter):
            if len(owners.get(id(mod.weight), ())) > 1:
                tied.add(mname)
    return tied


def _output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The model's output projection as Hugging Face models name it (get_output_embeddings(): the
    lm_head), or None for a model without one."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        out = get()
    except (NotImplementedError, AttributeError):  # a PreTrainedModel subclass that never set one
        return None
    return out if isinstance(out, nn.Module) else None


def _forward_unused(model: nn.Module) -> dict[int, str]:
    """id(linear) -> why, for Linears their owner uses without calling their forward: a QLoRALinear
    there would be read through its weight stand-in only, its adapter dead (no effect, no grads)."""
    unused = {}
    for mod in model.modules():
        if isinstance(mod, nn.MultiheadAttention) and isinstance(getattr(mod, "out_proj", None), nn.Linear):
            unused[id(mod.out_proj)] = ("nn.MultiheadAttention reads out_proj.weight/.bias directly and never calls "
                                        "its forward, so an adapter there would get no input and no gradient")
    return unused


def _accelerate_hook(mod: nn.Module):
    """The accelerate hook (device placement of a dispatched model) that wraps mod's forward, if any:
    that wrapper still runs nn.Linear.forward, so the Linear is replaceable and the hook is moved
    onto the QLoRALinear."""
    return getattr(mod, "_hf_hook", None) if "forward" in vars(mod) else None


# The hook registries of nn.Module that a replaced Linear hands to its QLoRALinear (by sharing the
# dicts, so the handles register_*_hook returned still remove them).
_CALL_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                    "_backward_hooks")


def _take_call_hooks(new: nn.Module, old: nn.Module) -> None:
    """Hooks registered on `old` (forward, pre-forward, backward) fire on `new` from now on."""
    if not any(getattr(old, d, None) for d in _CALL_HOOK_DICTS):
        return
    for d in _CALL_HOOK_DICTS:
        if hasattr(old, d):
            setattr(new, d, getattr(old, d))
    if hasattr(old, "_is_full_backward_hook"):
        new._is_full_backward_hook = old._is_full_backward_hook


def _move_hooks(new: nn.Module, old: nn.Module) -> None:
    """What was hooked on `old` fires on `new`, which takes its place: the call hooks, and an
    accelerate device hook (which wraps forward)."""
    _take_call_hooks(new, old)
    hook = _accelerate_hook(old)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module  # present: it made the hook

        add_hook_to_module(new, hook)


def _take_place(model: nn.Module, paths: dict[int, list[str]], old: nn.Module, new: nn.Module) -> None:
    """`new` replaces `old` in `model` at every name `old` is registered under (paths:
    _module_paths(model) from before any swap), with old's hooks."""
    _move_hooks(new, old)
    for path in paths[id(old)]:
        _set_submodule(model, path, new)


def _own_forward(mod: nn.Module) -> Optional[str]:
    """Why a Linear's (or Conv1D's) behaviour is more than nn.Linear.forward (Conv1D.forward),
    None when it is not."""
    hook = _accelerate_hook(mod)
    if hook is not None:
        # An offloading hook keeps the weights elsewhere under the Linear's names and brings them
        # in per call; a QLoRALinear has other tensors, so that hook cannot serve it.
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", None) or [hook]):
            return ("accelerate offloads its weights (a device_map with CPU/disk offload); replace the Linears "
                    "before dispatching the model")
        return None
    if "forward" in vars(mod):
        return "its forward was replaced on the instance; a QLoRALinear would drop that behaviour"
    base = nn.Linear if isinstance(mod, nn.Linear) else conv1d_type()
    if type(mod).forward is not base.forward:
        return (f"{type(mod).__name__} overrides {base.__name__}.forward; a QLoRALinear would drop what that "
                "forward does")
    return None


def freeze_all_but_adapters(model: nn.Module, layers: Optional[Iterable[QLoRALinear]] = None) -> None:
    """requires_grad only on QLoRALinear adapters (and their bias where train_bias). layers: only
    these layers' adapters are made trainable; every other QLoRALinear keeps its adapter's
    requires_grad as it is (a second replace_linear leaves the adapters a user froze frozen)."""
    chosen = None if layers is None else {id(m) for m in layers}
    kept = []
    for mod in model.modules():
        if isinstance(mod, QLoRALinear) and chosen is not None and id(mod) not in chosen:
            kept += [(p, p.requires_grad) for p in (*(getattr(mod, n) for n in mod._adapter_names()), mod.bias)
                     if p is not None]
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, QLoRALinear) and (chosen is None or id(mod) in chosen):
            for name in mod._adapter_names():
                getattr(mod, name).requires_grad_(True)
            if mod.bias is not None:
                mod.bias.requires_grad_(mod.train_bias)
    for p, flag in kept:
        p.requires_grad_(flag)


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    upcast: bool = True) -> nn.Module:
    """What PEFT's prepare_model_for_kbit_training does for a bitsandbytes model, for this one, in
    either order with replace_linear: every parameter outside the QLoRALinear layers frozen (their
    adapters keep their requires_grad: PEFT's version, called after replace_linear, would freeze
    them too and the model would silently train nothing); with upcast, those frozen 16-bit
    parameters (norms, embeddings, a dense lm_head) cast to float32 for stable numerics, as PEFT
    does; with use_gradient_checkpointing, Hugging Face's gradient checkpointing enabled
    (gradient_checkpointing_kwargs passed on) and, for the reentrant form, which needs a
    grad-requiring input, the input embeddings' output made to require grad. Returns the model.
    Best called after replace_linear: before it, the Linears still dense are upcast too (memory),
    and replace_linear then quantizes them from float32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_model_for_kbit_training takes an nn.Module, got {type(model).__name__}")
    kwargs = dict(gradient_checkpointing_kwargs or {})
    # transformers 5 renamed it (the old name warns, and goes in v6); older releases have only the old one.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable = functools.partial(enable, activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        enable = functools.partial(model.gradient_checkpointing_enable,
                                   gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    if use_gradient_checkpointing and not callable(enable):  # (checked before anything changes)
        raise TypeError(f"{type(model).__name__} has no activation_checkpointing_enable / gradient_checkpointing_enable "
                        "(not a Hugging Face model): pass use_gradient_checkpointing=False, or checkpoint it with "
                        "torch.utils.checkpoint")
    inside = {id(p) for m in model.modules() if isinstance(m, QLoRALinear) for p in m.parameters()}
    for p in model.parameters():
        if id(p) in inside:
            continue
        p.requires_grad_(False)
        if upcast and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(torch.float32)
    if use_gradient_checkpointing:
        enable()  # (kwargs None: Hugging Face's default)
        if kwargs.get("use_reentrant", True) and callable(getattr(model, "enable_input_require_grads", None)):
            model.enable_input_require_grads()
    return model


def guard_state_dict_loads(model: nn.Module) -> None:
    """Make model.load_state_dict check every QLoRALinear before anything is copied (_check_qlora_load),
    once per model: replace_linear and io.load_quantized call it."""
    if not any(getattr(h, "hook", None) is _check_qlora_load for h in model._load_state_dict_pre_hooks.values()):
        model._register_load_state_dict_pre_hook(_check_qlora_load, with_module=True)


def _check_qlora_load(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook replace_linear puts on the model: checks every QLoRALinear's entries
    before torch copies anything, so a state dict of another format (NF4 vs FP4, double
    quantization, r, ...) leaves the whole model as it was, not just the layer that does not fit.
    A module-level function (not a closure), so the hook survives deepcopy and pickling."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    problems = []
    for name, layer in module.named_modules(remove_duplicate=False):
        if isinstance(layer, QLoRALinear) and name:
            sub = f"{prefix}{name}."
            problems += [f"{sub[:-1]}: {p}" for p in layer._load_problems(state_dict, sub, metadata.get(sub[:-1]))]
    if problems:
        raise ValueError("load_state_dict: the state dict does not fit the model's QLoRALinear layer(s); nothing "
                         "was loaded:\n  " + "\n  ".join(problems))


@dataclass
class ReplaceReport:
    """What replace_linear did (also stored on the model as `qlora_replace_report`)."""

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    aliases: dict[str, list[str]] = field(default_factory=dict)  # replaced name -> its other names

    def __str__(self) -> str:
        lines = [f"replace_linear: {len(self.replaced)} Linear layer(s) -> QLoRALinear"]
        lines += [f"  {n}" + (f" (also registered as {', '.join(self.aliases[n])})" if n in self.aliases else "")
                  for n in self.replaced]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


def replace_linear(
    model: nn.Module,
    target_modules: Targets = None,
    exclude: Targets = None,
    verbose: bool = False,
    **layer_kwargs,
) -> nn.Module:
    """Swap matching nn.Linear modules of `model` for QLoRALinear in place; freeze everything else.

    "Linear" here includes transformers' Conv1D (GPT-2's linear layer, weight stored [in, out]), as
    PEFT and bitsandbytes treat it: its weight is quantized transposed and the QLoRALinear has
    fan_in_fan_out=True, so merge_and_unload() / unload() give Conv1D layers back.
    target_modules: None (every nn.Linear, except ones whose weight is tied to another module, such
    as a tied lm_head), "all-linear" (as PEFT's: the same, less the model's output layer, the one
    its get_output_embeddings() returns, which QLoRA leaves in 16 bits), a list of names (a module
    matches when its full name equals an entry or ends with "." + entry, as in PEFT), or a regex
    matched against the full name. exclude: None, a list of names or a regex.
    layer_kwargs go to QLoRALinear.from_linear (r, lora_alpha, compute_dtype, ...).

    Every parameter of the model is frozen except the new layers' lora_A/lora_B (and their bias
    with train_bias=True); QLoRALinear layers from an earlier call keep their adapters'
    requires_grad as they are. What was replaced: the returned model's `qlora_replaced` (list of
    names) and `qlora_replace_report`, logged at INFO (printed with verbose=True).

    Never replaced, with the reason in the report's `skipped` (and a warning when targeted by
    name): an nn.MultiheadAttention's out_proj (the attention reads its weight directly, so an
    adapter there would be dead) and nn.Linear subclasses with their own forward (its behaviour
    would be lost). A Linear registered under several names (s.x = s.y = lin) is one layer: it
    becomes one QLoRALinear at every one of its names (the original sharing kept), matched when any
    of its names matches, left alone when any is excluded; the report lists it under its first
    name, the others in `aliases`.
    Raises ValueError when nothing matches, or when a targeted module is not an nn.Linear; the model
    is untouched then. A model given replace_linear also checks, on load_state_dict, every
    QLoRALinear's entries against the layer's format before anything loads (see
    QLoRALinear._load_problems): a mismatch raises ValueError with the model unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_linear takes an nn.Module as `model`, got {type(model).__name__}")
    all_linear = isinstance(target_modules, str) and target_modules == ALL_LINEAR
    want = None if all_linear else _matcher(target_modules, "target_modules")
    skip = _matcher(exclude, "exclude")
    tied = _tied_linear_names(model) if want is None else set()
    output_layer = _output_layer(model) if all_linear else None
    unused = _forward_unused(model)
    paths = _module_paths(model)
    report = ReplaceReport()
    chosen: list[tuple[str, nn.Linear]] = []
    not_linear: list[str] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        names = paths[id(mod)]
        if want is not None and not any(want(n) for n in names):
            continue
        excluded = [n for n in names if skip is not None and skip(n)]
        if excluded:
            if len(excluded) < len(names) and dense_shape(mod) is not None:  # matched under another name: say why
                report.skipped[name] = (f"excluded as {', '.join(excluded)}; it is one module registered as "
                                        f"{names}, left alone under every name")
            continue
        if isinstance(mod, QLoRALinear):
            report.skipped[name] = "already a QLoRALinear"
            continue
        if dense_weight(mod) is None:
            if want is not None:  # named explicitly: say so rather than ignore it
                not_linear.append(f"{name} ({type(mod).__name__})")
            continue
        why = unused.get(id(mod)) or _own_forward(mod)
        if why is not None:
            report.skipped[name] = why
            if want is not None:
                logger.warning("replace_linear: not replacing %s, which target_modules matched: %s", name, why)
            continue
        if name in tied:
            report.skipped[name] = "weight tied to another module"
            continue
        if mod is output_layer:
            report.skipped[name] = "the model's output layer (get_output_embeddings()), which all-linear leaves out"
            continue
        chosen.append((name, mod))
    if not_linear:
        raise ValueError(
            f"target_modules={target_modules!r} matched module(s) that are not nn.Linear: {not_linear}; "
            "only nn.Linear layers (and transformers' Conv1D) with a float weight can be replaced (narrow the "
            "names or the regex)"
        )
    if not chosen:
        linears = [n for n, m in model.named_modules() if dense_shape(m) is not None]
        raise ValueError(
            f"replace_linear: target_modules={target_modules!r} (exclude={exclude!r}) matched no nn.Linear "
            f"to replace; the model's Linear layers are: {linears[:20]}{' ...' if len(linears) > 20 else ''}"
            + (f"; skipped: {report.skipped}" if report.skipped else "")
        )
    # Build every new layer before swapping any, so a failure (bad kwargs) leaves the model as it was.
    new_layers = [(name, QLoRALinear.from_linear(mod, **layer_kwargs)) for name, mod in chosen]
    for (name, layer), (_, old) in zip(new_layers, chosen):
        _take_place(model, paths, old, layer)
        report.replaced.append(name)
        if len(paths[id(old)]) > 1:
            report.aliases[name] = paths[id(old)][1:]
    freeze_all_but_adapters(model, [layer for _, layer in new_layers])
    guard_state_dict_loads(model)
    previous = list(getattr(model, "qlora_replaced", []))
    model.qlora_replaced = previous + report.replaced
    model.qlora_replace_report = report
    logger.info("%s", report)
    if verbose:
        print(report)
    return model


# --- merge_and_unload / unload ------------------------------------------------------------------


def _swap_qlora_layers(model: nn.Module, build, what: str) -> nn.Module:
    """Replace every QLoRALinear of `model` by build(layer), all built before any is swapped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    if not layers:
        raise ValueError(f"{what}: the model has no QLoRALinear layer (was replace_linear run on it?)")
    if any(n == "" for n, _ in layers):
        raise ValueError(f"{what} takes a model that contains QLoRALinear layers, not a QLoRALinear itself: "
                         "use its merge() / merge_and_requantize()")
    # Built first, swapped after: an error (e.g. out of memory) leaves the model as it was.
    new_layers = [(name, build(layer).train(layer.training)) for name, layer in layers]
    paths = _module_paths(model)
    for (_, layer), (_, old) in zip(new_layers, layers):
        _take_place(model, paths, old, layer)
    if not any(isinstance(m, QLoRALinear) for m in model.modules()):
        model.qlora_replaced = []
    logger.info("%s: %d layer(s)", what, len(new_layers))
    return model


def _frozen(layer: nn.Module) -> nn.Module:
    # The base weights were frozen under QLoRA; a merged/unloaded layer stays frozen, like PEFT's.
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def merge_and_unload(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold each QLoRALinear's adapter into its base weight, in place, as PEFT's merge_and_unload.

    requantize=False: each becomes an nn.Linear with W + s * B @ A (summed in fp32, rounded once to
    the dtype of the Linear it replaced, so the model runs as it did before replace_linear): a plain
    model to save or serve.
    requantize=True: each becomes a QLoRALinear whose NF4 base is that merged weight re-quantized,
    with a fresh adapter (B = 0, trainable) and its `requantization_error`: the model stays
    4-bit, e.g. to train a next adapter on top.
    Merged nn.Linear weights come back frozen (requires_grad False), as the base was.
    Raises TypeError for a non-module and ValueError when the model has no QLoRALinear.
    """
    if requantize:
        return _swap_qlora_layers(model, QLoRALinear.merge_and_requantize, "merge_and_unload(requantize=True)")
    return _swap_qlora_layers(model, lambda layer: _frozen(layer.merge()), "merge_and_unload")


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter, in place: each QLoRALinear becomes an nn.Linear holding its dequantized
    base weight (in the dtype of the Linear it replaced) and bias, frozen; the LoRA weights are discarded (save_adapter
    first to keep them). As PEFT's unload."""

    return _swap_qlora_layers(model, lambda layer: _frozen(layer._as_linear(layer.dequantize(torch.float32))),
                              "unload")


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block, every QLoRALinear of `model` computes its frozen 4-bit base alone (+ bias):
    the adapters neither act nor get gradients. As PEFT's `with peft_model.disable_adapter():`,
    e.g. for DPO's reference-model logits without a second copy of the model. On exit (an
    exception included) each layer's adapter is as enabled as it was before the block.
    Raises TypeError for a non-module, ValueError when the model has no QLoRALinear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"disable_adapter takes an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    if not layers:
        raise ValueError("disable_adapter: the model has no QLoRALinear layer (was replace_linear run on it?)")
    before = [(layer, layer.adapter_enabled) for layer in layers]
    try:
        for layer in layers:
            layer.adapter_enabled = False
        yield model
    finally:
        for layer, enabled in before:
            layer.adapter_enabled = enabled


def _adapter_layers(model: nn.Module, what: str) -> list[QLoRALinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module, got {type(model).__name__}")
    layers = list({id(m): m for m in model.modules() if isinstance(m, QLoRALinear)}.values())
    if not layers:
        raise ValueError(f"{what}: the model has no QLoRALinear layer (was replace_linear run on it?)")
    return layers


def _layers_holding(model: nn.Module, adapter_name: str, what: str) -> list[QLoRALinear]:
    """Every QLoRALinear of `model`, checked to hold an adapter `adapter_name` (all of them, or the
    call is refused before any layer changes)."""
    layers = _adapter_layers(model, what)
    lacking = [layer for layer in layers if adapter_name not in layer.adapter_names]
    if lacking:
        paths = _module_paths(model)
        raise ValueError(f"{what}: {len(lacking)} QLoRALinear layer(s) hold no adapter named {adapter_name!r}, e.g. "
                         f"{paths[id(lacking[0])][0]} (adapters: {list(lacking[0].adapter_names)})")
    return layers


def add_adapter(model: nn.Module, adapter_name: str, r: Optional[int] = None, lora_alpha: Optional[float] = None,
                lora_dropout: Optional[float] = None, use_rslora: Optional[bool] = None,
                init_lora_weights: Union[bool, str] = True) -> nn.Module:
    """A fresh adapter named `adapter_name` in every QLoRALinear of `model`, beside the active one
    (which stays active: set_adapter switches). As PEFT's add_adapter: e.g. a second task's adapter
    on the same 4-bit base. Settings left None are each layer's active adapter's; the new one
    starts as the identity update (B = 0) and frozen. The adapters share the layer's base, bias and
    use_dora. Refused, with no layer changed, when a layer already has that name. merge_and_unload
    (and a layer's merge / merge_and_requantize) folds in the active adapter; the stored ones go
    with the old layers, as PEFT's merge_and_unload drops every adapter."""
    layers = _adapter_layers(model, "add_adapter")
    taken = [layer for layer in layers if adapter_name in layer.adapter_names]
    if taken:
        raise ValueError(f"add_adapter: the model already has an adapter named {adapter_name!r} (adapters: "
                         f"{list(taken[0].adapter_names)})")
    added = []
    try:
        for layer in layers:
            layer.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              use_rslora=use_rslora, init_lora_weights=init_lora_weights)
            added.append(layer)
    except (TypeError, ValueError):
        for layer in added:
            layer.delete_adapter(adapter_name)
        raise
    return model


def set_adapter(model: nn.Module, adapter_name: str, inference_mode: bool = False) -> nn.Module:
    """Every QLoRALinear of `model` computes with its adapter `adapter_name` from now on; as PEFT's
    set_adapter, that adapter becomes trainable (inference_mode=True: frozen) and the others
    frozen. The parameters stay the same objects, so an optimizer built over several adapters
    keeps updating each. Refused, with no layer changed, when a layer lacks that adapter."""
    for layer in _layers_holding(model, adapter_name, "set_adapter"):
        layer.set_adapter(adapter_name, inference_mode=inference_mode)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Drop the adapter `adapter_name` from every QLoRALinear of `model` (not the active one:
    set_adapter another first). As PEFT's delete_adapter."""
    layers = _layers_holding(model, adapter_name, "delete_adapter")
    active = [layer for layer in layers if layer.active_adapter == adapter_name]
    if active:
        raise ValueError(f"delete_adapter: {adapter_name!r} is the active adapter; set_adapter another one first")
    for layer in layers:
        layer.delete_adapter(adapter_name)
    return model


@contextlib.contextmanager
def adapter_active(model: nn.Module, adapter_name: str):
    """Within the block every QLoRALinear of `model` computes with `adapter_name`; on exit (an
    exception included) each layer's previous adapter is active again. requires_grad is left as
    it is (set_adapter's switch marks trainable): e.g. DPO's reference adapter, or saving one
    adapter of several."""
    layers = _layers_holding(model, adapter_name, "adapter_active")
    before = [(layer, layer.active_adapter) for layer in layers]
    try:
        for layer in layers:
            layer._swap_adapter(adapter_name)
        yield model
    finally:
        for layer, name in before:
            layer._swap_adapter(name)


# --- from_peft: a PEFT LoRA model (bitsandbytes 4-bit or dense base) taken over in memory -------------


def _is_bnb_4bit(base: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (its weight a Params4bit carrying the quant state)."""
    return getattr(getattr(base, "weight", None), "quant_state", None) is not None


def _peft_adapter_settings(layer, adapter: str) -> dict:
    """r, lora_alpha, lora_dropout and use_rslora of PEFT's LoRA layer `layer` for `adapter`."""
    return dict(r=int(layer.r[adapter]), lora_alpha=layer.lora_alpha[adapter],
                lora_dropout=float(getattr(layer.lora_dropout[adapter], "p", 0.0)),
                use_rslora=bool(layer.use_rslora.get(adapter, False)))


def _peft_lora_layer(layer, adapters: Sequence[str], compute_dtype: Optional[torch.dtype]) -> "QLoRALinear":
    """The QLoRALinear doing what PEFT's LoRA layer `layer` does on its base with each of `adapters`
    (the first active, the others stored under their names)."""
    base = layer.get_base_layer()
    adapter = adapters[0]
    settings = dict(_peft_adapter_settings(layer, adapter), use_dora=adapter in layer.lora_magnitude_vector,
                    lora_dtype=layer.lora_A[adapter].weight.dtype)
    if _is_bnb_4bit(base):
        # Its own state dict: the checkpoint layout, undoing any CPU-only repacking of the bytes.
        sd = base.state_dict()
        state = QuantState.from_dict({k: v for k, v in sd.items() if k.startswith("weight.")},
                                     device=sd["weight"].device)
        cd = compute_dtype or getattr(base, "compute_dtype", None)
        new = QLoRALinear.from_quantized(sd["weight"], state, sd.get("bias"),
                                         compute_dtype=cd if cd in _COMPUTE_DTYPES else torch.float32, **settings)
    else:  # a dense base: quantized now (QLoRA's NF4, blocksize 64, double quantization)
        dt = base.weight.dtype
        new = QLoRALinear.from_linear(base, compute_dtype=compute_dtype or (dt if dt in _COMPUTE_DTYPES
                                                                            else torch.float32), **settings)
    new.fan_in_fan_out = is_conv1d(base)
    new.active_adapter = adapter
    for other in adapters[1:]:
        new.add_adapter(other, **_peft_adapter_settings(layer, other))
    for name_ in adapters:
        with new._adapter_swapped_in(name_), torch.no_grad():
            for name in new._adapter_names():  # PEFT keeps each as module_dict[adapter].weight, same name
                theirs = getattr(layer, name)[name_].weight
                getattr(new, name).copy_(theirs).requires_grad_(theirs.requires_grad)
    return new.train(layer.training)


def from_peft(peft_model: nn.Module, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model inside a PEFT LoRA model (peft.get_peft_model / PeftModel.from_pretrained), with
    each of PEFT's LoRA layers replaced by a QLoRALinear that computes the same: an existing QLoRA
    script switches to these kernels with one line, model = qk.from_peft(model).

    A layer over a bitsandbytes Linear4bit keeps its 4-bit bytes (and its compute dtype); one over a
    dense nn.Linear (or GPT-2 Conv1D) is quantized now (NF4, blocksize 64, double quantization). The
    adapter (A, B; DoRA's magnitude), r, lora_alpha, dropout, rsLoRA and requires_grad come from
    PEFT's; modules_to_save wrappers give way to their trained copy. compute_dtype: for every layer
    (default: the Linear4bit's, float32 where it has none (BitsAndBytesConfig's default); for a
    dense base, its weight dtype, so the model computes what PEFT's did).

    Several adapters (PEFT's add_adapter / load_adapter(adapter_name)) come over by name: PEFT's active
    one is each layer's active adapter, the others are stored beside it (set_adapter switches).

    The PEFT model is consumed (its layers' tensors are shared, not copied). Raises TypeError for a
    non-PEFT model and ValueError, with the model unchanged, for what has no QLoRALinear form: several
    adapters active at once, adapters that target different layers or mix DoRA and LoRA in one layer,
    modules_to_save copies of an inactive adapter, a merged adapter, lora_bias, LoRA on a layer that is
    not a Linear / Conv1D or over an 8-bit base, another PEFT method.
    """
    try:
        import peft
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        raise TypeError(f"from_peft takes a PEFT model, and peft is not installed "
                        f"(got {type(peft_model).__name__})") from None
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"from_peft takes a peft.PeftModel, got {type(peft_model).__name__}")
    configs = peft_model.peft_config
    active = list(peft_model.active_adapters)
    if len(active) != 1:
        raise ValueError(f"from_peft: the PEFT model computes with {len(active)} adapters at once ({active}); a "
                         "QLoRALinear computes with one: set_adapter one of them first")
    adapter = active[0]
    adapters = [adapter, *sorted(a for a in configs if a != adapter)]
    for name, config in configs.items():
        if str(getattr(config, "peft_type", "")) not in ("LORA", "PeftType.LORA"):
            raise ValueError(f"from_peft takes LoRA adapters, adapter {name!r} is {config.peft_type}")
    if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    model = peft_model.get_base_model()
    problems, layers = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        base = mod.get_base_layer()
        present = sorted(a for a in adapters if a in mod.lora_A)
        if mod.merged:
            problems.append(f"{name}: its adapter is merged into the base (unmerge_adapter() first)")
        elif any(mod.lora_bias.get(a, False) for a in adapters):
            problems.append(f"{name}: lora_bias=True (a bias on lora_B) has no QLoRALinear form")
        elif adapter not in mod.lora_A or not (_is_bnb_4bit(base) or dense_weight(base) is not None):
            problems.append(f"{name}: LoRA on a {type(base).__name__}, which is not a Linear / Conv1D with a float "
                            "or bitsandbytes 4-bit weight")
        elif present != sorted(adapters):
            # (a QLoRALinear holds the same adapters in every layer, as add_adapter gives them)
            problems.append(f"{name}: has adapters {present} of the model's "
                            f"{sorted(adapters)}; the adapters must target the same layers")
        elif len({a in mod.lora_magnitude_vector for a in adapters}) > 1:
            problems.append(f"{name}: some of its adapters are DoRA and some not; a QLoRALinear's adapters share use_dora")
        else:
            layers.append((name, mod))
    for name, wrapper in model.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and set(wrapper.modules_to_save) - {adapter}:
            problems.append(f"{name}: modules_to_save copies for adapters {sorted(set(wrapper.modules_to_save) - {adapter})} "
                            "besides the active one; the model keeps one copy of a module (delete those adapters first)")
    if problems:
        raise ValueError("from_peft: the PEFT model has layers with no QLoRALinear form, nothing was changed:\n  "
                         + "\n  ".join(problems))
    if not layers:
        raise ValueError("from_peft: the PEFT model has no LoRA layer")
    new_layers = [(name, _peft_lora_layer(mod, adapters, compute_dtype)) for name, mod in layers]
    paths = _module_paths(model)
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for (_, layer), (_, old) in zip(new_layers, layers):
        _take_place(model, paths, old, layer)
    for name, wrapper in wrappers:  # the trained copy takes the wrapper's place
        trained = wrapper.modules_to_save[adapter] if adapter in wrapper.modules_to_save else wrapper.original_module
        for path in paths[id(wrapper)]:
            _set_submodule(model, path, trained)
    guard_state_dict_loads(model)
    model.qlora_replaced = [name for name, _ in new_layers]
    logger.info("from_peft: %d LoRA layer(s) now QLoRALinear", len(new_layers))
    return model


# --- memory_report ----------------------------------------------------------------------------


def _nbytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class MemoryRow:
    name: str
    kind: str
    params: int  # weights the module represents (for a QLoRALinear: out*in of the base)
    bytes: int  # base storage (quantized weight + scales, or the dense tensors)
    lora_bytes: int = 0
    bias_bytes: int = 0

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes / self.params if self.params else float("nan")


@dataclass
class MemoryReport:
    rows: list[MemoryRow]
    # PEFT's print_trainable_parameters() numbers: each distinct parameter once (a tied weight
    # once), a QLoRALinear's 4-bit base counted as the out * in weights it stands for.
    trainable_params: int = 0
    all_params: int = 0

    def trainable_line(self) -> str:
        share = 100.0 * self.trainable_params / self.all_params if self.all_params else 0.0
        return (f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} || "
                f"trainable%: {share:.4f}")

    @property
    def quantized(self) -> list[MemoryRow]:
        return [r for r in self.rows if r.kind == "QLoRALinear"]

    def total(self, quantized_only: bool = False) -> MemoryRow:
        rows = self.quantized if quantized_only else self.rows
        return MemoryRow("total (QLoRALinear bases)" if quantized_only else "total", "",
                         sum(r.params for r in rows), sum(r.bytes for r in rows),
                         sum(r.lora_bytes for r in rows), sum(r.bias_bytes for r in rows))

    def __str__(self) -> str:
        head = f"{'module':48s} {'kind':14s} {'params':>11s} {'bytes':>11s} {'bits/param':>10s} {'lora+bias':>10s}"
        lines = [head, "-" * len(head)]

        def fmt(r: MemoryRow) -> str:
            name = r.name if len(r.name) <= 48 else "..." + r.name[-45:]
            return (f"{name:48s} {r.kind:14s} {r.params:11d} {r.bytes:11d} {r.bits_per_param:10.3f} "
                    f"{r.lora_bytes + r.bias_bytes:10d}")

        lines += [fmt(r) for r in self.rows]
        lines.append("-" * len(head))
        if self.quantized:
            lines.append(fmt(self.total(quantized_only=True)))
        lines.append(fmt(self.total()))
        lines.append("(bytes: base weights; for a QLoRALinear packed 4-bit + absmax + nested scales, its LoRA "
                     "and bias in 'lora+bias'; the code tables, constants shared by all layers, excluded)")
        lines.append(self.trainable_line())
        return "\n".join(lines)


def memory_report(model: nn.Module) -> MemoryReport:
    """Per-module storage of `model`: each QLoRALinear (quantized base, bits/param, LoRA bytes) and
    each other module that owns parameters/buffers directly (dense bytes), and the trainable /
    all parameter counts PEFT's print_trainable_parameters() gives (trainable_line()). Print it
    for a table."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"memory_report takes an nn.Module as `model`, got {type(model).__name__}")
    rows: list[MemoryRow] = []
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QLoRALinear):
            rows.append(MemoryRow(name or "(root)", "QLoRALinear", mod.in_features * mod.out_features, mod.quantized_nbytes(),
                                  lora_bytes=_nbytes(mod._adapter_tensors()), bias_bytes=_nbytes([mod.bias])))
            seen.update(id(t) for t in (*mod._adapter_tensors(), mod.bias) if t is not None)
            continue
        tensors = [t for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
                   if id(t) not in seen]
        if not tensors:
            continue
        seen.update(id(t) for t in tensors)
        n = sum(t.numel() for t in tensors)
        rows.append(MemoryRow(name or "(root)", type(mod).__name__, n, _nbytes(tensors)))
    params = list(model.parameters())  # (distinct: a tied weight once)
    bases = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QLoRALinear))
    return MemoryReport(rows, trainable_params=sum(p.numel() for p in params if p.requires_grad),
                        all_params=sum(p.numel() for p in params) + bases)


__all__ = ["QLoRALinear", "adapter_active", "add_adapter", "delete_adapter", "disable_adapter", "set_adapter", "freeze_all_but_adapters", "from_peft", "prepare_model_for_kbit_training", "QuantizedWeight", "MemoryReport", "ReplaceReport", "RequantizationError",
           "memory_report", "replace_linear"]
