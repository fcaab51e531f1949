"""PagedAdamW / PagedAdamW8bit on the CPU: torch.optim.AdamW equivalence, 8-bit reference vs
Triton (interpreter) bit identity, 8-bit training quality, memory, exact resume, bad input.

The GPU-only parts (managed memory, prefetch, page_out, no growth) are in test_optim_cuda.py.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from qlora_kernels import PagedAdamW, PagedAdamW8bit, use_backend
from qlora_kernels import reference as ref
from qlora_kernels.formats import get_code

from python_tests.helpers import assert_same_bits, minilm_linear_weights

BACKENDS = ("reference", "triton")


@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny: with the 2 shared CPU cores busy, torch's intra-op threads make each
    # step 10x slower (measured), not faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _relative_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """|a - e| <= rel * max|e| elementwise: relative to the tensor's scale. (An element near zero
    is the difference of two O(scale) terms, so its own relative error says nothing.)"""
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    scale = expected.detach().double().abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel} * {scale:.3e}"


# ---------------------------------------------------------------------------------------------
# 32-bit: equals torch.optim.AdamW
# ---------------------------------------------------------------------------------------------


def _two_group_run(opt_cls, steps: int, params0: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    w, b, head = (p.clone().requires_grad_() for p in params0)
    opt = opt_cls(
        [{"params": [w, head]}, {"params": [b], "lr": 3e-3, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
    for _ in range(steps):
        opt.zero_grad()
        loss = (((x @ w.t() + b).tanh() @ head.t() - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
    return [w, b, head], opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_adamw_equals_torch_adamw(backend):
    params0 = [torch.randn(48, 40) * 0.3, torch.randn(48) * 0.1, torch.randn(5, 48) * 0.3]
    x, y = torch.randn(32, 40), torch.randn(32, 5)
    expected, torch_opt = _two_group_run(torch.optim.AdamW, 20, params0, x, y)
    with use_backend(backend):
        actual, opt = _two_group_run(PagedAdamW, 20, params0, x, y)
    for a, e, name in zip(actual, expected, ("w", "b", "head")):
        _relative_close(a, e, 1e-6, f"{backend} {name}")
        st, tst = opt.state[a], torch_opt.state[e]
        assert st["step"] == 20 == int(tst["step"])
        _relative_close(st["exp_avg"], tst["exp_avg"], 1e-6, f"{backend} {name} exp_avg")
        _relative_close(st["exp_avg_sq"], tst["exp_avg_sq"], 1e-6, f"{backend} {name} exp_avg_sq")
    assert opt.param_groups[0]["lr"] == torch_opt.param_groups[0]["lr"]


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    b0 = b.detach().clone()
    opt = PagedAdamW([a, b])
    a.grad = torch.randn(10)
    opt.step()
    assert len(opt.state) == 1 and a in opt.state and b not in opt.state
    assert_same_bits(b.detach(), b0, "param without grad")
    opt.zero_grad()
    assert a.grad is None


def test_cpu_needs_no_paging_and_says_nothing():
    p = torch.nn.Parameter(torch.randn(5000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = PagedAdamW8bit([p], paged=True)
        p.grad = torch.randn(5000)
        opt.step()
        opt.page_out()  # a no-op for ordinary memory
        opt.prefetch()
    assert opt.managed_state_bytes() == 0 and opt.state_bytes() > 0


def test_closure_and_low_precision_params():
    p = torch.nn.Parameter(torch.randn(300).to(torch.bfloat16))
    opt = PagedAdamW([p], lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = (p.float() ** 2).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and p.dtype == torch.bfloat16
    assert not torch.equal(p.detach(), before)
    assert opt.state[p]["exp_avg"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# 8-bit: reference vs Triton, bit for bit
# ---------------------------------------------------------------------------------------------


def test_cached_state_tables_equal_fresh_ones():
    """The optimizer requantizes through reference.cached_lut: the cached tables must be the ones
    dynamic_map_lut builds, also after another code was quantized in between."""
    for name in ("dynamic", "dynamic_unsigned"):
        code = get_code(name)
        ref.quantize_blockwise(torch.randn(300), torch.sort(torch.rand(256) * 2 - 1).values, 256)
        assert_same_bits(ref.cached_lut(code), ref.dynamic_map_lut(code), f"{name} table")


def _run_8bit(backend: str, params0: list[torch.Tensor], grads: list[list[torch.Tensor]]):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = PagedAdamW8bit([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "lr": 5e-3}],
                         lr=1e-2, weight_decay=0.05)
    with use_backend(backend):
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
    return params, opt


def test_8bit_reference_and_triton_bit_identical():
    # 70x73 = 5110: 8-bit with a partial last block; bf16 64x65: 8-bit; 73 and 4095: fp32 states.
    params0 = [torch.randn(70, 73), torch.randn(64, 65).to(torch.bfloat16), torch.randn(73), torch.randn(4095)]
    grads = [[torch.randn(p.shape).to(p.dtype) * scale for p in params0] for scale in (1.0, 0.01, 3.0, 1e-4)]
    grads[2][0][3, :] = 0.0  # a row of zero gradient
    ref_params, ref_opt = _run_8bit("reference", params0, grads)
    tri_params, tri_opt = _run_8bit("triton", params0, grads)
    for i, (a, b) in enumerate(zip(ref_params, tri_params)):
        assert_same_bits(b.detach(), a.detach(), f"param {i}")
        sa, sb = ref_opt.state[a], tri_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if key != "step":
                assert_same_bits(sb[key], sa[key], f"param {i} state {key}")
    assert "exp_avg_q" in ref_opt.state[ref_params[0]] and "exp_avg_q" in ref_opt.state[ref_params[1]]
    assert "exp_avg" in ref_opt.state[ref_params[3]]  # 4095 < 4096: fp32 states


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_ops_opcheck(backend):
    n = 700
    p, g = torch.randn(n), torch.randn(n)
    nb = -(-n // 256)
    m_q = torch.randint(0, 256, (n,), dtype=torch.uint8)
    v_q = torch.randint(0, 256, (n,), dtype=torch.uint8)
    m_abs, v_abs = torch.rand(nb), torch.rand(nb)
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.qlora.adamw_step_8bit.default, (p, g, m_q, m_abs, v_q, v_abs, *hyper, 256))
        torch.library.opcheck(torch.ops.qlora.adamw_step_32bit.default, (p, g, torch.randn(n), torch.rand(n), *hyper))


def _states(p: torch.Tensor, eight_bit: bool) -> list[torch.Tensor]:
    if eight_bit:
        nb = -(-p.numel() // 256)
        return [torch.zeros(p.shape, dtype=torch.uint8), torch.zeros(nb), torch.zeros(p.shape, dtype=torch.uint8),
                torch.zeros(nb)]
    return [torch.zeros(p.shape), torch.zeros(p.shape)]


@pytest.mark.parametrize("eight_bit", [False, True])
def test_multi_tensor_ops_equal_single_tensor_reference(eight_bit):
    """The Triton multi-tensor launch (mixed dtypes: two launches; a non-contiguous or unaligned
    param: a single-tensor launch; full and partial tiles) gives the reference's single-tensor
    results bit for bit."""
    shapes_dtypes = [((70, 73), torch.float32), ((4100,), torch.bfloat16), ((300,), torch.float32),
                     ((1,), torch.float16), ((64, 65), torch.float32)]
    params0 = [torch.randn(s).to(d) for s, d in shapes_dtypes]
    grads = [[torch.randn(p.shape).to(p.dtype) for p in params0] for _ in range(2)]
    results = {}
    for mode in ("single", "multi"):
        ps = [p.clone() for p in params0]
        ps[4] = ps[4].t().contiguous().t()  # same values, column-major: not contiguous
        ps[2] = torch.cat([torch.zeros(1), ps[2]])[1:]  # 4-byte offset: not 16-byte aligned
        states = [_states(p, eight_bit) for p in ps]
        for step, gs in enumerate(grads, 1):
            hyper = (1e-2, 0.9, 0.999, 1e-8, 0.1, step)
            if mode == "single":
                with use_backend("reference"):
                    for p, g, st in zip(ps, gs, states):
                        op = torch.ops.qlora.adamw_step_8bit if eight_bit else torch.ops.qlora.adamw_step_32bit
                        op(p, g, *st, *hyper, *((256,) if eight_bit else ()))
            else:
                lists = [list(x) for x in zip(*states)]
                with use_backend("triton"):
                    if eight_bit:
                        torch.ops.qlora.adamw_step_8bit_multi(ps, gs, *lists, *hyper, 256)
                    else:
                        torch.ops.qlora.adamw_step_32bit_multi(ps, gs, *lists, *hyper)
        results[mode] = ps + [t for st in states for t in st]
    for i, (a, b) in enumerate(zip(results["single"], results["multi"])):
        assert_same_bits(b, a, f"tensor {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_ops_opcheck(backend):
    ps = [torch.randn(700), torch.randn(5, 9)]
    gs = [torch.randn_like(p) for p in ps]
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, 2)
    s8 = [_states(p, True) for p in ps]
    s32 = [_states(p, False) for p in ps]
    for st in s8:
        st[0].random_(0, 256), st[1].uniform_(), st[2].random_(0, 256), st[3].uniform_()
    with use_backend(backend):
        torch.library.opcheck(torch.ops.qlora.adamw_step_8bit_multi.default,
                              (ps, gs, *[list(x) for x in zip(*s8)], *hyper, 256))
        torch.library.opcheck(torch.ops.qlora.adamw_step_32bit_multi.default,
                              (ps, gs, *[list(x) for x in zip(*s32)], *hyper))


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_backend_without_multi_tensor_ops_gets_single_tensor_calls(cls, monkeypatch):
    from qlora_kernels.backends import reference as reference_backend

    params0 = [torch.randn(70, 73), torch.randn(73)]
    grads = [torch.randn_like(p) for p in params0]
    results = []
    for drop in (False, True):
        if drop:
            impls = {k: v for k, v in reference_backend.IMPLS.items() if not k.endswith("_multi")}
            monkeypatch.setattr(reference_backend, "IMPLS", impls)
        ps = [torch.nn.Parameter(p.clone()) for p in params0]
        opt = cls(ps, lr=1e-2)
        with use_backend("reference"):
            for _ in range(2):
                for p, g in zip(ps, grads):
                    p.grad = g
                opt.step()
        results.append(ps)
    for a, b in zip(*results):
        assert_same_bits(b.detach(), a.detach(), "param")


def test_params_joining_late_keep_their_own_step_count():
    """A param whose first gradient comes at step 3 starts its bias correction at 1, as torch's."""
    a0, b0 = torch.randn(30), torch.randn(40)
    runs = {}
    for cls in (torch.optim.AdamW, PagedAdamW):
        a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
        opt = cls([a, b], lr=1e-2, weight_decay=0.1)
        for step in range(6):
            a.grad = torch.sin(a.detach() * (step + 1))
            b.grad = torch.cos(b.detach() * (step + 1)) if step >= 2 else None
            with use_backend("reference"):
                opt.step()
        runs[cls] = (a, b, opt)
    a, b, opt = runs[PagedAdamW]
    ta, tb, topt = runs[torch.optim.AdamW]
    assert opt.state[a]["step"] == 6 and opt.state[b]["step"] == 4 == int(topt.state[tb]["step"])
    _relative_close(a, ta, 1e-6, "a")
    _relative_close(b, tb, 1e-6, "b")


