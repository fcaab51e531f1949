"""bench/sass_budget.py: the loop finder on hand-written SASS, and the issue-budget gate on the decode
kernels as ptxas compiles them for sm_90: csrc's tensor-core GEMV and the Triton small-M kernel's
M = 1 path (no GPU needed: nvcc, and Triton's own ptxas and nvdisasm)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sass_budget", ROOT / "bench" / "sass_budget.py")
sass_budget = importlib.util.module_from_spec(_spec)
sys.modules["sass_budget"] = sass_budget  # its dataclass looks its module up there
_spec.loader.exec_module(sass_budget)

# An outer loop (label .L_x_0) around an inner one (.L_x_1), a forward branch, and an instruction
# after the outer loop; predicates and operands as nvdisasm prints them.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/                   LDS R8, [R9] ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R8, R4, R12 ;
        /*0040*/                   IADD3 R9, R9, 0x80, RZ ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
        /*0060*/              @!P1 BRA `(.L_x_2) ;
        /*0070*/                   FFMA R20, R12, R13, R20 ;
.L_x_2:
        /*0080*/                   ISETP.GE.AND P2, PT, R3, UR5, PT ;
        /*0090*/               @!P2 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
"""


def test_loops_found_by_backward_branches_only():
    entries = sass_budget.parse_sass(SASS)
    found = sorted((lp.start, lp.end) for lp in sass_budget.loops(entries))
    assert found == [(1, 9), (2, 5)]  # instruction indices: outer .L_x_0 .. BRA, inner .L_x_1 .. BRA
    inner = sass_budget.innermost_with(entries, "HMMA")
    assert (inner.start, inner.end, inner.size) == (2, 5, 4)
    assert inner.ops == {"LDS": 1, "HMMA": 1, "IADD3": 1, "BRA": 1}
    outer = sass_budget.innermost_with(entries, "HMMA", "FFMA")
    assert (outer.start, outer.end) == (1, 9)
    assert sass_budget.innermost_with(entries, "F2FP") is None


def test_issue_budget_follows_the_card():
    # 2 weights per byte: an H100 SXM streams 3.35e12 * 2 / (132 * 1.98e9) = 25.6 weights per SM
    # clock, and 4 warp instructions per clock allow 128 / 25.6 = 5.0 instructions per weight; one
    # warp shuffle per clock allows 32 / 25.6 = 1.25 shuffles per weight.
    assert sass_budget.issue_budget("H100 SXM") == pytest.approx(4.99, abs=0.01)
    assert sass_budget.issue_budget("H200 SXM") == pytest.approx(3.48, abs=0.01)
    assert sass_budget.shuffle_budget("H100 SXM") == pytest.approx(1.25, abs=0.01)
    assert sass_budget.shuffle_budget("H200 SXM") == pytest.approx(0.87, abs=0.01)


def test_ceiling_is_the_tighter_of_issue_and_shuffles():
    row = {"kernel": "k", "x": "bf16", "blocksize": "64", "nested": True, "arch": 90,
           "loop_instructions": 300, "weights_per_trip": 100, "shuffles": 100, "ops": {}}
    sass_budget.report([row])
    assert row["bandwidth_ceiling_H100 SXM"] == 1.0  # 3.0 <= 4.99 instructions, 1.0 <= 1.25 shuffles
    assert row["bandwidth_ceiling_H200 SXM"] == pytest.approx(0.87, abs=0.005)  # the shuffles bind
    row.update(loop_instructions=998, shuffles=0)
    sass_budget.report([row])
    assert row["bandwidth_ceiling_H100 SXM"] == pytest.approx(0.5, abs=0.005)  # the issue binds


