"""QLoRA linear (issue 3): Y = X @ dequant(W)^T + s * (X A^T) B^T + bias and its gradients.

Triton kernels run under TRITON_INTERPRET=1 here (conftest.py); on a GPU the same tests run them
compiled. Every backend is held to DESIGN.md section 6's rule against a float64 computation of
reference.py's spec: max error <= 2x the max error of the same computation done by PyTorch in the
low precision (dequantize W to the activation dtype, then PyTorch matmuls, LoRA in the LoRA
weights' dtype, as bitsandbytes + PEFT do), plus a tiny atol (ATOL_REL of the output's magnitude).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import reference as ref
from qlora_kernels.backends import use_backend
from qlora_kernels.backends.triton import qlora_linear as tql
from qlora_kernels.backends.triton import qlora_linear_small_m as tql_small

from conftest import HAS_CUDA
from helpers import check_counters, guarded_counters, spy_small_m_launches, train_causal_lm

DEVICE = "cuda" if HAS_CUDA else "cpu"
# fp32 ulp-level slack: the float64 truth is rounded to fp32 and two fp32 summation orders may
# differ by a few ulps of the output's magnitude where PyTorch happens to be closer.
ATOL_REL = 2.0**-20


@dataclass
class Case:
    lead: tuple  # leading dims of x
    N: int
    K: int
    r: int
    blocksize: int = 64
    xdt: torch.dtype = torch.bfloat16
    ldt: torch.dtype = torch.bfloat16
    bias: bool = True
    nested: bool = True
    quant_type: str = "nf4"
    sliced: bool = False  # x a strided view (every other column of a wider tensor)

    def __str__(self) -> str:
        dt = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
        return (f"x{'x'.join(map(str, self.lead))}-N{self.N}-K{self.K}-r{self.r}-bs{self.blocksize}-"
                f"{dt[self.xdt]}-lora{dt[self.ldt]}-{'bias' if self.bias else 'nobias'}-"
                f"{'dq' if self.nested else 'nodq'}-{self.quant_type}{'-sliced' if self.sliced else ''}")


CASES = [
    Case((1,), 200, 320, 16),                                            # M=1: small-M kernel
    Case((37,), 200, 320, 1, xdt=torch.float32, ldt=torch.float32, bias=False),  # r=1
    Case((129,), 192, 320, 64),                                          # M=129, r=64
    Case((2, 19), 200, 320, 8, ldt=torch.float32),                       # 3-D x, fp32 LoRA on bf16
    Case((37,), 200, 320, 16, blocksize=128, xdt=torch.float32, ldt=torch.float32),  # blocks cross rows
    Case((16,), 96, 200, 8, nested=False),                               # small-M, K % bs != 0, no DQ
    Case((7,), 64, 321, 4, xdt=torch.float32, ldt=torch.float32),        # odd K: rows start mid-byte
    Case((9,), 80, 200, 4, blocksize=32, xdt=torch.float32, ldt=torch.float32),  # per-element scales
    Case((65,), 130, 256, 32, blocksize=256, quant_type="fp4", bias=False),  # BK < blocksize, FP4
    Case((40,), 100, 128, 16, blocksize=32),                             # several blocks per tile row
    Case((37,), 72, 192, 128, xdt=torch.float16, ldt=torch.float16),     # fp16, r=128
    Case((24,), 200, 320, 16, sliced=True),                              # strided x
]


@dataclass
class Inputs:
    x: torch.Tensor
    packed: torch.Tensor
    state: qk.QuantState
    A: torch.Tensor
    B: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float
    grad_y: torch.Tensor


def make_inputs(case: Case, device: str = DEVICE) -> Inputs:
    w = torch.randn(case.N, case.K, device=device) * 0.05
    with use_backend("reference"):
        packed, state = qk.quantize_4bit(w, quant_type=case.quant_type, blocksize=case.blocksize,
                                         double_quant=case.nested)
    if case.sliced:
        x = torch.randn(*case.lead, 2 * case.K, device=device).to(case.xdt)[..., ::2]
    else:
        x = torch.randn(*case.lead, case.K, device=device).to(case.xdt)
    # LoRA-like magnitudes: A ~ 1/sqrt(K); B nonzero (trained), so both LoRA terms matter.
    A = (torch.randn(case.r, case.K, device=device) / math.sqrt(case.K)).to(case.ldt)
    B = (torch.randn(case.N, case.r, device=device) * 0.1).to(case.ldt)
    bias = (torch.randn(case.N, device=device) * 0.1).to(case.xdt) if case.bias else None
    if case.sliced:  # strided LoRA factors and bias too (views of wider tensors)
        A, B = A.t().contiguous().t(), B.t().contiguous().t()  # column-major
        bias = torch.stack([bias, bias], dim=1)[:, 0] if bias is not None else None
    grad_y = torch.randn(*case.lead, case.N, device=device).to(case.xdt)
    return Inputs(x, packed, state, A, B, bias, 2.0 / math.sqrt(case.r), grad_y)


def dequantized(inp: Inputs) -> torch.Tensor:
    s = inp.state
    return ref.dequantize_weight(inp.packed.reshape(-1), s.absmax, s.nested_absmax, s.nested_code, s.offset,
                                 s.blocksize, s.quant_type, s.shape)


def truth(inp: Inputs) -> list[torch.Tensor]:
    """[Y, dX, dA, dB, dbias] in float64, from reference.py's spec."""
    k = inp.x.shape[-1]
    x2 = inp.x.reshape(-1, k)
    gy = inp.grad_y.reshape(-1, inp.grad_y.shape[-1])
    w = dequantized(inp)
    y, t = ref.qlora_linear_forward(x2, w, inp.A, inp.B, inp.scale, inp.bias, compute_dtype=torch.float64)
    dx, da, db, dbias = ref.qlora_linear_backward(gy, x2, t, w, inp.A, inp.B, inp.scale, compute_dtype=torch.float64)
    return [y.reshape(*inp.x.shape[:-1], -1), dx.reshape(inp.x.shape), da, db, dbias if inp.bias is not None else None]


