"""Triton kernels on a real GPU (skipped without one; run by bench/device_check.sh when a GPU is
lent): bit-identity with the reference computed on the same GPU, which the interpreter cannot
prove for div_rn / FMA contraction / bf16 rounding."""

import pytest
import torch

import qlora_kernels as qk
from python_tests.conftest import requires_cuda
from python_tests.helpers import assert_same_bits, graph_and_two_stream_runs

pytestmark = requires_cuda


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# Each blocksize x dtype is a fresh Triton compile on the GPU machine (~1 s): the ends and the
# default keep the device check inside its budget; the interpreter tests cover every blocksize.
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(37, 101), (4097,), (1024, 1000)])
def test_quantize_dequantize_bit_identical_on_gpu(quant_type, double_quant, dtype, blocksize, shape):
    w = torch.randn(shape, device="cuda").to(dtype)
    results = {}
    for backend in ("reference", "triton"):
        with qk.use_backend(backend):
            packed, state = qk.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
            results[backend] = (packed, state, qk.dequantize_4bit(packed, state))
    (p0, s0, d0), (p1, s1, d1) = results["reference"], results["triton"]
    assert_same_bits(p1, p0, "packed")
    assert_same_bits(s1.absmax, s0.absmax, "absmax")
    if double_quant:
        assert_same_bits(s1.nested_absmax, s0.nested_absmax, "nested absmax")
    assert_same_bits(d1, d0, "dequantized")
    # and the GPU bytes equal the CPU reference's (the offset is a torch.mean on each device)
    with qk.use_backend("reference"):
        p_cpu, _ = qk.quantize_4bit(w.cpu(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    assert_same_bits(p1.cpu(), p_cpu, "packed vs CPU reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_blockwise_8bit_bit_identical_on_gpu(dtype):
    x = (torch.randn(100003, device="cuda") * torch.logspace(-6, 1, 100003, device="cuda")).to(dtype)
    out = {}
    for backend in ("reference", "triton"):
        with qk.use_backend(backend):
            q, absmax = qk.quantize_blockwise(x)
            out[backend] = (q, absmax, qk.dequantize_blockwise(q, absmax, dtype=dtype))
    for a, b, what in zip(out["triton"], out["reference"], ("codes", "absmax", "decoded")):
        assert_same_bits(a, b, what)


def _decode_problem(m, n, k, ldt, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    packed, state = qk.quantize_4bit(w, blocksize=64, double_quant=True)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    a = (torch.randn(16, k, device="cuda", generator=g) / k**0.5).to(ldt)
    b = (torch.randn(n, 16, device="cuda", generator=g) * 0.1).to(ldt)
    bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    return x, packed, state, a, b, bias


def _decode_truth(x, packed, state, a, b, bias, scale):
    with qk.use_backend("reference"):
        w = qk.dequantize_4bit(packed, state, torch.float32).double()
    t = x.double() @ a.double().t()
    return x.double() @ w.t() + scale * t @ b.double().t() + bias.double(), t


@pytest.mark.parametrize("ldt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (5, 11008, 4096), (16, 4096, 11008), (1, 200, 320)])
def test_decode_kernel_one_launch_on_gpu(m, n, k, ldt):
    """The one-launch small-M kernel on the GPU's own split-K and T-item counts: Y and T right,
    50 launches bit-identical (the split sums run in a fixed order), counters back to zero."""
    from qlora_kernels.backends.triton import qlora_linear_small_m as tql_small

    x, packed, state, a, b, bias = _decode_problem(m, n, k, ldt)
    scale = 2.0
    with qk.use_backend("triton"), torch.no_grad():
        first = qk.qlora_linear(x, packed, state, a, b, scale, bias)
        again = [qk.qlora_linear(x, packed, state, a, b, scale, bias) for _ in range(50)]
    torch.cuda.synchronize()
    want, _ = _decode_truth(x, packed, state, a, b, bias, scale)
    rel = ((first.double() - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel  # bf16 operands and one bf16 rounding of Y (the bench checks the same bound)
    for y in again:
        assert_same_bits(y, first, "repeated decode launch")
    assert int(tql_small.sync_counters(x.device, 0).abs().sum()) == 0  # this stream's buffer


def test_decode_kernel_under_cuda_graph_and_two_streams():
    """Replayed from a CUDA graph (counters made inside the capture) and run on two streams at
    once (one counter buffer per stream), the decode kernel gives the eager launch's bits."""
    x, packed, state, a, b, bias = _decode_problem(1, 4096, 4096, torch.float32, seed=1)

    def run(inp):
        with qk.use_backend("triton"), torch.no_grad():
            return qk.qlora_linear(inp, packed, state, a, b, 2.0, bias)

    eager, static_y, outs = graph_and_two_stream_runs(run, x)
    assert_same_bits(static_y, eager, "graph replay")
    for y in outs:
        assert_same_bits(y, eager, "two-stream decode")


@pytest.mark.parametrize("xdt,blocksize,quant_type", [(torch.bfloat16, 64, "nf4"), (torch.float16, 32, "fp4"),
                                                      (torch.float32, 128, "nf4")], ids=str)
def test_decode_path_on_gpu(xdt, blocksize, quant_type):
    """The decode path (M <= 2; warp-shuffle code lookup, compiled only on a GPU: the interpreter runs
    a gather in its place) against float64 and against the tensor-core tiles on the same input: both
    within the rounding of Y (the tiles: the bound of the test above), 50 launches bit-identical,
    strided x and two rows too."""
    from qlora_kernels.backends.triton import qlora_linear as tql
    from qlora_kernels.backends.triton import qlora_linear_small_m as tql_small

    g = torch.Generator(device="cuda").manual_seed(3)
    n, k = 4096 + 72, 4096 + max(64, blocksize)  # a short last tile; a K tail where K % blocksize allows
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    packed, st = qk.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=True)
    wide = torch.randn(1, 2 * k, device="cuda", generator=g).to(xdt)
    a = torch.randn(16, k, device="cuda", generator=g) / k**0.5
    b = torch.randn(n, 16, device="cuda", generator=g) * 0.1
    args = tql.weight_args(packed, st.absmax, st.nested_absmax, st.nested_code, st.offset, st.quant_type)
    with qk.use_backend("reference"):
        wd = qk.dequantize_4bit(packed, st, torch.float32).double()
    two_rows = torch.randn(2, k, device="cuda", generator=g).to(xdt)
    for x in (wide[:, :k], wide[:, ::2], two_rows):
        assert tql_small.decode_eligible(x.shape[0], n, k, blocksize, packed)
        runs = [tql_small.small_m_fwd(x, None, a, args, blocksize, [n, k], b, 2.0, None, decode=True)[0]
                for _ in range(50)]
        tiles = tql_small.small_m_fwd(x, None, a, args, blocksize, [n, k], b, 2.0, None, decode=False)[0]
        torch.cuda.synchronize()
        want = x.double() @ wd.t() + 2.0 * (x.double() @ a.double().t()) @ b.double().t()
        # The decode path's only rounding of note is Y's (half an ulp, relative); the tiles also round
        # W to x's dtype, so they get the bound test_decode_kernel_one_launch_on_gpu uses.
        bound = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 1e-5}[xdt]
        for got, what, limit in ((runs[0], "decode path", bound), (tiles, "tensor-core tiles", 1e-2)):
            rel = ((got.double() - want).norm() / want.norm()).item()
            assert rel < limit, f"{what}, x stride {x.stride()}: {rel:.2e}"
        for y in runs[1:]:
            assert_same_bits(y, runs[0], "repeated decode-path launch")