# ---------------------------------------------------------------------------------------------
# 8-bit: training quality and memory
# ---------------------------------------------------------------------------------------------


def _train(opt_cls, model: torch.nn.Module, batches, steps: int, lr: float) -> float:
    model = copy.deepcopy(model)
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-2)
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return sum(torch.nn.functional.mse_loss(model(x), y).item() for x, y in batches) / len(batches)


def test_8bit_regression_loss_within_5_percent_of_32bit():
    d_in, d_out = 96, 64  # 6144 weights: 8-bit states
    teacher = torch.randn(d_out, d_in) / d_in**0.5
    batches = []
    for _ in range(4):
        x = torch.randn(128, d_in)
        batches.append((x, x @ teacher.t() + 0.1 * torch.randn(128, d_out)))  # noise floor 0.01
    model = torch.nn.Linear(d_in, d_out)
    initial = _train(PagedAdamW, model, batches, 0, 1e-2)
    with use_backend("reference"):
        loss32 = _train(PagedAdamW, model, batches, 300, 1e-2)
        loss8 = _train(PagedAdamW8bit, model, batches, 300, 1e-2)
    assert loss32 < 0.05 * initial, (initial, loss32)  # it trained
    assert abs(loss8 - loss32) <= 0.05 * loss32, (loss8, loss32)


