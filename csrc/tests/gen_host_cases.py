"""Write the case file of qk_host_tests from qlora_kernels.reference (the spec), and run it.

    python csrc/tests/gen_host_cases.py --out cases.txt
    python csrc/tests/gen_host_cases.py --run build/qk_host_tests     (what ctest does)

Every expected value here comes from reference.py (or torch's own dtype casts, which reference.py
uses), never from a re-derivation, so qk_math.h is held to the spec. Format: one record per line,
a kind then integers (floats as 0x bit patterns); see csrc/tests/host_tests.cpp for the layouts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qlora_kernels import reference as ref  # noqa: E402
from qlora_kernels.formats import BLOCKSIZES_4BIT, get_code  # noqa: E402

_lut_uncached = ref.dynamic_map_lut
_lut_cache: dict[bytes, torch.Tensor] = {}


def _lut_memo(code: torch.Tensor) -> torch.Tensor:
    # reference.quantize_blockwise rebuilds the 65536-entry table on every call (0.25 s); the
    # cases use a handful of codes, so remember each one's table (same function, same result).
    key = code.float().cpu().numpy().tobytes()
    if key not in _lut_cache:
        _lut_cache[key] = _lut_uncached(code)
    return _lut_cache[key].to(code.device)


QT = {"nf4": 0, "fp4": 1}
DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
MASK = {torch.float32: 0xFFFFFFFF, torch.bfloat16: 0xFFFF, torch.float16: 0xFFFF}


def bits(t: torch.Tensor) -> list[int]:
    """Bit patterns of a float tensor (fp32/bf16/fp16) as non-negative ints."""
    t = t.contiguous().reshape(-1)
    m = MASK[t.dtype]
    return [v & m for v in t.view(INT_VIEW[t.dtype]).tolist()]


def ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def neighbours(x: torch.Tensor) -> torch.Tensor:
    """x and its fp32 neighbours on both sides (the values that decide a tie rule)."""
    x = x.float().reshape(-1)
    return torch.cat([x, torch.nextafter(x, torch.full_like(x, float("inf"))),
                      torch.nextafter(x, torch.full_like(x, float("-inf")))])


def fmt(kind: str, *parts) -> str:
    out = [kind]
    for p in parts:
        out.append(" ".join(map(hex, p)) if isinstance(p, (list, tuple)) else str(p))
    return " ".join(out)


def special_floats() -> torch.Tensor:
    return f32([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3.4028234663852886e38,
                1.1754943508222875e-38, 1.401298464324817e-45, -1.401298464324817e-45, 1e-38, 5e-39, 65504.0,
                65519.996, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 6.097555e-05])


def random_magnitudes(g: torch.Generator, n: int) -> torch.Tensor:
    """Random fp32 of every magnitude (random exponent, random mantissa, random sign)."""
    exps = torch.randint(-140, 128, (n,), generator=g).float()
    mant = torch.rand(n, generator=g) + 1.0
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return (sign * mant * torch.pow(2.0, exps)).float()


def tie_patterns(low_bits: int, half: int, g: torch.Generator, n: int) -> torch.Tensor:
    """fp32 values whose dropped low bits are exactly a half ulp (plus +-1) of the target type."""
    hi = torch.randint(0, 1 << (32 - low_bits), (n,), generator=g, dtype=torch.int64) << low_bits
    vals = torch.cat([hi | half, hi | (half - 1), hi | (half + 1), hi]) & 0xFFFFFFFF
    vals = torch.where(vals >= 2**31, vals - 2**32, vals).to(torch.int32)
    return vals.view(torch.float32)


def cases(seed: int = 0) -> list[str]:
    ref.dynamic_map_lut = _lut_memo  # restored below: other users of the module see no change
    try:
        return _cases(seed)
    finally:
        ref.dynamic_map_lut = _lut_uncached


def _cases(seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lines: list[str] = []

    # 4-bit code tables and the encoder: every level, every midpoint and its neighbours (ties go
    # to the lower level), values outside [-1, 1] (the kernels clamp before encoding, but the
    # encoder alone must still agree), NaN, random values.
    for qt in ("nf4", "fp4"):
        code = get_code(qt)
        lines.append(fmt("code4", QT[qt], bits(code)))
        mids, _ = ref.sorted_levels(qt)
        x = torch.cat([neighbours(code), neighbours(mids), special_floats(),
                       torch.rand(4000, generator=g) * 2 - 1, torch.randn(500, generator=g)])
        lines.append(fmt("enc4", QT[qt], x.numel(), bits(x), ints(ref.encode_4bit(x, qt))))

    # The dynamic-map grid index and the 8-bit encoder's table of several codes.
    dyn, dynu = get_code("dynamic"), get_code("dynamic_unsigned")
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    x = torch.cat([neighbours(dyn), neighbours(0.5 * (dyn[:-1] + dyn[1:])), neighbours(grid[::97]), special_floats(),
                   torch.rand(20000, generator=g) * 2.2 - 1.1])
    x = x[~torch.isnan(x)]  # the reference cannot index with NaN (the kernel maps it to 0)
    lines.append(fmt("lutidx", x.numel(), bits(x), ints(ref.lut_index(x))))
    random_code = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
    for code in (dyn, dynu, random_code, get_code("nf4")):
        lines.append(fmt("lut", code.numel(), bits(code), ints(_lut_uncached(code))))

    # Storage conversions, ties included.
    conv = torch.cat([special_floats(), random_magnitudes(g, 20000), tie_patterns(16, 0x8000, g, 3000),
                      tie_patterns(13, 0x1000, g, 3000), torch.randn(2000, generator=g) * 60000,
                      torch.rand(2000, generator=g) * 2.0**-13])
    lines.append(fmt("bf16", conv.numel(), bits(conv), bits(conv.to(torch.bfloat16))))
    lines.append(fmt("f16", conv.numel(), bits(conv), bits(conv.to(torch.float16))))
    all16 = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    lines.append(fmt("bf16in", 65536, [v & 0xFFFF for v in all16.tolist()], bits(all16.view(torch.bfloat16).float())))
    lines.append(fmt("f16in", 65536, [v & 0xFFFF for v in all16.tolist()], bits(all16.view(torch.float16).float())))

    # Double-quant scale decode.
    n = 1000
    q = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    a2 = torch.rand(-(-n // 256), generator=g) * 0.3
    offset = torch.tensor(0.0123, dtype=torch.float32)
    lines.append(fmt("ddq", n, ints(q), bits(a2), bits(dyn), bits(offset), bits(ref.double_dequantize(q, a2, dyn, offset))))

    # Whole-tensor 4-bit quantize / dequantize: every blocksize and dtype, ragged sizes. The
    # largest size (3B + 6) is crafted: block 0 holds exact midpoints (and neighbours) times a
    # power-of-two absmax, block 1 is all zero, block 2 has its absmax under the 1e-38 floor, and
    # the partial tail block (the division path) holds extreme values.
    for qt in ("nf4", "fp4"):
        mids, _ = ref.sorted_levels(qt)
        code = get_code(qt)
        crafted = torch.cat([f32([4.0]), neighbours(mids * 4.0), code * 4.0])
        for B in BLOCKSIZES_4BIT:
            for dtype in DT:
                for n in (1, 7, B + 5, 3 * B + 6):
                    w = torch.randn(n, generator=g) * (10.0 ** torch.randint(-3, 3, (1,), generator=g).item())
                    if n == 3 * B + 6:
                        w[: crafted.numel()] = crafted
                        w[B : 2 * B] = 0.0
                        w[2 * B : 3 * B] = torch.rand(B, generator=g) * 1e-38
                        w[-4:] = f32([3e38, -1e-40, 7e-39, 0.5])
                    w = w.to(dtype)
                    packed, absmax = ref.quantize_4bit(w, B, qt)
                    lines.append(fmt("q4", QT[qt], B, DT[dtype], n, bits(w), bits(absmax), ints(packed)))
                    for out_dtype in DT:
                        if out_dtype is not dtype and n != B + 5:
                            continue
                        deq = ref.dequantize_4bit(packed, absmax, B, qt, (n,), out_dtype)
                        lines.append(fmt("dq4", QT[qt], B, DT[out_dtype], n, 0, ints(packed), bits(absmax), bits(deq)))
                        if absmax.isfinite().all():
                            qa, a2, off = ref.double_quantize(absmax)
                            scale = ref.double_dequantize(qa, a2, dyn, off)
                            deq = ref.dequantize_4bit(packed, scale, B, qt, (n,), out_dtype)
                            lines.append(fmt("dq4", QT[qt], B, DT[out_dtype], n, 1, ints(packed), ints(qa), bits(a2),
                                             bits(dyn), bits(off), bits(deq)))

    # Decode of every one of the 256 entries of both dynamic maps.
    for code in (dyn, dynu):
        q = torch.arange(256, dtype=torch.int64).to(torch.uint8)
        absmax = torch.rand(4, generator=g) * 10
        for dtype in DT:
            deq = ref.dequantize_blockwise(q, absmax, code, 64, dtype)
            lines.append(fmt("dq8", 64, DT[dtype], 256, ints(q), bits(absmax), bits(code), bits(deq)))

    # Whole-tensor 8-bit blockwise: tiny to large blocksizes, both dynamic maps; at blocksize >=
    # 256 the first block holds every code entry, every midpoint and its neighbours at absmax 1,
    # and the second block is all zero.
    for B in (2, 4, 8, 64, 256, 4096, 8192):
        for dtype in DT:
            for code in (dyn, dynu):
                if B >= 4096 and (dtype is torch.float16 or code is dynu):
                    continue
                crafted = torch.cat([f32([1.0]), code, neighbours(0.5 * (code[:-1] + code[1:]))])
                for n in (1, 5, B + 3, max(2 * B + 7, 600)):
                    x = torch.randn(n, generator=g) * 3.0
                    if code is dynu:
                        x = x.abs()
                    if n >= 2 * B and B >= 256:
                        k = min(crafted.numel(), B)
                        x[:k] = crafted[:k]
                        x[B : 2 * B] = 0.0
                    x = x.to(dtype)
                    q, absmax = ref.quantize_blockwise(x, code, B)
                    lines.append(fmt("q8", B, DT[dtype], n, bits(x), bits(code), ints(q), bits(absmax)))
                    deq = ref.dequantize_blockwise(q, absmax, code, B, dtype)
                    lines.append(fmt("dq8", B, DT[dtype], n, ints(q), bits(absmax), bits(code), bits(deq)))

    lines += adamw_cases(g)
    lines += gemv_cases(g)
    return lines


ADAMW_KEYS = ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps")


def bits64(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFFFFFFFFFF for v in t.double().contiguous().reshape(-1).view(torch.int64).tolist()]


def random_hyper(g: torch.Generator, i: int) -> tuple:
    """(lr, beta1, beta2, eps, weight_decay, step): the usual settings first, then random ones."""
    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand(1, generator=g))

    if i == 0:
        return 1e-3, 0.9, 0.999, 1e-8, 0.01, 1
    lr = 10.0 ** u(-6, -0.5)
    beta1 = pick([0.9, 0.0, u(0.5, 0.999)])
    beta2 = pick([0.999, 0.95, u(0.8, 0.99999)])
    eps = pick([1e-8, 1e-6, 10.0 ** u(-12, -3)])
    wd = pick([0.0, 0.01, 0.1, u(0.0, 0.5)])
    step = pick([1, 2, 10, 1000, int(torch.randint(1, 100_000, (1,), generator=g))])
    return lr, beta1, beta2, eps, wd, step


def adamw_values(g: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
    """(p, grad, m, v) fp32 of many magnitudes, with zeros, tiny and huge gradients mixed in."""
    scale = lambda: 10.0 ** torch.randint(-6, 3, (n,), generator=g).float()  # noqa: E731
    p = torch.randn(n, generator=g) * scale()
    grad = torch.randn(n, generator=g) * scale()
    m = torch.randn(n, generator=g) * scale() * 0.1
    v = torch.rand(n, generator=g) * scale() * 0.01
    k = min(n, 8)
    grad[:k] = torch.tensor([0.0, -0.0, 1e-30, -1e30, 3e38, 1e-45, 65504.0, -1.0])[:k]
    v[: k // 2] = 0.0
    return p, grad, m, v


def adamw_cases(g: torch.Generator) -> list[str]:
    """AdamW element updates against reference.adamw_update (fp32 states) and whole 8-bit blocks
    against reference.adamw_step_8bit (dequantize, update, requantize)."""
    lines = []
    dts = list(DT)
    for i in range(40):
        hyper = random_hyper(g, i)
        s = ref.adamw_scalars(*hyper)
        pdt, gdt = dts[i % 3], dts[(i // 3) % 3]
        p, grad, m, v = adamw_values(g, 300)
        p, grad = p.to(pdt), grad.to(gdt)
        new_p, new_m, new_v = ref.adamw_update(p, grad, m, v, s)
        lines.append(fmt("adamw", DT[pdt], DT[gdt], bits(f32([s[k] for k in ADAMW_KEYS])), p.numel(), bits(p),
                         bits(grad), bits(m), bits(v), bits(new_p.to(pdt)), bits(new_m), bits(new_v)))

    code_m, code_v = get_code("dynamic"), get_code("dynamic_unsigned")
    for i, (B, n, pdt) in enumerate([(256, 3 * 256 + 17, torch.float32), (64, 5 * 64, torch.bfloat16),
                                     (256, 256, torch.float16), (4096, 4096 + 100, torch.float32)]):
        p = torch.randn(n, generator=g).to(pdt)
        nb = -(-n // B)
        m_q, v_q = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        m_abs, v_abs = torch.zeros(nb), torch.zeros(nb)
        # A few steps first, so the recorded step starts from real (nonzero) states; block 1 keeps a
        # zero gradient throughout, so its states stay zero (the all-zero block encoding).
        for step in range(1, 4):
            hyper = random_hyper(g, i + step)[:5] + (step,)
            grad = (torch.randn(n, generator=g) * 0.1).to(pdt)
            if nb > 1:
                grad[B : 2 * B] = 0.0
            before = [t.clone() for t in (p, grad, m_q, m_abs, v_q, v_abs)]
            ref.adamw_step_8bit(p, grad, m_q, m_abs, v_q, v_abs, *hyper, blocksize=B)
        s = ref.adamw_scalars(*hyper)
        bp, bg, bmq, bma, bvq, bva = before
        lines.append(fmt("adamw8", DT[pdt], DT[pdt], B, bits(f32([s[k] for k in ADAMW_KEYS])), n, bits(code_m),
                         bits(code_v), bits(bp), bits(bg), ints(bmq), bits(bma), ints(bvq), bits(bva),
                         bits(p), ints(m_q), bits(m_abs), ints(v_q), bits(v_abs)))
    return lines


def gemv_cases(g: torch.Generator) -> list[str]:
    """Small-M GEMV: x fp32 [M, K], W quantized by the reference; expected Y in float64 from the
    reference's fp32 weight, and sum |x| |w| per output (the error bound's scale)."""
    lines = []
    for M, N, K, B, qt, splits in [(1, 40, 4096, 64, "nf4", 1), (3, 33, 320, 64, "nf4", 2), (16, 17, 200, 64, "fp4", 1),
                                   (7, 29, 321, 32, "nf4", 3), (2, 50, 1000, 256, "nf4", 4), (1, 9, 31, 32, "fp4", 1),
                                   (5, 12, 2080, 128, "nf4", 5)]:
        w = torch.randn(N, K, generator=g) * 0.05
        packed, absmax = ref.quantize_4bit(w, B, qt)
        wq = ref.dequantize_4bit(packed, absmax, B, qt, (N, K), torch.float32).double()
        x = torch.randn(M, K, generator=g)
        y64 = x.double() @ wq.t()
        absdot = x.double().abs() @ wq.abs().t()
        lines.append(fmt("gemv", M, N, K, B, QT[qt], splits, bits(x), ints(packed), bits(absmax), bits64(y64),
                         bits64(absdot)))
    return lines


def write_cases(path: os.PathLike | str, seed: int = 0) -> int:
    lines = cases(seed)
    Path(path).write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the case file here")
    ap.add_argument("--run", help="path of qk_host_tests: write a temporary case file and run it")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out:
        write_cases(args.out, args.seed)
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cases.txt"
            write_cases(path, args.seed)
            return subprocess.run([args.run, str(path)]).returncode
    if not args.out and not args.run:
        ap.error("give --out and/or --run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
