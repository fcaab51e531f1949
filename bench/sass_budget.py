"""Static issue budget of the decode (M = 1) kernels, from ptxas's own machine code, no GPU needed:

    python bench/sass_budget.py [--arch 90] [--json PATH] [--skip-triton | --skip-csrc]
    python bench/sass_budget.py --gemm [--arch 90] [--json PATH]

At M = 1 a decode GEMV touches each weight once, so the instructions spent per weight, not the
bytes, can be what limits it: an SM issues at most 4 warp instructions per clock, and streaming
the packed weight at full HBM bandwidth hands each SM `weights_per_clock` weights per clock. A
kernel whose main loop spends more than 4 * 32 / weights_per_clock instructions per weight cannot
reach the card's bandwidth, however its memory access is laid out; the decode goal (>= 3.5x a BF16
GEMV at M = 1, byte limit 3.88x) needs about 90% of it. The bound below uses the boost clock (the
most issue slots the card can have), so a kernel over it is over it at any clock.

What it does: compiles csrc/gemv_4bit.cu (nvcc -cubin) and, unless --skip-triton, the Triton
small-M kernel's real-shape variant (compile_check's spec), disassembles them (nvdisasm from the
Triton wheel), finds the innermost loop that streams the weight (for csrc the one with the tensor-core
instructions, HMMA; for Triton the one with HMMA fed by bf16 packing, F2FP) and counts
its instructions per weight (the weights one thread covers per trip are known from the kernel's
layout: 64 per lane per 128-wide span for csrc's tensor-core GEMV, whose loop holds 8 HMMA per span
it is unrolled over and column group, a variant per range of M; BN * BK / threads for Triton's).
A count is every instruction of one trip of the loop, so where the loop branches around a few
(csrc's prefetch of the next span, skipped on a split's last one) it is an upper bound.

The FMA kernel of csrc (gemv_4bit_kernel) is not counted: its loop holds the partial-chunk and
unaligned-X paths beside the hot one, so a static count overstates it. Its hot path needs at least
five instructions per weight by construction (see the comment above gemv_4bit_mma_kernel).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (HBM bytes per second, SMs, boost clock in Hz), from NVIDIA's H100 SXM5 and H200 SXM datasheets.
CARDS = {"H100 SXM": (3.35e12, 132, 1.98e9), "H200 SXM": (4.8e12, 132, 1.98e9)}
ISSUE_PER_SM_CLOCK = 4  # warp instructions: four schedulers, one each per clock
# Warp shuffles: 32 results per clock per SM, one warp instruction a clock (CUDA C++ Programming
# Guide, arithmetic instruction throughput table, compute capability 5.0 through 9.0).
SHUFFLE_PER_SM_CLOCK = 1
DECODE_BYTE_LIMIT = 3.88  # bytes of a BF16 4096x4096 weight over its NF4 form (double-quantized, blocksize 64)
CSRC_WEIGHTS_PER_LANE_SPAN = 64  # gemv_4bit_mma_kernel: 2 rows x 32 nibbles per lane per span


@dataclasses.dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    ops: collections.Counter

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, text) of each instruction of nvdisasm/cuobjdump output; labels (".L_x_N:")
    are kept as ("label", name) entries in the index returned by loops()."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())  # drop a predicate
            out.append((int(m.group(1), 16), body.split()[0] if body else "", m.group(2).strip()))
        else:
            lm = re.match(r"^\s*(\.L_x_\d+):", line)
            if lm:
                out.append((-1, "label", lm.group(1)))
    return out


def loops(entries: list[tuple[int, str, str]]) -> list[Loop]:
    """Every backward branch's range (target .. branch), instructions only."""
    ins = [e for e in entries if e[1] != "label"]
    label_at, pending = {}, []
    n = 0
    for e in entries:
        if e[1] == "label":
            pending.append(e[2])
        else:
            for p in pending:
                label_at[p] = n
            pending = []
            n += 1
    by_addr = {a: i for i, (a, _, _) in enumerate(ins)}
    found = []
    for i, (_, op, text) in enumerate(ins):
        if not op.startswith("BRA"):
            continue
        lm = re.search(r"(\.L_x_\d+)", text)
        am = re.search(r"0x([0-9a-f]+)", text)
        target = label_at.get(lm.group(1)) if lm else (by_addr.get(int(am.group(1), 16)) if am else None)
        if target is not None and target <= i:
            found.append(Loop(target, i, collections.Counter(o.split(".")[0] for _, o, _ in ins[target:i + 1])))
    return found