class _LoRALinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, r: int):
        super().__init__()
        out_f, in_f = weight.shape
        self.register_buffer("weight", weight.clone())
        self.lora_A = torch.nn.Parameter(torch.randn(r, in_f) / in_f**0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(out_f, r))

    def forward(self, x):
        return x @ self.weight.t() + (x @ self.lora_A.t()) @ self.lora_B.t()


def test_8bit_minilm_lora_loss_within_5_percent_of_32bit():
    """LoRA (r=16: 6144-element A and B, 8-bit states) on two frozen MiniLM-L6 projections,
    fitting a target made by low-rank changes of the same weights (plus noise)."""
    weights = minilm_linear_weights()
    wq = weights["encoder.layer.0.attention.self.query.weight"].float()
    wo = weights["encoder.layer.0.attention.output.dense.weight"].float()
    d = wq.shape[1]
    model = torch.nn.Sequential(_LoRALinear(wq, 16), torch.nn.GELU(), _LoRALinear(wo, 16))
    delta = [torch.randn(d, 4) @ torch.randn(4, d) * (0.05 / d**0.5) for _ in range(2)]
    batches = []
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(64, d)
            h = torch.nn.functional.gelu(x @ (wq + delta[0]).t())
            y = h @ (wo + delta[1]).t()
            batches.append((x, y + 0.01 * y.std() * torch.randn_like(y)))
    initial = _train(PagedAdamW, model, batches, 0, 2e-3)
    with use_backend("reference"):
        loss32 = _train(PagedAdamW, model, batches, 120, 2e-3)
        loss8 = _train(PagedAdamW8bit, model, batches, 120, 2e-3)
    assert loss32 < 0.5 * initial, (initial, loss32)
    assert abs(loss8 - loss32) <= 0.05 * loss32, (loss8, loss32)


