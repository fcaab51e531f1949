"""PagedAdamW / PagedAdamW8bit on a CUDA GPU: states in managed memory, prefetch / page_out,
no memory growth, GPU kernels bit-identical to the CPU reference.

Needs a GPU and libqlora_kernels.so (bench/device_check.sh builds it on a lent GPU). Sizes stay
at a few MB of managed memory: asking a lent card for more managed memory than it has free can
hang the machine (DESIGN.md section 5).
"""

from __future__ import annotations

import gc

import pytest
import torch

from qlora_kernels import PagedAdamW, PagedAdamW8bit, use_backend
from qlora_kernels.optim import is_managed, managed_memory_support

from python_tests.helpers import assert_same_bits

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/device_check.sh on a lent GPU)"
)

CLASSES = [PagedAdamW, PagedAdamW8bit]
SHAPES = ((512, 384), (384,), (16, 1024), (1000, 37))


@pytest.fixture
def managed():
    ok, can_prefetch, why = managed_memory_support("cuda")
    if not ok:
        pytest.skip(f"managed optimizer states unavailable here: {why}")
    return can_prefetch


def _params(device="cuda", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in SHAPES]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) for p in params]


def _run(cls, params, steps, backend=None, paged=True, between=None):
    opt = cls(params, lr=1e-2, weight_decay=0.1, paged=paged)
    with use_backend(backend):
        for i in range(steps):
            for p, g in zip(params, _grads(params, i)):
                p.grad = g
            opt.step()
            if between is not None:
                between(opt)
    return opt


@pytest.mark.parametrize("cls", CLASSES)
def test_states_are_managed_cuda_tensors(cls, managed):
    params = _params()
    opt = _run(cls, params, 1)
    for p in params:
        for key, t in opt.state[p].items():
            if torch.is_tensor(t):
                assert t.device == p.device, key
                assert is_managed(t), f"state {key} of a {tuple(p.shape)} param is not managed memory"
    assert opt.managed_state_bytes() == opt.state_bytes() > 0
    ordinary = _run(cls, _params(), 1, paged=False)
    assert ordinary.managed_state_bytes() == 0
    assert not any(is_managed(t) for st in ordinary.state.values() for t in st.values() if torch.is_tensor(t))
    assert not is_managed(params[0].detach())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_match_cpu_reference_bit_for_bit(cls, dtype):
    gpu = _params("cuda", dtype)
    cpu = _params("cpu", dtype)
    gpu_opt = _run(cls, gpu, 4, backend="triton")
    cpu_opt = _run(cls, cpu, 4, backend="reference")
    for a, b in zip(gpu, cpu):
        assert_same_bits(a.detach().cpu(), b.detach(), f"param {tuple(a.shape)}")
        for key, t in gpu_opt.state[a].items():
            if torch.is_tensor(t):
                assert_same_bits(t.cpu(), cpu_opt.state[b][key], f"{key} of {tuple(a.shape)}")


def _reserved() -> tuple[int, int]:
    torch.cuda.synchronize()
    gc.collect()
    return torch.cuda.memory_reserved(), torch.cuda.memory_allocated()


@pytest.mark.parametrize("cls", CLASSES)
def test_create_destroy_cycles_do_not_grow_memory(cls, managed):
    params = _params()

    def cycle():
        opt = _run(cls, params, 1)
        opt.page_out()
        del opt

    for _ in range(3):
        cycle()
    before = _reserved()
    for _ in range(100):
        cycle()
    after = _reserved()
    assert after == before, f"(reserved, allocated) grew from {before} to {after} over 100 cycles"


@pytest.mark.parametrize("cls", CLASSES)
def test_page_out_and_prefetch_round_trip_bit_identical(cls, managed):
    def snapshot(opt):
        return {(i, k): t.clone() for i, st in enumerate(opt.state.values()) for k, t in st.items() if torch.is_tensor(t)}

    params = _params()
    opt = _run(cls, params, 2)
    saved = snapshot(opt)
    opt.page_out()
    torch.cuda.synchronize()
    for key, t in snapshot(opt).items():
        assert_same_bits(t, saved[key], f"after page_out {key}")
    opt.prefetch()
    torch.cuda.synchronize()
    for key, t in snapshot(opt).items():
        assert_same_bits(t, saved[key], f"after prefetch {key}")

    # Paging out between every step changes nothing in the results.
    paged_params, plain_params = _params(), _params()
    paged = _run(cls, paged_params, 3, between=lambda o: o.page_out())
    plain = _run(cls, plain_params, 3)
    for a, b in zip(paged_params, plain_params):
        assert_same_bits(a.detach(), b.detach(), f"param {tuple(a.shape)}")
    del paged, plain


@pytest.mark.parametrize("cls", CLASSES)
def test_step_on_a_side_stream(cls, managed):
    params, ref_params = _params(), _params()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt = _run(cls, params, 3)
        opt.page_out()
        opt.prefetch()
    torch.cuda.current_stream().wait_stream(side)
    _run(cls, ref_params, 3)
    for a, b in zip(params, ref_params):
        assert_same_bits(a.detach(), b.detach(), f"param {tuple(a.shape)}")