def innermost_with(entries: list[tuple[int, str, str]], *opcodes: str) -> Loop | None:
    """The smallest loop containing every one of `opcodes` (e.g. HMMA)."""
    cands = [lp for lp in loops(entries) if all(lp.ops.get(op, 0) > 0 for op in opcodes)]
    return min(cands, key=lambda lp: lp.size) if cands else None


def functions(sass: str) -> dict[str, str]:
    """nvdisasm -c output split per function: {mangled name: its text}."""
    parts = re.split(r"\n\s*\.section\s+\.text\.", sass)
    return {p.split(",")[0].strip(): p for p in parts[1:]}


def issue_budget(card: str) -> float:
    """Most instructions per weight a thread can spend while the card streams NF4 at full bandwidth."""
    bw, sms, clock = CARDS[card]
    weights_per_sm_clock = 2 * bw / (sms * clock)
    return ISSUE_PER_SM_CLOCK * 32 / weights_per_sm_clock


def shuffle_budget(card: str) -> float:
    """Most warp shuffles per weight (per thread) while the card streams NF4 at full bandwidth."""
    bw, sms, clock = CARDS[card]
    return SHUFFLE_PER_SM_CLOCK * 32 / (2 * bw / (sms * clock))


def _nvdisasm() -> str:
    import triton

    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm"))
    if found:
        return found[0]
    path = shutil.which("nvdisasm")
    if path is None:
        raise FileNotFoundError("nvdisasm: neither in the Triton wheel nor on PATH")
    return path


def csrc_rows(arch: int, work: Path) -> list[dict]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH")
    cubin = work / f"gemv_4bit.sm_{arch}.cubin"
    subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-cubin", "--expt-relaxed-constexpr",
                    "-I", str(ROOT / "csrc"), "-o", str(cubin), str(ROOT / "csrc" / "gemv_4bit.cu")],
                   check=True, capture_output=True, text=True)
    sass = subprocess.run([_nvdisasm(), "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
    dtypes = {"1": "bf16", "2": "fp16"}
    rows = []
    for name, text in sorted(functions(sass).items()):
        # Template arguments: X dtype, NB_LOG2 (log2 blocks per 128-wide span), NESTED, CG (column groups).
        m = re.search(r"gemv_4bit_mma_kernelILi(\d)ELi(\d)ELb(\d)ELi(\d)E", name)
        if not m:
            continue
        loop = innermost_with(parse_sass(text), "HMMA")
        if loop is None:
            raise RuntimeError(f"no loop with HMMA in {name}")
        nb_log2, cg = int(m.group(2)), int(m.group(4))
        nb = 1 << nb_log2
        # 8 mma per span and column group: a loop unrolled over several spans holds a multiple of 8 CG.
        spans_per_trip, rest = divmod(loop.ops["HMMA"], 8 * cg)
        if rest or not spans_per_trip:
            raise RuntimeError(f"{name}: {loop.ops['HMMA']} HMMA in the span loop, not a multiple of {8 * cg}")
        # The X rows this variant serves: M * NB (X row, block) columns in CG groups of 8, more than half of them
        # (fewer take CG / 2), M at most 16.
        m_hi = min(16, 8 * cg >> nb_log2)
        m_lo = 1 if cg == 1 else (4 * cg >> nb_log2) + 1
        rows.append({"kernel": f"csrc tensor-core GEMV, M={m_lo}..{m_hi}", "x": dtypes[m.group(1)],
                     "blocksize": f"{128 // nb}" if nb > 1 else ">=128", "nested": m.group(3) == "1",
                     "column_groups": cg, "m_range": (m_lo, m_hi), "arch": arch, "loop_instructions": loop.size,
                     "weights_per_trip": CSRC_WEIGHTS_PER_LANE_SPAN * spans_per_trip,
                     "shuffles": loop.ops.get("SHFL", 0), "ops": dict(loop.ops.most_common(8))})
    if not rows:
        raise RuntimeError("no gemv_4bit_mma_kernel in the cubin")
    return rows


def _triton_sass(spec, arch: int, work: Path) -> tuple[dict, str]:
    """(constexprs, nvdisasm output) of a compile-gate spec compiled for sm_<arch> as it ships."""
    import triton
    from triton.backends.compiler import GPUTarget

    from qlora_kernels import compile_check as cc

    fn = cc._unwrap_jit(spec.fn)
    signature, constexprs, divisible = cc._full_signature(spec, fn)
    src = cc._make_source(fn, signature, constexprs, divisible)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                       "enable_fp_fusion": not spec.exact_fp32})
    cubin = work / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    return constexprs, subprocess.run([_nvdisasm(), "-c", str(cubin)], check=True, capture_output=True,
                                      text=True).stdout


