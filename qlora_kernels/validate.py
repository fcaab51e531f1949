"""`python -m qlora_kernels validate`: every op of every available backend against the reference on
this machine's device, as a table; exit code 1 on any failure.

Exact ops (quantization) must match the reference bit for bit. The fused linear is checked by
DESIGN.md section 6's rule: its error against a float64 reference must be at most 2x the error of
the same computation done by PyTorch in the low precision, plus a tiny atol.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Row:
    op: str
    backend: str
    shape: str
    dtype: str
    err: float
    bound: float
    ok: bool
    note: str = ""


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of differing bytes (0.0 = bit-identical)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return 1.0
    x = a.contiguous().reshape(-1).view(torch.uint8)
    y = b.contiguous().reshape(-1).view(torch.uint8)
    return (x != y).float().mean().item()


def _quant_checks(device: torch.device, quick: bool):
    import qlora_kernels as qk

    shapes = [(37, 101), (4097,), (256, 320)] if quick else [(37, 101), (4097,), (256, 320), (1, 33), (1024, 1024)]
    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16]
    blocksizes = [64, 256] if quick else [32, 64, 128, 256, 1024, 4096]
    for shape in shapes:
        for dtype in dtypes:
            for blocksize in blocksizes:
                for quant_type, dq in (("nf4", True), ("fp4", False)):
                    w = torch.randn(shape, device=device).to(dtype)
                    label = f"{quant_type}{'+dq' if dq else ''} bs{blocksize}"

                    def run(backend, w=w, quant_type=quant_type, blocksize=blocksize, dq=dq):
                        with qk.use_backend(backend):
                            packed, state = qk.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=dq)
                            return packed, state, qk.dequantize_4bit(packed, state)

                    yield label, "x".join(map(str, shape)), dtype, run


def _compare_quant(expected, actual) -> float:
    (p0, s0, d0), (p1, s1, d1) = expected, actual
    parts = [_bits_differ(p1, p0), _bits_differ(s1.absmax, s0.absmax), _bits_differ(d1 + 0.0, d0 + 0.0)]
    if s0.nested:
        parts += [_bits_differ(s1.nested_absmax, s0.nested_absmax), _bits_differ(s1.offset, s0.offset)]
    return max(parts)


def _linear_checks(device: torch.device, quick: bool):
    """The QLoRA linear, forward and backward (Y, dX, dA, dB), for activation/LoRA dtype pairs
    (bf16 activations with fp32 adapters: QLoRALinear's default)."""
    import qlora_kernels as qk

    from . import reference as ref

    if not hasattr(qk, "qlora_linear"):
        return
    shapes = [(1, 320, 200, 16), (37, 256, 128, 8)] if quick else [
        (1, 320, 200, 16), (37, 256, 128, 8), (129, 320, 200, 64), (16, 512, 384, 1)]
    f32, bf16 = torch.float32, torch.bfloat16
    for m, k, n, r in shapes:
        for xdt, ldt in ((f32, f32), (bf16, bf16), (bf16, f32)):
            w = torch.randn(n, k, device=device) * 0.05
            packed, state = qk.quantize_4bit(w)
            x = torch.randn(m, k, device=device).to(xdt)
            a = (torch.randn(r, k, device=device) * 0.05).to(ldt)
            b = (torch.randn(n, r, device=device) * 0.05).to(ldt)
            bias = torch.randn(n, device=device).to(xdt)
            gy = torch.randn(m, n, device=device).to(xdt)

            def leaves(x=x, a=a, b=b):
                return [t.detach().clone().requires_grad_() for t in (x, a, b)]

            def run(backend, gy=gy, bias=bias, packed=packed, state=state):
                xx, aa, bb = leaves()
                with qk.use_backend(backend):
                    y = qk.qlora_linear(xx, packed, state, aa, bb, 2.0, bias)
                    y.backward(gy)
                return [y.detach(), xx.grad, aa.grad, bb.grad]

            def exact(x=x, a=a, b=b, gy=gy, bias=bias, packed=packed, state=state):
                with qk.use_backend("reference"):
                    wd = qk.dequantize_4bit(packed, state, dtype=torch.float32).double()
                y, t = ref.qlora_linear_forward(x, wd, a, b, 2.0, bias, compute_dtype=torch.float64)
                dx, da, db, _ = ref.qlora_linear_backward(gy, x, t, wd, a, b, 2.0, compute_dtype=torch.float64)
                return [y, dx, da, db]

            def lowp(gy=gy, bias=bias, packed=packed, state=state, xdt=xdt, ldt=ldt):
                # As bitsandbytes + PEFT compute it: W dequantized to the activation dtype, the
                # LoRA path in the adapters' dtype, autograd for the gradients.
                with qk.use_backend("reference"):
                    wl = qk.dequantize_4bit(packed, state, dtype=xdt)
                xx, aa, bb = leaves()
                y = torch.nn.functional.linear(xx, wl, bias) + (2.0 * (xx.to(ldt) @ aa.T) @ bb.T).to(xdt)
                y.backward(gy)
                return [y.detach(), xx.grad, aa.grad, bb.grad]

            dtype = str(xdt).removeprefix("torch.") + ("" if ldt == xdt else "/" + str(ldt).removeprefix("torch."))
            yield f"qlora_linear r{r}", f"{m}x{k}->{n}", dtype, run, exact, lowp


def _adamw_checks(device: torch.device, quick: bool):
    """Three AdamW steps of each state kind from the same start; states and params must match the
    reference bit for bit (the spec fixes every fp32 rounding)."""
    sizes = [(4097,), (300, 257)] if quick else [(4097,), (300, 257), (5,), (1 << 16,)]
    for size in sizes:
        for p_dtype in (torch.float32, torch.bfloat16):
            p0 = torch.randn(size, device=device).to(p_dtype)
            grads = [torch.randn(size, device=device).to(p_dtype) for _ in range(3)]
            for kind in ("32bit", "8bit"):
                def run(backend, p0=p0, grads=grads, kind=kind):
                    from . import reference as ref

                    p = p0.clone()
                    nb = -(-p.numel() // ref.ADAMW_8BIT_BLOCKSIZE)
                    if kind == "32bit":
                        states = [torch.zeros(p.shape, device=device), torch.zeros(p.shape, device=device)]
                    else:
                        states = [torch.zeros(p.shape, dtype=torch.uint8, device=device), torch.zeros(nb, device=device),
                                  torch.zeros(p.shape, dtype=torch.uint8, device=device), torch.zeros(nb, device=device)]
                    from .backends import use_backend

                    with use_backend(backend):
                        for step, g in enumerate(grads, 1):
                            if kind == "32bit":
                                torch.ops.qlora.adamw_step_32bit(p, g, *states, 1e-2, 0.9, 0.999, 1e-8, 0.01, step)
                            else:
                                torch.ops.qlora.adamw_step_8bit(p, g, *states, 1e-2, 0.9, 0.999, 1e-8, 0.01, step,
                                                                ref.ADAMW_8BIT_BLOCKSIZE)
                    return [p, *states]

                yield f"adamw_step_{kind}", "x".join(map(str, size)), p_dtype, run


def validate(backends: Optional[list[str]] = None, quick: bool = False, out=None) -> list[Row]:
    from .backends import BACKENDS, availability

    out = sys.stdout if out is None else out

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[Row] = []
    wanted = backends or list(BACKENDS)
    usable = []
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}", file=out)
    for name in wanted:
        ok, why = availability(name, device)
        if ok:
            usable.append(name)
        else:
            print(f"backend {name}: unavailable on {device} ({why})", file=out)

    torch.manual_seed(0)
    for label, shape, dtype, run in _quant_checks(device, quick):
        expected = run("reference")
        for name in usable:
            got = _attempt(run, name, rows, label, shape, dtype)
            if got is None:
                continue
            err = _compare_quant(expected, got)
            rows.append(Row(label, name, shape, str(dtype).removeprefix("torch."), err, 0.0, err == 0.0,
                            "bit-identical" if err == 0.0 else "bytes differ"))
    for label, shape, dtype, run in _adamw_checks(device, quick):
        expected = run("reference")
        for name in usable:
            got = _attempt(run, name, rows, label, shape, dtype)
            if got is None:
                continue
            err = max(_bits_differ(a, b) for a, b in zip(got, expected))
            rows.append(Row(label, name, shape, str(dtype).removeprefix("torch."), err, 0.0, err == 0.0,
                            "bit-identical" if err == 0.0 else "bytes differ"))
    for label, shape, dtype, run, exact, lowp in _linear_checks(device, quick):
        # Each output by the numerics rule (DESIGN.md section 6): error <= 2x PyTorch's low-precision error.
        ref64, low = exact(), lowp()
        for name in usable:
            outs = _attempt(run, name, rows, label, shape, dtype)
            if outs is None:
                continue
            for what, got, e, lo in zip(("Y", "dX", "dA", "dB"), outs, ref64, low):
                scale = e.abs().max().item() or 1.0
                bound = 2.0 * (lo.double() - e).abs().max().item() / scale + 1e-6
                err = (got.double() - e).abs().max().item() / scale
                ok = bool(torch.isfinite(got).all()) and err <= bound
                rows.append(Row(f"{label} {what}", name, shape, dtype, err, bound, ok))
    _print_table(rows, out)
    return rows


def _attempt(run, backend, rows, label, shape, dtype):
    """run(backend), or None after recording an "n/a" row when the backend lacks this op (e.g. the
    cuda backend has no kernel for it): missing is not wrong, and the table says so."""
    from .backends import BackendUnavailableError

    try:
        return run(backend)
    except BackendUnavailableError as e:
        rows.append(Row(label, backend, shape, str(dtype).removeprefix("torch."), float("nan"), float("nan"), True,
                        f"n/a: {e}"))
        return None


def _print_table(rows: list[Row], out) -> None:
    header = f"{'op':22s} {'backend':9s} {'shape':14s} {'dtype':16s} {'max rel err':>11s} {'bound':>9s}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        result = ("n/a" if r.note.startswith("n/a") else "pass") if r.ok else "FAIL"
        note = f" ({r.note.removeprefix('n/a: ')})" if r.note else ""
        print(f"{r.op:22s} {r.backend:9s} {r.shape:14s} {r.dtype:16s} {r.err:11.3e} {r.bound:9.2e}  {result}{note}", file=out)
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed", file=out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_kernels validate", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=["reference", "triton", "cuda"],
                        help="check only this backend (repeatable); default: every available one")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (CI)")
    args = parser.parse_args(argv)
    rows = validate(args.backend, args.quick)
    if not rows:
        print("no check ran", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in rows) else 1


def prepare_environment() -> None:
    """Without a GPU, the Triton kernels can run only under the interpreter, which must be chosen
    before they are defined: set it before anything imports them."""
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