def torch_low_precision(inp: Inputs) -> list[torch.Tensor]:
    """The same computation as PyTorch users run it: W dequantized to the activation dtype, LoRA in
    the LoRA weights' dtype, autograd for the gradients."""
    xdt, ldt = inp.x.dtype, inp.A.dtype
    w = dequantized(inp).to(xdt)
    x = inp.x.detach().clone().requires_grad_()
    A = inp.A.detach().clone().requires_grad_()
    B = inp.B.detach().clone().requires_grad_()
    bias = inp.bias.detach().clone().requires_grad_() if inp.bias is not None else None
    y = x @ w.t() + ((x.to(ldt) @ A.t()) @ B.t() * inp.scale).to(xdt)
    if bias is not None:
        y = y + bias
    y.backward(inp.grad_y)
    return [y.detach(), x.grad, A.grad, B.grad, bias.grad if bias is not None else None]


def run_qlora_linear(inp: Inputs, backend: str, dropout: float = 0.0) -> list[torch.Tensor]:
    x = inp.x.detach().clone().requires_grad_()
    A = inp.A.detach().clone().requires_grad_()
    B = inp.B.detach().clone().requires_grad_()
    bias = inp.bias.detach().clone().requires_grad_() if inp.bias is not None else None
    with use_backend(backend):
        y = qk.qlora_linear(x, inp.packed, inp.state, A, B, inp.scale, bias, dropout=dropout)
        y.backward(inp.grad_y)
    return [y.detach(), x.grad, A.grad, B.grad, bias.grad if bias is not None else None]


NAMES = ["Y", "dX", "dA", "dB", "dbias"]