def _model_shape_bf16(spec) -> bool:
    """The spec the counts below take: bf16 activations and LoRA, blocksize 64, as Triton specializes
    the launch on a model's shapes (@ints16)."""
    return spec.name.endswith("@ints16") and all(p in spec.name for p in ("x=bf16", "lora=bf16", "bs=64"))


def triton_rows(arch: int, work: Path) -> list[dict]:
    from qlora_kernels.backends.triton import qlora_linear_small_m as small_m

    rows = []
    for spec in small_m.compile_specs():
        if not _model_shape_bf16(spec) or "split=1" not in spec.name:
            continue
        decode = int(spec.constexprs["DECODE"])  # rows of the decode path; 0: the tensor-core tiles
        constexprs, sass = _triton_sass(spec, arch, work)
        # The weight loop of the tensor-core tiles: HMMA fed with freshly dequantized bf16 (F2FP
        # packs them; the LoRA down-projection's loop of the same kernel has HMMA but no F2FP). Of
        # the M = 1 path (DECODE): the loop whose shuffles look the codes up and whose FFMA add them.
        want = ("SHFL", "FFMA") if decode else ("HMMA", "F2FP")
        loop = innermost_with(parse_sass(sass), *want)
        if loop is None:
            raise RuntimeError(f"no loop with {' and '.join(want)} in {spec.name}")
        per_trip = constexprs["BN"] * constexprs["BK"] // (32 * spec.num_warps)
        rows.append({"kernel": f"triton small-M decode path, M={decode}" if decode else "triton small-M tensor-core tiles",
                     "spec": spec.name, "decode": decode, "x": "bf16", "blocksize": "64", "nested": bool(constexprs["NESTED"]),
                     "arch": arch, "loop_instructions": loop.size, "weights_per_trip": per_trip,
                     "shuffles": loop.ops.get("SHFL", 0), "ops": dict(loop.ops.most_common(8))})
    return rows


# Dense bf16/fp16 tensor-core multiply-adds per clock per SM, from the datasheets: A100 SXM 312
# TFLOPS = 108 SMs x 1.41 GHz x 2 x 1024; H100 SXM 989 TFLOPS = 132 SMs x 1.83 GHz x 2 x 2048.
TENSOR_FMA_PER_SM_CLOCK = {80: 1024, 90: 2048}


def gemm_rows(arch: int, work: Path) -> list[dict]:
    """The fused GEMMs' main loops (forward and dX, each GPU tile config, bf16, blocksize 64, as they
    run on a model's shapes): the clocks one CTA's instructions take to issue per k-tile (all warps,
    4 per clock) against the clocks its tensor-core work takes (BM x BN x BK multiply-adds). Over 1
    the SM cannot keep its tensor cores busy however the two overlap: the dequantization, done once
    per W tile and shared by BM rows, costs more than the matmul it feeds."""
    from qlora_kernels.backends.triton import qlora_linear as tql

    rows = []
    for spec in tql.compile_specs():
        if not _model_shape_bf16(spec) or (spec.archs is not None and arch not in spec.archs):
            continue
        constexprs, sass = _triton_sass(spec, arch, work)
        entries = parse_sass(sass)
        mma = "HGMMA" if any(op.startswith("HGMMA") for _, op, _ in entries) else "HMMA"
        loop = innermost_with(entries, mma, "F2FP")
        if loop is None:
            raise RuntimeError(f"no loop with {mma} and F2FP in {spec.name}")
        bm, bn, bk, warps = constexprs["BM"], constexprs["BN"], constexprs["BK"], spec.num_warps
        issue = loop.size * warps / ISSUE_PER_SM_CLOCK
        tensor = bm * bn * bk / TENSOR_FMA_PER_SM_CLOCK[arch]
        rows.append({"kernel": spec.name.split("[", 1)[0], "config": spec.name.split("[", 1)[1].split(",", 1)[0],
                     "arch": arch, "BM": bm, "BN": bn, "BK": bk, "warps": warps, "loop_instructions": loop.size,
                     "weights_per_trip": bn * bk // (32 * warps), "mma": loop.ops[mma],
                     "issue_clocks": issue, "tensor_clocks": tensor, "issue_over_tensor": round(issue / tensor, 3),
                     "ops": dict(loop.ops.most_common(8))})
    return rows