def test_8bit_state_bytes_at_most_027_of_32bit():
    shapes = [(384, 384), (1536, 384), (16, 384), (384, 16), (384,)]
    sizes = {}
    for cls in (PagedAdamW, PagedAdamW8bit):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = cls(params)
        for p in params:
            p.grad = torch.randn_like(p)
        with use_backend("reference"):
            opt.step()
        sizes[cls] = opt.state_bytes()
    n = sum(torch.Size(s).numel() for s in shapes)
    assert sizes[PagedAdamW] >= 8 * n
    assert sizes[PagedAdamW8bit] <= 0.27 * sizes[PagedAdamW], sizes


# ---------------------------------------------------------------------------------------------
# Checkpoints: save -> load -> continue == uninterrupted, bit for bit
# ---------------------------------------------------------------------------------------------


def _model_and_data():
    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    data = [(torch.randn(16, 80), torch.randn(16, 8)) for _ in range(10)]
    return model, data


def _make_opt(cls, model):
    params = list(model.parameters())
    return cls([{"params": params[:2]}, {"params": params[2:], "lr": 2e-3}], lr=5e-3, weight_decay=0.1)


def _steps(model, opt, sched, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_state_dict_resume_is_bit_exact(cls):
    model, data = _model_and_data()
    resumed = copy.deepcopy(model)
    with use_backend("reference"):
        opt = _make_opt(cls, model)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        _steps(model, opt, sched, data)

        opt2 = _make_opt(cls, resumed)
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, 3, 0.5)
        _steps(resumed, opt2, sched2, data[:6])
        buf = io.BytesIO()
        torch.save({"model": resumed.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, buf)
        del opt2, sched2
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)

        fresh = copy.deepcopy(resumed)
        fresh.load_state_dict(ckpt["model"])
        opt3 = _make_opt(cls, fresh)
        sched3 = torch.optim.lr_scheduler.StepLR(opt3, 3, 0.5)
        opt3.load_state_dict(ckpt["opt"])
        sched3.load_state_dict(ckpt["sched"])
        _steps(fresh, opt3, sched3, data[6:])

    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert_same_bits(b.detach(), a.detach(), name)
        sa, sb = opt.state[a], opt3.state[b]
        assert sa["step"] == sb["step"] == 10
        for key in sa:
            if key != "step":
                assert_same_bits(sb[key], sa[key], f"{name} {key}")
    assert opt3.param_groups[1]["lr"] == opt.param_groups[1]["lr"]
    if cls is PagedAdamW8bit:
        assert "exp_avg_q" in opt.state[model[0].weight]  # 80x64 = 5120: 8-bit