def assert_within_rule(got: list, low: list, exact: list, what: str) -> None:
    for name, g, lo, ex in zip(NAMES, got, low, exact):
        if ex is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        assert g.dtype == lo.dtype and g.shape == lo.shape, f"{what}: {name} {g.dtype}{tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"{what}: {name} has non-finite values"
        err = (g.double() - ex).abs().max().item()
        err_torch = (lo.double() - ex).abs().max().item()
        atol = ATOL_REL * ex.abs().max().item()
        assert err <= 2 * err_torch + atol, (
            f"{what}: {name} max error {err:.3e} > 2 x PyTorch's {err_torch:.3e} + {atol:.1e}"
        )


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Triton launchers allocate outputs NaN-filled: an element a kernel forgot shows up."""
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tql, "empty", empty)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_float64_by_the_rule(case, poisoned_outputs):
    inp = make_inputs(case)
    assert_within_rule(run_qlora_linear(inp, "triton"), torch_low_precision(inp), truth(inp), f"triton {case}")


@pytest.mark.parametrize("case", [Case((37,), 200, 320, 16, xdt=torch.float32, ldt=torch.float32),
                                  Case((3,), 200, 320, 16, xdt=torch.float32, ldt=torch.float32)], ids=str)
def test_triton_3_2_fp32_layout_matches_the_rule(case, poisoned_outputs, monkeypatch):
    """Under Triton 3.2 fp32 activations read even-K weights nibble by nibble (PAIRED False, see
    qlora_linear.PAIRED_FP32_OK): that path, with whole blocks per row (ALIGNED), in the GEMM and
    the small-M kernel, forward and backward."""
    monkeypatch.setattr(tql, "PAIRED_FP32_OK", False)
    assert tql.weight_layout((200, 320), 64, 64, torch.float32)["PAIRED"] is False
    assert tql.weight_layout((200, 320), 64, 64, torch.bfloat16)["PAIRED"] is True
    inp = make_inputs(case)
    assert_within_rule(run_qlora_linear(inp, "triton"), torch_low_precision(inp), truth(inp), f"triton {case}")


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_reference_matches_float64_by_the_rule(case):
    inp = make_inputs(case)
    assert_within_rule(run_qlora_linear(inp, "reference"), torch_low_precision(inp), truth(inp), f"reference {case}")


def _small_m(inp, monkeypatch, **kw):
    """small_m_fwd on a 2-D case, with the counters it is given guarded and kept (helpers.guarded_counters)."""
    s = inp.state
    args = tql.weight_args(inp.packed, s.absmax, s.nested_absmax, s.nested_code, s.offset, s.quant_type)
    given = guarded_counters(monkeypatch, tql_small)
    x_lora = kw.pop("x_lora", None)
    lora_A = kw.pop("lora_A", inp.A)
    y, t = tql_small.small_m_fwd(inp.x, x_lora, lora_A, args, s.blocksize, list(s.shape), inp.B, inp.scale,
                                 inp.bias, **kw)
    return y, t, given


@pytest.mark.parametrize("split_k,t_chunk_cols", [(1, 64), (2, None), (3, 64), (3, 128)])
def test_small_m_one_launch(split_k, t_chunk_cols, poisoned_outputs, monkeypatch):
    """The one-launch decode kernel: T items (K chunks of X A^T, the last one summing them) and
    GEMV items (split-K partials summed by each tile's last split) in the GPU's tile config, with
    a K tail in a split and in a T chunk. Y meets the rule, T equals X A^T to fp32 accuracy, and
    every counter is back to zero after the launch (the next launch on the stream reuses them)."""
    case = Case((5,), 130, 448, 16, ldt=torch.float32)
    inp = make_inputs(case)
    y, t, given = _small_m(inp, monkeypatch, split_k=split_k, cfg=tql_small.GPU_CONFIG, t_chunk_cols=t_chunk_cols)
    assert_within_rule([y], [torch_low_precision(inp)[0]], [truth(inp)[0]], f"small-M split_k={split_k}")
    want_t = inp.x.double() @ inp.A.double().t()
    assert t.dtype == torch.float32 and t.shape == (5, 16)
    torch.testing.assert_close(t.double(), want_t, rtol=1e-5, atol=1e-5 * want_t.abs().max().item())
    check_counters(given, 1)


def test_small_m_t_from_the_lora_input(poisoned_outputs, monkeypatch):
    """With LoRA dropout the T items read X_lora, the GEMV items X: T and the LoRA term follow X_lora
    (here with fp32 A and bf16 B)."""
    case = Case((3,), 96, 320, 8, ldt=torch.float32, bias=False)
    inp = make_inputs(case)
    x_lora = torch.randn_like(inp.x)
    inp.B = inp.B.to(torch.bfloat16)  # and B in another dtype than A: each keeps its own operand kind
    y, t, given = _small_m(inp, monkeypatch, split_k=2, x_lora=x_lora, t_chunk_cols=128)
    w = dequantized(inp)
    want_t = x_lora.double() @ inp.A.double().t()
    want = inp.x.double() @ w.double().t() + inp.scale * want_t @ inp.B.double().t()
    torch.testing.assert_close(t.double(), want_t, rtol=1e-5, atol=1e-5 * want_t.abs().max().item())
    err = (y.double() - want).abs().max().item()
    assert err <= 2 * 2.0**-8 * want.abs().max().item(), err  # one bf16 rounding of Y
    check_counters(given, 1)


@pytest.mark.parametrize("split_k", [1, 2])
def test_small_m_without_lora(split_k, poisoned_outputs, monkeypatch):
    """No LoRA factors: no T items, nothing waits, T is None; with one split no counters at all."""
    case = Case((2,), 72, 256, 4)
    inp = make_inputs(case)
    y, t, given = _small_m(inp, monkeypatch, split_k=split_k, lora_A=None, cfg=tql_small.GPU_CONFIG)
    assert t is None
    check_counters(given, 1 if split_k > 1 else 0)
    w = dequantized(inp).double()
    want = inp.x.double() @ w.t() + inp.bias.double()
    err = (y.double() - want).abs().max().item()
    assert err <= 2 * 2.0**-8 * want.abs().max().item(), err


DECODE_CASES = [
    # (case, config, split_k): every dtype, blocksize regime (NSB 1, 2, 4), a K tail (K % BK != 0),
    # a last tile cut short (N % BN != 0), FP4, plain fp32 scales, a strided x.
    (Case((1,), 200, 320, 16), None, 1),
    (Case((1,), 130, 448, 16, blocksize=32), tql_small.SmallMConfig(BN=64, BK=128), 3),
    (Case((1,), 96, 512, 16, blocksize=32, xdt=torch.float32, ldt=torch.float32), tql_small.DECODE_GPU_CONFIG, 2),
    (Case((1,), 130, 256, 4, blocksize=128, xdt=torch.float16, ldt=torch.float16), None, 5),
    (Case((1,), 72, 1024, 8, blocksize=512, quant_type="fp4", bias=False), tql_small.DECODE_GPU_CONFIG, 16),
    (Case((1,), 100, 192, 8, nested=False, ldt=torch.float32), tql_small.SmallMConfig(BN=32, BK=128), 1),
    (Case((1,), 64, 320, 16, sliced=True), None, 2),
    # M = 2: both rows from one lookup per weight
    (Case((2,), 200, 320, 16), None, 1),
    (Case((2,), 130, 448, 16, blocksize=32, ldt=torch.float32), tql_small.SmallMConfig(BN=64, BK=128), 3),
    (Case((2,), 96, 512, 8, blocksize=128, xdt=torch.float32, ldt=torch.float32), tql_small.DECODE_GPU_CONFIG_M2, 2),
    (Case((2,), 72, 256, 4, xdt=torch.float16, ldt=torch.float16, quant_type="fp4", nested=False), None, 4),
    (Case((2,), 64, 320, 16, sliced=True), None, 2),
]


@pytest.mark.parametrize("case,cfg,split_k", DECODE_CASES, ids=lambda v: str(v) if isinstance(v, Case) else None)
def test_decode_path_matches_the_rule(case, cfg, split_k, poisoned_outputs, monkeypatch):
    """The decode path of the small-M kernel (_decode_sums, M <= 2: codes looked up exactly in fp32,
    one scale per word, no tensor cores) by the rule, with T and the LoRA term from the same launch
    and every counter back to zero."""
    inp = make_inputs(case)
    if inp.bias is not None:
        inp.bias = inp.bias.contiguous()  # as qlora_linear_fwd hands it over (the kernels index bias densely)
    packed = inp.packed
    assert tql_small.decode_eligible(case.lead[0], case.N, case.K, case.blocksize, packed)
    assert tql_small.x_pairs(inp.x) == (case.xdt != torch.float32 and not case.sliced)
    y, t, given = _small_m(inp, monkeypatch, split_k=split_k, cfg=cfg, decode=True)
    assert_within_rule([y], [torch_low_precision(inp)[0]], [truth(inp)[0]], f"decode {case} split {split_k}")
    want_t = inp.x.double() @ inp.A.double().t()
    torch.testing.assert_close(t.double(), want_t, rtol=1e-5, atol=1e-5 * want_t.abs().max().item())
    check_counters(given, 1)
    if case.lead[0] == 2:  # each row as it would come alone: the rows do not mix
        y0, _, _ = _small_m(dataclasses.replace(inp, x=inp.x[:1]), monkeypatch, split_k=split_k, cfg=cfg,
                            decode=True)
        torch.testing.assert_close(y[:1], y0, rtol=0, atol=0)


def test_decode_path_only_where_it_can_run(poisoned_outputs, monkeypatch):
    """decode=None takes the M = 1 path where decode_eligible allows it (and decode_path() does not
    turn it off), the tensor-core tiles elsewhere; decode=True where it cannot run is a ValueError
    naming why; decode=False forces the tiles, which agree with the decode path by the rule."""
    inp = make_inputs(Case((1,), 96, 320, 16))
    packed = inp.packed
    assert tql_small.decode_eligible(1, 96, 320, 64, packed) and tql_small.decode_eligible(2, 96, 320, 64, packed)
    assert not tql_small.decode_eligible(3, 96, 320, 64, packed)        # M > DECODE_MAX_M
    assert not tql_small.decode_eligible(1, 96, 336, 16 * 3, packed)    # K % blocksize
    assert not tql_small.decode_eligible(1, 96, 320 + 16, 64, packed)   # K % 32, K % blocksize
    assert not tql_small.decode_eligible(1, 96, 320, 64, packed.reshape(-1)[1:])  # bytes not 4-byte aligned
    assert not tql_small.decode_eligible(1, 2**31 // 4, 256, 64, packed)  # block indices past int32
    seen = spy_small_m_launches(monkeypatch)
    y_auto, _, _ = _small_m(inp, monkeypatch)
    y_tiles, _, _ = _small_m(inp, monkeypatch, decode=False)
    with tql_small.decode_path(False):  # the bench's side-by-side switch
        _small_m(inp, monkeypatch)
        with tql_small.decode_path(True):
            _small_m(inp, monkeypatch)
    _small_m(inp, monkeypatch)
    assert seen == [1, 0, 0, 1, 1]
    exact, low = truth(inp)[0], torch_low_precision(inp)[0]
    assert_within_rule([y_auto], [low], [exact], "decode=None")
    assert_within_rule([y_tiles], [low], [exact], "decode=False")
    three = make_inputs(Case((3,), 96, 320, 16))
    with pytest.raises(ValueError, match="M <= 2"):
        _small_m(three, monkeypatch, decode=True)
    _small_m(three, monkeypatch)  # M = 3 without the flag: the tiles, no error
    assert seen[-1] == 0
    _small_m(make_inputs(Case((2,), 96, 320, 16)), monkeypatch)
    assert seen[-1] == 2  # DECODE carries the rows
    # x rows an odd number of elements apart cannot be read as pairs
    odd = torch.zeros(2, 321, dtype=torch.bfloat16)[:, :320]
    assert not tql_small.x_pairs(odd) and tql_small.x_pairs(odd[:1])


def test_decode_forward_is_one_kernel_launch(monkeypatch):
    """At M <= 16 the forward op launches the small-M kernel once and no other Triton kernel (T
    comes from the same launch): at decode sizes each extra launch costs about as much as the
    weight stream."""
    launched = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for mod, name in ((tql, "_lora_down_kernel"), (tql, "_lora_epilogue_kernel"), (tql, "_fwd_kernel"),
                      (tql_small, "_small_m_kernel")):
        monkeypatch.setattr(mod, name, Counting(name, getattr(mod, name)))
    inp = make_inputs(Case((1,), 96, 320, 16, ldt=torch.float32))
    with use_backend("triton"), torch.no_grad():
        y = qk.qlora_linear(inp.x, inp.packed, inp.state, inp.A, inp.B, inp.scale, inp.bias)
    assert launched == ["_small_m_kernel"], launched
    assert_within_rule([y], [torch_low_precision(inp)[0]], [truth(inp)[0]], "decode forward")


def test_split_k_stays_on_under_deterministic_algorithms(monkeypatch):
    """The split sums run in split order whoever finishes last (no fp32 atomics on data), so a run
    that asks torch for deterministic algorithms keeps the split the GPU needs for bandwidth."""
    monkeypatch.setattr(tql_small, "sm_count", lambda device: 132)
    gpu = torch.device("cuda", 0)
    split = tql_small.pick_split_k(32, 8192, tql_small.GPU_CONFIG, gpu)
    assert split > 1
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tql_small.pick_split_k(32, 8192, tql_small.GPU_CONFIG, gpu) == split
    finally:
        torch.use_deterministic_algorithms(prev)
    assert tql_small.pick_split_k(32, 8192, tql_small.GPU_CONFIG, torch.device("cpu")) == 1


def test_launch_counters_fresh_off_the_gpu():
    """Off the GPU (CPU, interpreter) every launch gets a fresh zeroed buffer, so an interrupted
    interpreter run cannot leave a later launch counters that are not zero."""
    cpu = tql_small.sync_counters(torch.device("cpu"), 5)
    assert cpu.shape == (7,) and cpu.dtype == torch.int32 and int(cpu.abs().sum()) == 0
    assert tql_small.sync_counters(torch.device("cpu"), 5) is not cpu


def test_capture_slots_are_disjoint_zeroed_and_run_out():
    """The capture pool hands each captured launch its own zeroed, line-aligned slice, never the
    same bytes twice, and None (the caller then zeroes a buffer in the graph) once it is used up."""
    from qlora_kernels.backends.launch_counters import SLOT_ALIGN, CaptureSlots

    pool = CaptureSlots(torch.zeros(4 * SLOT_ALIGN, dtype=torch.int32))
    a, b = pool.take(3), pool.take(SLOT_ALIGN + 1)
    assert a.shape == (3,) and b.shape == (SLOT_ALIGN + 1,)
    assert int(a.abs().sum()) == 0 and int(b.abs().sum()) == 0
    base = pool.buffer.data_ptr()
    assert (a.data_ptr() - base) % (4 * SLOT_ALIGN) == 0 and (b.data_ptr() - base) % (4 * SLOT_ALIGN) == 0
    a.fill_(7)
    assert int(b.abs().sum()) == 0  # disjoint
    assert pool.free == SLOT_ALIGN
    assert pool.take(SLOT_ALIGN + 1) is None and pool.free == SLOT_ALIGN  # no room: nothing taken
    c = pool.take(SLOT_ALIGN)
    assert c is not None and pool.free == 0 and pool.take(1) is None


# Skipped without CUDA (reason below): the per-stream cache and the capture pool exist only for
# CUDA streams and graphs; bench/device_check.sh runs this file on a GPU when one is lent.
@pytest.mark.skipif(not HAS_CUDA, reason="the per-stream counter cache needs CUDA streams")
def test_launch_counters_one_buffer_per_stream():
    """On a GPU each stream gets its own counters (kernels on two streams may overlap), reused by
    every launch on that stream and grown for wider N."""
    from qlora_kernels.backends.launch_counters import launch_counters

    dev = torch.device("cuda", torch.cuda.current_device())
    a = launch_counters(dev, 10)
    assert launch_counters(dev, 10) is a
    with torch.cuda.stream(torch.cuda.Stream(dev)):
        b = launch_counters(dev, 10)
    assert b.data_ptr() != a.data_ptr()
    wide = launch_counters(dev, a.numel() + 1)
    assert wide.numel() >= a.numel() + 1 and int(wide.abs().sum()) == 0


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graph capture needs CUDA")
def test_captured_launches_take_their_own_slots_from_the_pool():
    """While a graph is captured each launch gets its own slice of the pool that eager launches
    zeroed beforehand (no memset node in the graph), disjoint from the per-stream buffer."""
    from qlora_kernels.backends import launch_counters as lc

    dev = torch.device("cuda", torch.cuda.current_device())
    eager = lc.launch_counters(dev, 10)  # makes the pool
    pool = lc._CAPTURE_POOLS[dev.index][-1]
    used = pool.used
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a = lc.launch_counters(dev, 10)
        b = lc.launch_counters(dev, 10)
    pool_bytes = range(pool.buffer.data_ptr(), pool.buffer.data_ptr() + pool.buffer.numel() * 4)
    assert a.data_ptr() in pool_bytes and b.data_ptr() in pool_bytes
    assert len({a.data_ptr(), b.data_ptr(), eager.data_ptr()}) == 3
    assert pool.used == used + 2 * lc.SLOT_ALIGN
    assert int(a.abs().sum()) == 0 and int(b.abs().sum()) == 0


@pytest.mark.parametrize("kind", [tql.KIND_FP32, tql.KIND_BF16])
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_lora_down_split_reduction(kind, splits, poisoned_outputs):
    """The LoRA reductions with their reduction split (as the LoRA weight gradients run on a GPU):
    P a transposed view (X^T), L not a multiple of the 64-row chunk, parts of uneven length."""
    x = torch.randn(300, 200, device=DEVICE).to(torch.bfloat16)  # [M, K]
    q = torch.randn(300, 5, device=DEVICE)  # s * U [M, r], fp32
    got = tql.lora_down(x.t(), q, kind, splits)  # dA^T [K, r]
    qk_ = q if kind == tql.KIND_FP32 else q.to(torch.bfloat16)
    exact = x.double().t() @ qk_.double()
    # fp32 accumulation of exact products (tf32x3 ~ fp32): error ~ L * 2^-24 * |terms|
    bound = 300 * 2.0**-23 * (x.double().abs().t() @ qk_.double().abs())
    assert got.dtype == torch.float32 and got.shape == (200, 5)
    assert ((got.double() - exact).abs() <= bound).all()


def test_lora_weight_grads_split_on_gpu_shapes(monkeypatch, poisoned_outputs):
    """fp32 adapters on bf16 activations with the reduction split in three (a GPU's choice at
    these sizes, lora_grad_splits): dA and dB still meet the rule."""
    monkeypatch.setattr(tql, "lora_grad_splits", lambda out_rows, l, device: 3)
    inp = make_inputs(Case((300,), 200, 320, 8, ldt=torch.float32))
    assert_within_rule(run_qlora_linear(inp, "triton"), torch_low_precision(inp), truth(inp), "split dA/dB")


def test_lora_grad_splits_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(tql, "sm_count", lambda device: 132)
    gpu = torch.device("cuda", 0)
    # dA^T of a 4096-wide layer at M=4096: 64 row programs alone would leave half the SMs idle.
    assert tql.lora_grad_splits(4096, 4096, gpu) * 64 >= 4 * 132 - 64
    assert tql.lora_grad_splits(4096, 200, gpu) == 1  # too few rows to split
    assert tql.lora_grad_splits(4096, 4096, torch.device("cpu")) == 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dropout_path(backend):
    """LoRA dropout: Y = X W^T + s * (drop(X) A^T) B^T. Same mask (same seed) -> the float64 spec with
    x_lora = the dropped input; the dX term through the mask comes from autograd of the dropout."""
    case = Case((2, 9), 96, 192, 8, xdt=torch.float32, ldt=torch.float32)
    inp = make_inputs(case)
    p = 0.25
    torch.manual_seed(123)
    got = run_qlora_linear(inp, backend, dropout=p)
    torch.manual_seed(123)
    # The same draw as qlora_linear's dropout of the [18, 192] fp32 input on this device.
    mask = torch.nn.functional.dropout(torch.ones(18, 192, device=DEVICE), p, training=True).double()
    x2 = inp.x.reshape(-1, 192).double()
    xl = x2 * mask
    gy = inp.grad_y.reshape(-1, 96).double()
    w = dequantized(inp).double()
    y, t = ref.qlora_linear_forward(x2, w, inp.A, inp.B, inp.scale, inp.bias, x_lora=xl, compute_dtype=torch.float64)
    dx, da, db, dbias = ref.qlora_linear_backward(gy, xl, t, w, inp.A, inp.B, inp.scale, lora_dx=False,
                                                  compute_dtype=torch.float64)
    dx = dx + (inp.scale * (gy @ inp.B.double()) @ inp.A.double()) * mask
    exact = [y.reshape(2, 9, 96), dx.reshape(2, 9, 192), da, db, dbias]
    for name, g, e in zip(NAMES, got, exact):
        # fp32 vs float64 of a K<=192 reduction: a few fp32 ulps of the magnitude.
        tol = 64 * 2.0**-24 * e.abs().max().item() * math.sqrt(192)
        assert (g.double() - e).abs().max().item() <= tol, name


@pytest.mark.parametrize("xdt,ldt", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("strided", [False, True])
def test_lora_input_grad_by_the_rule(xdt, ldt, strided, poisoned_outputs):
    """The op behind LoRA dropout's dX term, s * (dY B) A, on both backends against float64, held to
    the rule with PyTorch's formula in the LoRA dtype (what autograd.py ran before the op)."""
    wide = torch.randn(37, 400 if strided else 200, device=DEVICE).to(xdt)
    gy = wide[:, ::2] if strided else wide
    A = (torch.randn(8, 320, device=DEVICE) / math.sqrt(320)).to(ldt)
    B = (torch.randn(200, 8, device=DEVICE) * 0.1).to(ldt)
    s = 0.7
    exact = ref.lora_input_grad(gy, A, B, s, torch.float64)
    low = ((gy.to(ldt) @ B) * s @ A).to(xdt)
    for backend in ("reference", "triton"):
        with use_backend(backend):
            got = torch.ops.qlora.lora_input_grad(gy, A, B, s, xdt)
        assert got.dtype == xdt and got.shape == (37, 320), backend
        err = (got.double() - exact).abs().max().item()
        err_torch = (low.double() - exact).abs().max().item()
        assert err <= 2 * err_torch + ATOL_REL * exact.abs().max().item(), (backend, err, err_torch)


def test_eval_ignores_dropout():
    inp = make_inputs(Case((3,), 64, 128, 4, xdt=torch.float32, ldt=torch.float32))
    with use_backend("reference"):
        a = qk.qlora_linear(inp.x, inp.packed, inp.state, inp.A, inp.B, inp.scale, inp.bias, dropout=0.5, training=False)
        b = qk.qlora_linear(inp.x, inp.packed, inp.state, inp.A, inp.B, inp.scale, inp.bias)
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["fused", "dequant_matmul"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_does_not_change_what_the_ops_compute(backend, strategy):
    """An enclosing autocast region (HF Trainer's bf16=True) must not recast the torch calls inside
    an op (the reference's fp32 T = X A^T, the dequant + matmul strategy): eager would then differ
    from a compiled graph, where the op is opaque, and from the dtypes the op promises."""
    from qlora_kernels.backends.linear_strategy import use_linear_strategy

    inp = make_inputs(Case((5,), 64, 128, 4, xdt=torch.bfloat16, ldt=torch.float32))
    inp.B = inp.B * 40  # a LoRA term large enough that a bf16 T (autocast's) would show in Y
    with use_linear_strategy(strategy):
        # forward and backward inside the region (CPU autograd runs the backward on this thread)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            torch.manual_seed(7)
            got = run_qlora_linear(inp, backend, dropout=0.25)
        torch.manual_seed(7)  # the same dropout mask
        want = run_qlora_linear(inp, backend, dropout=0.25)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch(backend):
    inp = make_inputs(Case((3,), 64, 128, 4))
    x = torch.randn(0, 5, 128, device=DEVICE, requires_grad=True)
    A = inp.A.detach().requires_grad_()
    with use_backend(backend):
        y = qk.qlora_linear(x, inp.packed, inp.state, A, inp.B, inp.scale)
        y.sum().backward()
    assert y.shape == (0, 5, 64) and x.grad.shape == x.shape
    assert torch.equal(A.grad, torch.zeros_like(A))


def test_argument_errors():
    inp = make_inputs(Case((3,), 64, 128, 4))
    with pytest.raises(ValueError, match="features"):
        qk.qlora_linear(inp.x[:, :64], inp.packed, inp.state, inp.A, inp.B, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        qk.qlora_linear(inp.x, inp.packed, inp.state, inp.A[:, :64], inp.B, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        qk.qlora_linear(inp.x, inp.packed, inp.state, inp.A.float(), inp.B, 1.0)
    with pytest.raises(ValueError, match="dropout"):
        qk.qlora_linear(inp.x, inp.packed, inp.state, inp.A, inp.B, 1.0, dropout=1.0)


# --- torch.library: opcheck and torch.compile -------------------------------------------------


def _op_args(inp: Inputs):
    s = inp.state
    k = inp.x.shape[-1]
    w = (inp.packed.reshape(-1), s.absmax, s.nested_absmax, s.nested_code, s.offset, s.blocksize, s.quant_type,
         list(s.shape))
    fwd = (inp.x.reshape(-1, k), None, *w, inp.A, inp.B, inp.scale, inp.bias)
    t = (inp.x.reshape(-1, k).float() @ inp.A.float().t()).contiguous()
    bwd = (inp.grad_y.reshape(-1, inp.grad_y.shape[-1]), inp.x.reshape(-1, k), t, *w, inp.A, inp.B, inp.scale, True, True)
    return fwd, bwd


# The ops have no autograd kernel of their own (QLoRALinearFunction is their autograd), so opcheck
# runs them on inputs that do not require grad; test_autograd_registration then checks nothing.
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    inp = make_inputs(Case((5,), 64, 128, 4))
    fwd, bwd = _op_args(inp)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.qlora.qlora_linear_fwd.default, fwd)
        torch.library.opcheck(torch.ops.qlora.qlora_linear_bwd.default, bwd)
        torch.library.opcheck(torch.ops.qlora.qlora_linear_bwd.default, bwd[:-2] + (False, True))
        torch.library.opcheck(torch.ops.qlora.lora_input_grad.default, (bwd[0], inp.A, inp.B, inp.scale, inp.x.dtype))


class _TinyQLoRALinear(torch.nn.Module):
    """Test-local stand-in for the QLoRALinear module of another issue: a frozen NF4 weight and
    trainable LoRA factors calling qk.qlora_linear."""

    def __init__(self, linear: torch.nn.Linear, r: int, alpha: float, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        with use_backend("reference"):
            packed, state = qk.quantize_4bit(linear.weight.detach().float(), blocksize=64)
        self.register_buffer("packed", packed)
        self.state = state
        n, k = linear.weight.shape
        dev = linear.weight.device
        self.lora_A = torch.nn.Parameter((torch.randn(r, k, generator=generator) / math.sqrt(k)).to(dev, dtype))
        # Nonzero B (as after some training) so the first step's dA is not identically zero.
        self.lora_B = torch.nn.Parameter((torch.randn(n, r, generator=generator) * 0.02).to(dev, dtype))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())
        self.scale = alpha / r

    def forward(self, x):
        return qk.qlora_linear(x, self.packed, self.state, self.lora_A, self.lora_B, self.scale, self.bias)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces qlora_linear (fake impls, autograd.Function) on the test device."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True, device=DEVICE)
    mod = _TinyQLoRALinear(lin, 8, 16.0, g)
    x = torch.randn(2, 5, 128, device=DEVICE, requires_grad=True)
    eager = mod(x)
    eager.sum().backward()
    grads = [x.grad.clone(), mod.lora_A.grad.clone(), mod.lora_B.grad.clone(), mod.bias.grad.clone()]
    for t in (x, mod.lora_A, mod.lora_B, mod.bias):
        t.grad = None
    compiled = torch.compile(mod, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for g_eager, t in zip(grads, (x, mod.lora_A, mod.lora_B, mod.bias)):
        torch.testing.assert_close(t.grad, g_eager, rtol=0, atol=0)
    # The compiled graph calls the op, which picks its backend at run time: the same graph runs the
    # Triton kernels (interpreted here) when that backend is forced.
    with use_backend("triton"):
        eager_t = mod(x)
        out_t = compiled(x)
    torch.testing.assert_close(out_t, eager_t, rtol=0, atol=0)


# --- end to end: a tiny Llama trained 3 steps, triton (interpreter) vs reference ---------------

LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama(backend_seed: int = 0):
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the tiny-Llama test")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(backend_seed)
    model = transformers.LlamaForCausalLM(cfg).float().to(DEVICE)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LLAMA_PROJ:
                if hasattr(parent, name):
                    setattr(parent, name, _TinyQLoRALinear(getattr(parent, name), 8, 16.0, g))
    return model.to(DEVICE)


def _train(backend: str, steps: int = 3):
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    # SGD (train_causal_lm's) keeps the update linear in the gradient, so summation-order
    # differences stay that size (Adam's first step is sign(g) * lr: a gradient within rounding of
    # 0 could flip its sign).
    with use_backend(backend):
        losses = train_causal_lm(model, ids, steps=steps)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, lora


def test_tiny_llama_trains_same_on_triton_and_reference():
    ref_losses, ref_lora = _train("reference")
    tri_losses, tri_lora = _train("triton")
    assert len(ref_lora) == 2 * 7 * 2
    assert ref_losses[-1] < ref_losses[0]  # training moves: the comparison is not of constants
    # fp32 everywhere: the backends differ only in summation order (~1e-7 relative per matmul),
    # amplified a little by 3 steps of SGD; 1e-4 is far below any real kernel error (a wrong
    # scale, a missing LoRA term or a wrong gradient changes these by >= 1e-2).
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    initial = _tiny_llama()
    for name in ref_lora:
        moved = (ref_lora[name] - initial.get_parameter(name).detach()).abs().max()
        assert moved > 1e-4, f"{name} did not train"
        torch.testing.assert_close(tri_lora[name], ref_lora[name], rtol=1e-4, atol=1e-5, msg=name)


# --- compile-gate specs stay in step with the launchers -----------------------------------------


def test_compile_specs_match_kernels_and_launch_configs(monkeypatch):
    """Every spec names each kernel argument once (runtime or constexpr, INTERPRET False), and every
    config the launchers can pick on a GPU has a spec, so the compile gate (sm_80/sm_90, no spills,
    tensor cores) sees everything that ships. The gate itself compiles them (compile_check)."""
    specs = tql.compile_specs() + tql_small.compile_specs()
    for spec in specs:
        names = list(getattr(spec.fn, "arg_names"))
        assert sorted(list(spec.signature) + list(spec.constexprs)) == sorted(names), spec.name
        assert spec.constexprs["INTERPRET"] is False, spec.name
    # (kernel, tile config, an architecture its specs are compiled for)
    seen = {(s.fn, s.constexprs["BM"], s.constexprs.get("BN"), s.constexprs.get("BK"), s.num_warps, s.num_stages, a)
            for s in specs for a in (s.archs or (80, 90))}
    bf, f32 = torch.bfloat16, torch.float32
    monkeypatch.setattr(tql, "interpreting", lambda: False)  # pick_config as on a GPU
    for major, arch in ((8, 80), (9, 90)):
        for m in (1, 64, 65, 4096):
            for xdt, ldt in ((bf, bf), (bf, f32), (f32, f32), (torch.float16, torch.float16)):
                for shape, bs in (([4096, 4096], 64), ([200, 320], 128), ([64, 321], 64)):
                    for dx, fn in ((False, tql._fwd_kernel), (True, tql._dx_kernel)):
                        c = tql.pick_config(m, xdt, ldt, shape, bs, dx=dx, cc_major=major)
                        assert (fn, c.BM, c.BN, c.BK, c.num_warps, c.num_stages, arch) in seen, (
                            m, xdt, ldt, shape, dx, arch)
    # sm_90's large tiles are its own; the older chips keep theirs.
    assert tql.pick_config(4096, bf, bf, [4096, 4096], 64, cc_major=9) == tql.SM90_CONFIGS["large"]
    assert tql.pick_config(4096, bf, bf, [4096, 4096], 64, cc_major=8) == tql.GPU_CONFIGS["large"]
    assert tql.pick_config(4096, bf, bf, [4096, 4096], 64, dx=True, cc_major=9) == tql.SM90_DX_CONFIGS["large"]
    for k, bs in ((4096, 64), (320, 128)):
        sc = tql_small.gpu_config(k, bs)
        assert (tql_small._small_m_kernel, tql_small.BM, sc.BN, sc.BK, sc.num_warps, sc.num_stages, 90) in seen, (k, bs)
    for dc in (tql_small.DECODE_GPU_CONFIG, tql_small.DECODE_GPU_CONFIG_M2):
        assert (tql_small._small_m_kernel, tql_small.BM, dc.BN, dc.BK, dc.num_warps, dc.num_stages, 90) in seen


@pytest.mark.parametrize("cfg_name", list(tql.GPU_CONFIGS) + [f"{n}_sm90" for n in tql.SM90_CONFIGS])
def test_gpu_tile_configs(cfg_name, poisoned_outputs):
    """The tile configs a GPU launches (BK 32..128: 1..4 scale blocks per tile row at blocksize 32),
    run here through the interpreter: forward and dX GEMMs by the same rule as the default config."""
    case = Case((130,), 160, 256, 16, blocksize=32)
    inp = make_inputs(case)
    s = inp.state
    args = tql.weight_args(inp.packed, s.absmax, s.nested_absmax, s.nested_code, s.offset, s.quant_type)
    shape = list(s.shape)
    t = tql.lora_down(inp.x, inp.A.t(), tql._KIND_OF[inp.A.dtype])
    fwd_cfgs, dx_cfgs = (tql.SM90_CONFIGS, tql.SM90_DX_CONFIGS) if cfg_name.endswith("_sm90") else (
        tql.GPU_CONFIGS, tql.DX_GPU_CONFIGS)
    cfg_name = cfg_name.removesuffix("_sm90")
    y = tql.fwd_gemm(inp.x, t, args, s.blocksize, shape, inp.B, inp.scale, inp.bias, cfg=fwd_cfgs[cfg_name])
    u = tql.lora_down(inp.grad_y, inp.B, tql._KIND_OF[inp.B.dtype])
    dx = tql.dx_gemm(inp.grad_y, u, args, s.blocksize, shape, inp.A, inp.scale, inp.x.dtype,
                     cfg=dx_cfgs[cfg_name])
    exact, low = truth(inp), torch_low_precision(inp)
    assert_within_rule([y, dx], low[:2], exact[:2], f"GPU config {cfg_name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_input_without_grad_skips_dx(backend, monkeypatch):
    """An input that needs no gradient (the first layer's, after frozen embeddings): the dX GEMM is
    skipped and the LoRA gradients are those of the full backward."""
    inp = make_inputs(Case((20,), 64, 128, 4))
    full = run_qlora_linear(inp, backend)
    calls = []
    real = tql.dx_gemm
    monkeypatch.setattr(tql, "dx_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    A = inp.A.detach().requires_grad_()
    B = inp.B.detach().requires_grad_()
    with use_backend(backend):
        qk.qlora_linear(inp.x, inp.packed, inp.state, A, B, inp.scale, inp.bias).backward(inp.grad_y)
    assert not calls
    torch.testing.assert_close(A.grad, full[2], rtol=0, atol=0)
    torch.testing.assert_close(B.grad, full[3], rtol=0, atol=0)


@pytest.mark.parametrize("K,blocksize,cfg_name", [
    (320, 64, None),      # aligned, one block per tile row
    (256, 32, "large"),   # aligned, several blocks per tile row (dX BK=128: 4)
    (200, 64, None),      # blocks cross rows: two scales per tile row (row starts at 8n mod 64)
    (200, 64, "narrow_large"),  # the same with the GPU's BK (32 forward, 64 dX)
    (321, 64, None),      # odd K: per-element nibbles and scales
    (200, 32, None),      # blocks cross rows, BK > blocksize: per-element scales
])
def test_dequantized_tiles_bit_exact(K, blocksize, cfg_name):
    """I @ W^T and I @ W through the two GEMM kernels (fp32, no LoRA, no bias) give dequant(W) bit for
    bit: each output is one product by 1.0, so this isolates the in-register dequantization, which
    must equal reference.dequantize_weight exactly in every weight layout."""
    N = 72
    w = torch.randn(N, K, device=DEVICE)
    with use_backend("reference"):
        packed, s = qk.quantize_4bit(w, blocksize=blocksize)
    exact = ref.dequantize_weight(packed.reshape(-1), s.absmax, s.nested_absmax, s.nested_code, s.offset,
                                  blocksize, "nf4", [N, K])
    args = tql.weight_args(packed, s.absmax, s.nested_absmax, s.nested_code, s.offset, "nf4")
    lora = torch.zeros(N, 1, device=DEVICE)
    fcfg = tql.GPU_CONFIGS[cfg_name] if cfg_name else None
    dcfg = tql.DX_GPU_CONFIGS[cfg_name] if cfg_name else None
    wt = tql.fwd_gemm(torch.eye(K, device=DEVICE), None, args, blocksize, [N, K], lora, 0.0, None, cfg=fcfg)
    wd = tql.dx_gemm(torch.eye(N, device=DEVICE), None, args, blocksize, [N, K], lora.t(), 0.0, torch.float32, cfg=dcfg)
    assert torch.equal(wt, exact.t())
    assert torch.equal(wd, exact)