def _triton_rows(tmp_path, *args) -> list[dict]:
    """sass_budget.py's JSON rows for sm_90 with `args`, run in a process of its own: this one runs
    Triton as the interpreter (conftest.py), which cannot compile for a GPU."""
    _need_nvdisasm()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_budget.py"), "--arch", "90", *args,
                           "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_triton_decode_path_fits_the_budgets(tmp_path):
    """The decode path of the Triton small-M kernel, compiled for sm_90 as it runs on a model's
    shapes, spends at most 90% of the H100's issue budget per weight at M = 1 (at M = 2, one fma a
    weight more, at most 110%) and at most 90% of its shuffle budget (one shuffle per weight looks
    the code up for both rows), under what the tensor-core tiles of the same kernel, the path that
    M = 3..16 take, spend: they stay over the budget (the reason the decode path exists)."""
    rows = {r["decode"]: r for r in _triton_rows(tmp_path, "--skip-csrc")}
    assert set(rows) == {0, 1, 2}  # the tiles, the decode path at M = 1 and at M = 2
    tiles = rows[0]
    for m in (1, 2):
        decode = rows[m]
        assert decode["shuffles"] == decode["weights_per_trip"], decode  # one lookup per weight, shared by the rows
        ipw = decode["loop_instructions"] / decode["weights_per_trip"]
        limit = 0.9 * sass_budget.issue_budget("H100 SXM") if m == 1 else 1.1 * sass_budget.issue_budget("H100 SXM")
        assert ipw <= limit, f"M={m} {decode}: {ipw:.2f} instructions per weight > {limit:.2f}"
        assert decode["shuffles"] / decode["weights_per_trip"] <= 0.9 * sass_budget.shuffle_budget("H100 SXM")
        assert ipw < tiles["loop_instructions"] / tiles["weights_per_trip"]
    assert tiles["loop_instructions"] / tiles["weights_per_trip"] > sass_budget.issue_budget("H100 SXM")


def _need_nvdisasm() -> None:
    """Skip, saying why, where nvdisasm is missing (the Triton wheel ships it, so CI never skips)."""
    try:
        sass_budget._nvdisasm()
    except FileNotFoundError as e:
        pytest.skip(f"disassembling needs nvdisasm: {e}")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="compiling csrc/gemv_4bit.cu for sm_90 needs nvcc")
def test_csrc_decode_gemv_fits_the_issue_budget(tmp_path):
    """Every instantiation of the tensor-core GEMV can stream W at an H100's full HBM bandwidth as
    far as instruction issue goes: the one-column-group kernels (M = 1, the decode goal: 3.5x of a
    3.88x byte limit needs 90% of the bandwidth) within 90% of the issue budget per weight in their
    span loop, the two- and four-group kernels (M up to 16, whose goal is the bandwidth itself)
    within the budget."""
    _need_nvdisasm()
    rows = sass_budget.csrc_rows(90, tmp_path)
    assert {(r["x"], r["blocksize"], r["nested"], r["column_groups"]) for r in rows} == {
        (x, bs, nested, cg) for x in ("bf16", "fp16") for bs in ("32", "64", ">=128") for nested in (False, True)
        for cg in ((1, 2) if bs == ">=128" else (1, 2, 4))}
    # Every M of 1..16 has a variant at blocksizes 64 and >= 128 (blocksize 32: M <= 8).
    for bs, top in (("32", 8), ("64", 16), (">=128", 16)):
        covered = {m for r in rows if r["blocksize"] == bs for m in range(r["m_range"][0], r["m_range"][1] + 1)}
        assert covered == set(range(1, top + 1)), (bs, sorted(covered))
    budget = sass_budget.issue_budget("H100 SXM")
    for r in rows:
        ipw = r["loop_instructions"] / r["weights_per_trip"]
        # 8 mma per 128-wide span and column group (64 weights per lane a span).
        assert r["ops"]["HMMA"] == 8 * r["column_groups"] * r["weights_per_trip"] // 64, r
        limit = (0.9 if r["column_groups"] == 1 else 1.0) * budget
        assert ipw <= limit, f"{r}: {ipw:.2f} instructions per weight > {limit:.2f}"


def test_sm90_gemm_tiles_issue_within_their_tensor_core_time(tmp_path):
    """The fused GEMMs' sm_90 tiles for M > 64 (the training shapes, SM90_CONFIGS) issue a k-tile's
    dequantization and bookkeeping in at most 1.2x the clocks its wgmma takes (1.06x forward, 1.10x
    dX when written; the 128x128x32 forward tile the older chips run takes 1.48x, and took 1.91x
    with gathered codes): the issue-bound share that keeps them from matching a BF16 GEMM."""
    rows = {(r["kernel"], r["config"]): r for r in _triton_rows(tmp_path, "--gemm")}
    for kernel in ("qlora_fwd", "qlora_dx"):
        r = rows[(kernel, "large_sm90")]
        assert r["issue_over_tensor"] <= 1.2, r
        assert r["issue_clocks"] / r["tensor_clocks"] == pytest.approx(r["issue_over_tensor"], abs=1e-3)
    assert (("qlora_fwd", "large") not in rows) and (("qlora_dx", "large") not in rows)  # sm_80's, not compiled here