def test_deepcopy_continues_identically():
    model, data = _model_and_data()
    with use_backend("reference"):
        opt = _make_opt(PagedAdamW8bit, model)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        _steps(model, opt, sched, data[:3])
        model2, opt2 = copy.deepcopy((model, opt))
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, 3, 0.5)
        sched2.load_state_dict(sched.state_dict())
        _steps(model, opt, sched, data[3:6])
        _steps(model2, opt2, sched2, data[3:6])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert_same_bits(b.detach(), a.detach(), "param")
    assert opt2.state_bytes() == opt.state_bytes()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, the optimizer unchanged
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.randn(4))], **kwargs)
    with pytest.raises(ValueError, match=match):
        cls([{"params": [torch.nn.Parameter(torch.randn(4))], **kwargs}])


def test_bad_params():
    with pytest.raises(TypeError, match="complex"):
        PagedAdamW([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="float32"):
        PagedAdamW([torch.zeros(4, dtype=torch.int32)])
    with pytest.raises(TypeError, match="paged"):
        PagedAdamW([torch.nn.Parameter(torch.randn(4))], paged="yes")
    opt = PagedAdamW([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1


def _snapshot(opt, params):
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in params], state, groups


def _assert_unchanged(opt, params, snap):
    values, state, groups = snap
    for p, v in zip(params, values):
        assert_same_bits(p.detach(), v, "param")
        assert set(opt.state[p]) == set(state[id(p)])
        for k, val in state[id(p)].items():
            if torch.is_tensor(val):
                assert_same_bits(opt.state[p][k], val, k)
            else:
                assert opt.state[p][k] == val
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def _stepped(cls, shapes=((80, 64), (64,))):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = cls(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    with use_backend("reference"):
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_sparse_grad_rejected_before_any_update(cls):
    params, opt = _stepped(cls)
    snap = _snapshot(opt, params)
    params[0].grad = torch.randn_like(params[0])  # valid, and first: must not be applied either
    params[1].grad = torch.randn(64).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_bad_lr_set_later_rejected_before_any_update(cls):
    params, opt = _stepped(cls)
    snap = _snapshot(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = 1e-2
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_foreign_state_dicts_rejected_unchanged(cls):
    params, opt = _stepped(cls)
    snap = _snapshot(opt, params)

    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(torch_params)
    for p in torch_params:
        p.grad = torch.randn_like(p)
    torch_opt.step()
    with pytest.raises(ValueError, match="torch.optim"):
        opt.load_state_dict(torch_opt.state_dict())

    other_cls = PagedAdamW if cls is PagedAdamW8bit else PagedAdamW8bit
    _, other = _stepped(other_cls)
    with pytest.raises(ValueError, match=other_cls.__name__):
        opt.load_state_dict(other.state_dict())

    _, other_shapes = _stepped(cls, shapes=((70, 64), (64,)))
    with pytest.raises(ValueError, match="expected"):
        opt.load_state_dict(other_shapes.state_dict())

    _, fewer = _stepped(cls, shapes=((80, 64),))
    with pytest.raises(ValueError, match="params"):
        opt.load_state_dict(fewer.state_dict())

    bad = opt.state_dict()
    bad["param_groups"][0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="betas"):
        opt.load_state_dict(bad)

    bad = opt.state_dict()
    bad["state"][1]["step"] = -3
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(bad)

    with pytest.raises(TypeError):
        opt.load_state_dict([1, 2])
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_duplicate_params_rejected_unchanged(cls):
    """torch.optim only warns about a parameter listed twice in a group; stepping it would apply two
    updates while its state counts one. Rejected, as torch rejects one in two groups."""
    p, q = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's duplicate warning must not be what stops it
        with pytest.raises(ValueError, match="more than once, at 0 and 2"):
            cls([p, q, p])
    with pytest.raises(ValueError, match="already in param group 0"):
        cls([{"params": [p]}, {"params": [q, p]}])
    opt = cls([p], lr=1e-2)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [q, q]})
    with pytest.raises(ValueError, match="parameter 0 .* already in param group 0"):
        opt.add_param_group({"params": p})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p]
    opt.add_param_group({"params": [q]})  # still usable
    p0 = p.detach().clone()
    p.grad = torch.ones(8)
    opt.step()
    assert opt.state[p]["step"] == 1
    expected = p0.clone()
    ref.adamw_step_32bit(expected, torch.ones(8), torch.zeros(8), torch.zeros(8), 1e-2, 0.9, 0.999, 1e-8, 1e-2, 1)
    assert_same_bits(p.detach(), expected, "one update")


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_state_dict_listing_a_param_id_twice_rejected_unchanged(cls):
    params, opt = _stepped(cls)
    snap = _snapshot(opt, params)
    bad = opt.state_dict()
    bad["param_groups"][0]["params"] = [0, 0]  # would give param 1 param 0's state and drop its own
    with pytest.raises(ValueError, match="param id 0 a second time"):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, params, snap)


