"""The compile gate (`python -m qlora_kernels compile-check`), run as CI runs it: in a subprocess.

conftest.py sets TRITON_INTERPRET=1 for this process, under which @triton.jit functions cannot be
compiled, so every gate run here gets an environment without it (one test keeps it, to check that
the gate drops it by itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _toy_kernels import EXPECTED_FAILURE
from qlora_kernels import compile_check

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOY_SPECS = "_toy_kernels:toy_specs"
TOY_NAMES = ["ok_matmul", "ok_axpy_exact", "ok_axpy_declared_fma", "ok_unpack_vector@ints16", *EXPECTED_FAILURE]


def extra_tritons() -> dict[str, list[str]]:
    """{version: gate flags} from requirements-extra-tritons.txt (scripts/setup.sh installs each
    beside the venv)."""
    out = {}
    for line in (REPO / "requirements-extra-tritons.txt").read_text().splitlines():
        if line.startswith("triton=="):
            spec, _, flags = line.partition("#")
            out[spec.split("==", 1)[1].strip()] = flags.split()
    return out


def run_gate(tmp_path: Path, *args: str, interpret: bool = False, timeout: int = 600,
             triton_dir: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    first = [str(triton_dir)] if triton_dir is not None else []
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*first, str(HERE), str(REPO), env.get("PYTHONPATH")) if p)
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_kernels.compile_check", *args, "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    doc = json.loads(out.read_text()) if out.exists() else None
    return proc, doc


def table_rows(stdout: str) -> dict[tuple[str, str], str]:
    """(kernel, arch) -> status, read back from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        arch = next((c for c in cells if c in ("sm_80", "sm_90")), None)
        if arch is None:
            continue
        # Columns are separated by two spaces; statuses never contain two in a row.
        rows[(cells[0], arch)] = line.rstrip().rsplit("  ", 1)[-1].strip()
    return rows


@pytest.fixture(scope="module")
def toy_gate(tmp_path_factory):
    return run_gate(tmp_path_factory.mktemp("toy"), "--specs-from", TOY_SPECS)


def test_toy_gate_fails_exactly_the_bad_configs(toy_gate):
    proc, doc = toy_gate
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert doc is not None and doc["ok"] is False
    rows = {(r["kernel"], r["arch"]): r for r in doc["rows"]}
    assert set(rows) == {(name, arch) for name in TOY_NAMES for arch in (80, 90)}

    for arch in (80, 90):
        mm = rows[("ok_matmul", arch)]
        assert mm["ok"], mm["status"]
        assert mm["tensor_cores"] == "yes"
        assert mm["spill_stores"] == 0 and mm["spill_loads"] == 0
        assert 0 < mm["registers"] <= 255
        assert 0 < mm["shared"] <= compile_check.SHARED_LIMIT[arch]

        axpy = rows[("ok_axpy_exact", arch)]
        assert axpy["ok"], axpy["status"]
        assert axpy["fma_free"] == "yes" and axpy["tensor_cores"] == "-"
        declared = rows[("ok_axpy_declared_fma", arch)]
        assert declared["ok"] and declared["fma_free"] == "8 own", declared["status"]

        unpack = rows[("ok_unpack_vector@ints16", arch)]
        assert unpack["ok"] and unpack["byte_loads"] == 0, unpack["status"]

        for name, reason in EXPECTED_FAILURE.items():
            row = rows[(name, arch)]
            assert not row["ok"], f"{name} sm_{arch} passed the gate"
            assert row["status"].startswith("FAIL:") and reason in row["status"], row["status"]

        # DESIGN.md section 4: 128x256x64 with 4 warps runs out of registers.
        spills = rows[("bad_matmul_spills", arch)]
        assert spills["registers"] == 255 and spills["spill_stores"] > 0
        assert rows[("bad_axpy_fma", arch)]["fma_free"] == "no"
        assert rows[("bad_axpy_no_tensor_cores", arch)]["tensor_cores"].startswith("no")
        assert rows[("bad_matmul_smem", arch)]["shared"] > compile_check.SHARED_LIMIT[arch]
        assert rows[("bad_unpack_bytewise@ints16", arch)]["byte_loads"] > 2


def test_toy_gate_table_matches_json(toy_gate):
    proc, doc = toy_gate
    printed = table_rows(proc.stdout)
    assert len(printed) == len(doc["rows"]), proc.stdout
    for r in doc["rows"]:
        assert printed[(r["kernel"], f"sm_{r['arch']}")] == r["status"]
    assert "8 ok, 14 failed" in proc.stdout


def test_gate_passes_good_configs_and_drops_the_interpreter(tmp_path):
    # TRITON_INTERPRET=1 left in: the gate must re-run itself without it, or nothing compiles.
    proc, doc = run_gate(tmp_path, "--specs-from", TOY_SPECS, "--kernels", "ok_", "--arch", "90",
                         interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r["kernel"], r["arch"], r["ok"]) for r in doc["rows"]] == [
        ("ok_matmul", 90, True), ("ok_axpy_exact", 90, True), ("ok_axpy_declared_fma", 90, True),
        ("ok_unpack_vector@ints16", 90, True)]


def test_allow_spills_reports_spills_and_fails_on_the_rest(tmp_path):
    proc, doc = run_gate(tmp_path, "--specs-from", TOY_SPECS, "--kernels", "bad_matmul_spills", "bad_axpy_fma",
                         "--arch", "90", "--allow-spills")
    rows = {r["kernel"]: r for r in doc["rows"]}
    spills = rows["bad_matmul_spills"]
    assert spills["ok"] and spills["spill_stores"] > 0 and spills["status"].startswith("ok (allowed: spills")
    assert not rows["bad_axpy_fma"]["ok"] and "fma" in rows["bad_axpy_fma"]["status"]
    assert proc.returncode == 1