def gemm_report(rows: list[dict]) -> str:
    head = f"{'kernel':<10} {'config':<14} {'sm':>3} {'BMxBNxBK':>12} {'warps':>5} {'instr/weight':>12} {'issue clk':>9} " \
           f"{'tensor clk':>10} {'issue/tensor':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['kernel']:<10} {r['config']:<14} {r['arch']:>3} {r['BM']:>4}x{r['BN']}x{r['BK']:<4} "
                     f"{r['warps']:>5} {r['loop_instructions'] / r['weights_per_trip']:>12.2f} "
                     f"{r['issue_clocks']:>9.0f} {r['tensor_clocks']:>10.0f} {r['issue_over_tensor']:>12.2f}")
    lines.append("")
    lines.append("per k-tile of one CTA: issue clk = loop instructions x warps / 4; tensor clk = BM x BN x BK / "
                 + ", ".join(f"{v} (sm_{a})" for a, v in TENSOR_FMA_PER_SM_CLOCK.items())
                 + " multiply-adds per clock. Over 1: the weight's dequantization, not the tensor cores, bounds the "
                 "GEMM (it then cannot match a BF16 GEMM of the same shape).")
    return "\n".join(lines)


def report(rows: list[dict]) -> str:
    cards = list(CARDS)
    head = f"{'kernel':<40} {'x':>4} {'bs':>5} {'nested':>6} {'sm':>3} {'instr/weight':>12}  " + "  ".join(
        f"{'ceiling ' + c:>18}" for c in cards)
    lines = [head, "-" * len(head)]
    for r in rows:
        ipw = r["loop_instructions"] / r["weights_per_trip"]
        spw = r["shuffles"] / r["weights_per_trip"]
        r["instructions_per_weight"] = round(ipw, 3)
        r["shuffles_per_weight"] = round(spw, 3)
        cells = []
        for c in cards:
            frac = min(1.0, issue_budget(c) / ipw, shuffle_budget(c) / spw if spw else 1.0)
            r[f"bandwidth_ceiling_{c}"] = round(frac, 3)
            cells.append(f"{frac:>6.0%} = {frac * DECODE_BYTE_LIMIT:.2f}x    ")
        name = r["kernel"] if len(r["kernel"]) <= 40 else r["kernel"][:37] + "..."
        lines.append(f"{name:<40} {r['x']:>4} {r['blocksize']:>5} {str(r['nested']):>6} {r['arch']:>3} {ipw:>12.2f}  "
                     + "  ".join(cells))
    lines.append("")
    lines.append("issue budget (instructions per weight at full HBM bandwidth, boost clock): "
                 + ", ".join(f"{c} {issue_budget(c):.2f}" for c in cards))
    lines.append("shuffle budget (warp shuffles per weight at full HBM bandwidth): "
                 + ", ".join(f"{c} {shuffle_budget(c):.2f}" for c in cards))
    lines.append("ceiling: the fraction of HBM bandwidth the issue rate and the shuffle rate allow, and the decode "
                 f"ratio over a BF16 GEMV it caps (byte limit {DECODE_BYTE_LIMIT}x; the goal is 3.5x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=(80, 90))
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--skip-triton", action="store_true", help="count csrc only")
    p.add_argument("--skip-csrc", action="store_true", help="count Triton only (no nvcc needed)")
    p.add_argument("--gemm", action="store_true", help="the fused GEMMs' issue time against their tensor-core time "
                                                      "instead of the decode kernels")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.gemm:
            rows = gemm_rows(args.arch, work)
            print(gemm_report(rows))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
            return 0
        rows = [] if args.skip_csrc else csrc_rows(args.arch, work)
        if not args.skip_triton:
            rows += triton_rows(args.arch, work)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