# ---------------------------------------------------------------------------------------------
# torch.optim API: load_state_dict hooks, named parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_load_state_dict_hooks_run_as_torch_optims(cls):
    """Pre-hooks run first on a shallow copy (one may substitute the state dict), post-hooks after
    loading; a removed hook no longer runs; a substituted invalid dict still changes nothing."""
    source_params, source = _stepped(cls)
    saved = source.state_dict()
    params, opt = _stepped(cls)
    calls = []

    def pre(o, sd):
        calls.append(("pre", o is opt, sd is not passed, sd.get("substitute_me")))
        return saved  # used instead of what load_state_dict was given

    def pre_after(o, sd):
        calls.append(("pre_after", sd is saved))  # a later pre-hook sees the substitute

    def post(o):
        calls.append("post")
        for p, q in zip(params, source_params):  # the substitute's states are loaded by now
            for key, v in source.state[q].items():
                if torch.is_tensor(v):
                    assert_same_bits(o.state[p][key], v, key)
                else:
                    assert o.state[p][key] == v

    handles = [opt.register_load_state_dict_pre_hook(pre), opt.register_load_state_dict_pre_hook(pre_after),
               opt.register_load_state_dict_post_hook(post)]
    passed = {"substitute_me": True}  # not a state dict: loading it without the pre-hook raises
    opt.load_state_dict(passed)
    assert calls == [("pre", True, True, True), ("pre_after", True), "post"]
    assert passed == {"substitute_me": True}

    # An invalid substitute raises before any change; the post-hook does not run.
    bad = copy.deepcopy(saved)
    bad["state"][0]["step"] = -1
    handles[0].remove()
    opt.register_load_state_dict_pre_hook(lambda o, sd: bad, prepend=True)
    snap = _snapshot(opt, params)
    calls.clear()
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(saved)
    assert calls == [("pre_after", False)]
    _assert_unchanged(opt, params, snap)

    # The same hooks on torch.optim.AdamW, for comparison.
    torch_calls = []
    topt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    tsd = topt.state_dict()
    topt.register_load_state_dict_pre_hook(lambda o, sd: torch_calls.append(("pre", sd is not tsd)))
    topt.register_load_state_dict_post_hook(lambda o: torch_calls.append("post"))
    topt.load_state_dict(tsd)
    assert torch_calls == [("pre", True), "post"]