def test_allow_byte_loads_reports_them_and_fails_on_the_rest(tmp_path):
    proc, doc = run_gate(tmp_path, "--specs-from", TOY_SPECS, "--kernels", "bad_unpack_bytewise", "bad_axpy_fma",
                         "--arch", "90", "--allow-byte-loads")
    rows = {r["kernel"]: r for r in doc["rows"]}
    bytewise = rows["bad_unpack_bytewise@ints16"]
    assert bytewise["ok"] and bytewise["byte_loads"] > 2
    assert bytewise["status"].startswith("ok (allowed: ") and "single-byte global loads" in bytewise["status"]
    assert not rows["bad_axpy_fma"]["ok"] and proc.returncode == 1


def test_a_crashing_compile_is_a_failed_row_not_a_dead_gate(tmp_path):
    proc, doc = run_gate(tmp_path, "--specs-from", "_toy_kernels:crashing_specs", "--arch", "80", "90",
                         "--jobs", "2")
    assert proc.returncode == 1 and doc is not None, proc.stdout + proc.stderr
    status = {(r["kernel"], r["arch"]): r["status"] for r in doc["rows"]}
    assert len(status) == 8
    for arch in (80, 90):
        assert status[("crash_compiler", arch)].startswith("FAIL: compiler crashed")
        for name in ("ok_axpy_a", "ok_axpy_b", "ok_axpy_c"):
            assert status[(name, arch)] == "ok", status


def test_gate_exits_2_when_nothing_matches(tmp_path):
    proc, doc = run_gate(tmp_path, "--specs-from", TOY_SPECS, "--kernels", "no_such_kernel")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert doc is None


def test_parse_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    792 bytes stack frame, 1136 bytes spill stores, 936 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 792 bytes cumulative stack size\n"
    )
    row = compile_check.Row(kernel="k", config="", arch=90, shared=4096)
    compile_check._parse_ptxas(log, row)
    assert (row.registers, row.spill_stores, row.spill_loads, row.stack_frame) == (255, 1136, 936, 792)
    assert row.shared == 4096 + 1024 and row.ok

    bad = compile_check.Row(kernel="k", config="", arch=80)
    compile_check._parse_ptxas("ptxas info    : 0 bytes gmem\n", bad)
    assert not bad.ok


@pytest.mark.parametrize("line, fused", [
    ("\tfma.rn.f32 \t%f3, %f1, %f2, %f0;", True),
    ("\tfma.rn.ftz.f32 \t%f3, %f1, %f2, %f0;", True),
    ("\tmad.rn.f32 \t%f3, %f1, %f2, %f0;", True),
    ("\tfma.rn.bf16 \t%rs3, %rs1, %rs2, %rs0;", False),
    ("\tmul.rn.f32 \t%f3, %f1, %f2;", False),
    ("\tadd.rn.f32 \t%f4, %f3, %f0; // fma.rn.f32 avoided", False),
])
def test_fma_detection(line, fused):
    code = compile_check._COMMENT_RE.sub("", line)
    assert bool(compile_check._FMA_RE.search(code)) is fused


@pytest.mark.parametrize("line, signed", [
    # Triton 3.2's PTX for `tl.load(code_ptr + q)` with q uint8: the byte sign-extended, then scaled.
    ("\tcvt.s32.s8 \t%r11, %r10;", True),
    ("\tcvt.s64.s8 \t%rd2, %rs1;", True),
    # 3.6+ for the same code, and any release for q.to(tl.int32): zero-extension.
    ("\tcvt.u32.u16 \t%r10, %rs1;", False),
    ("\tcvt.s64.s32 \t%rd7, %r9;", False),
    # 3.2 before a byte store through shared memory (a layout change): only the low byte is kept.
    ("\tcvt.s16.s8 \t%rs17, %rs1;", False),
])
def test_signed_byte_detection(line, signed):
    assert bool(compile_check._SIGNED_BYTE_RE.search(line)) is signed


@pytest.mark.parametrize("triton_version", ["pinned", *extra_tritons()])
def test_package_kernels_pass_the_gate(tmp_path, triton_version):
    """Every (kernel, config) the package ships compiles for sm_80 and sm_90 without spills, within
    shared memory, on tensor cores where required, and without fma where exact: under the pinned
    Triton and under each release of requirements-extra-tritons.txt (the GPU machine's among them;
    the oldest supported one with spills allowed, i.e. it must compile, not crash)."""
    triton_dir = None
    if triton_version != "pinned":
        triton_dir = REPO / ".venv" / "extra-tritons" / triton_version
        if not (triton_dir / "triton" / "__init__.py").is_file():
            pytest.skip(f"triton {triton_version} is not installed in {triton_dir}: run scripts/setup.sh")
    flags = extra_tritons().get(triton_version, [])
    proc, doc = run_gate(tmp_path, *flags, timeout=3600, triton_dir=triton_dir)
    failed = [f"{r['kernel']} [{r['config']}] sm_{r['arch']}: {r['status']}"
              for r in (doc or {}).get("rows", []) if not r["ok"]]
    assert proc.returncode == 0, "\n".join(failed) or (proc.stdout + proc.stderr)[-4000:]
    assert doc["ok"] and doc["rows"]
    if triton_dir is not None:
        assert doc["triton"] == triton_version, f"the gate ran under triton {doc['triton']}"