def _named_groups(model, named: bool):
    items = list(model.named_parameters())
    if not named:
        items = [p for _, p in items]
    return [{"params": items[:2]}, {"params": items[2:], "lr": 2e-3}]


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_named_parameters_train_bit_identically_and_keep_names(cls):
    model, data = _model_and_data()
    names = [n for n, _ in model.named_parameters()]
    models, opts = {}, {}
    with use_backend("reference"):
        for named in (False, True):
            models[named] = copy.deepcopy(model)
            opts[named] = cls(_named_groups(models[named], named), lr=5e-3, weight_decay=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opts[named], 3, 0.5)
            _steps(models[named], opts[named], sched, data[:5])
        # The flat form, as torch.optim.AdamW(model.named_parameters()).
        flat = cls(copy.deepcopy(model).named_parameters())
    for (name, a), b in zip(models[False].named_parameters(), models[True].parameters()):
        assert_same_bits(b.detach(), a.detach(), name)
    opt = opts[True]
    assert [g.get("param_names") for g in opt.param_groups] == [names[:2], names[2:]]
    assert all("param_names" not in g for g in opts[False].param_groups)
    assert flat.param_groups[0]["param_names"] == names
    assert all(isinstance(p, torch.Tensor) for p in flat.param_groups[0]["params"])
    torch_opt = torch.optim.AdamW(_named_groups(copy.deepcopy(model), True))
    sd = opt.state_dict()
    assert [g["param_names"] for g in sd["param_groups"]] == [g["param_names"] for g in torch_opt.state_dict()["param_groups"]]

    # Round trip through torch.save: the names come back, and resuming stays bit exact.
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed_model = copy.deepcopy(models[True])
    resumed = cls(_named_groups(resumed_model, True), lr=1.0)
    resumed.load_state_dict(ckpt)
    assert [g["param_names"] for g in resumed.param_groups] == [names[:2], names[2:]]
    assert resumed.param_groups[1]["lr"] == opt.param_groups[1]["lr"]
    with use_backend("reference"):
        for m, o in ((models[True], opt), (resumed_model, resumed)):
            sched = torch.optim.lr_scheduler.StepLR(o, 3, 0.5)
            _steps(m, o, sched, data[5:])
    for (name, a), b in zip(models[True].named_parameters(), resumed_model.parameters()):
        assert_same_bits(b.detach(), a.detach(), name)

    # As torch.optim: saved names replace a group's (also where it had none); a saved group
    # without names leaves the group's own.
    for named_opt, named_sd in ((False, True), (True, False)):
        ours = cls(_named_groups(copy.deepcopy(model), named_opt))
        theirs = torch.optim.AdamW(_named_groups(copy.deepcopy(model), named_opt))
        src = opts[named_sd].state_dict()
        torch_src = torch.optim.AdamW(_named_groups(copy.deepcopy(model), named_sd)).state_dict()
        ours.load_state_dict(src)
        theirs.load_state_dict(torch_src)
        got = [g.get("param_names") for g in ours.param_groups]
        assert got == [g.get("param_names") for g in theirs.param_groups] == [names[:2], names[2:]]


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_mixed_named_and_unnamed_params_rejected_as_torch_does(cls):
    p, q, r = (torch.nn.Parameter(torch.randn(8)) for _ in range(3))
    for make in (torch.optim.AdamW, cls):  # the same cases are errors in torch.optim
        with pytest.raises(ValueError, match="with/without names"):
            make([("p", p), q])
        with pytest.raises(ValueError, match="with/without names"):
            make([{"params": [("p", p)]}, {"params": [q]}])
        with pytest.raises(ValueError, match="with/without names"):
            make([{"params": [p]}, {"params": [("q", q)]}])
    opt = cls([("p", p)], lr=1e-2)
    with pytest.raises(ValueError, match="without names"):
        opt.add_param_group({"params": [q]})
    with pytest.raises(TypeError, match="pair"):
        opt.add_param_group({"params": [("q", q, r)]})
    with pytest.raises(TypeError, match="float32"):
        opt.add_param_group({"params": [("q", torch.zeros(3, dtype=torch.int64))]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [("q", q), ("r", r)], "lr": 1e-3})
    assert opt.param_groups[1]["param_names"] == ["q", "r"] and opt.param_groups[1]["params"] == [q, r]
    unnamed = cls([p])
    with pytest.raises(ValueError, match="with names"):
        unnamed.add_param_group({"params": [("q", q)]})
    assert len(unnamed.param_groups) == 1

    # Malformed saved names: rejected, nothing changed.
    for pp in (p, q, r):
        pp.grad = torch.randn(8)
    with use_backend("reference"):
        opt.step()
    snap = _snapshot(opt, [p, q, r])
    for bad_names in (["q"], "qr", ["q", 3]):
        bad = opt.state_dict()
        bad["param_groups"][1]["param_names"] = bad_names
        with pytest.raises(ValueError, match="param_names"):
            opt.load_state_dict(bad)
    _assert_unchanged(opt, [p, q, r], snap)
    assert opt.param_groups[1]["param_names"] == ["q", "r"]
