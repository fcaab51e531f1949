"""The per-element math of the CUDA kernels (csrc/qk_math.h), compiled for the CPU, against reference.py.

Builds csrc/tests/host_tests.cpp (host compiler only: no nvcc, no GPU) with CMake in a temporary
directory, writes the reference cases with csrc/tests/gen_host_cases.py (every NF4/FP4 code, every
midpoint and its fp32 neighbours, the dynamic-map grid index and lookup tables, all 256 dynamic-map
entries, bf16/fp16 rounding, whole-tensor quantize/dequantize at every blocksize and dtype, the
AdamW element update at many random hyperparameters, whole 8-bit AdamW blocks, and the small-M
GEMV's summation order against a float64 product within that order's error bound) and runs the
program on them.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from helpers import build_host_target

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "csrc" / "tests" / "gen_host_cases.py"


def _gen_module():
    spec = importlib.util.spec_from_file_location("qk_gen_host_cases", GEN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def host_tests(tmp_path_factory) -> Path:
    build = build_host_target(tmp_path_factory.mktemp("qk_host_build"), "qk_host_tests",
                              "building csrc/tests/host_tests.cpp")
    exe = build / "qk_host_tests"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def case_lines() -> list[str]:
    return _gen_module().cases(seed=0)


def _run(exe: Path, cases: Path | None = None) -> subprocess.CompletedProcess:
    args = [str(exe)] + ([str(cases)] if cases else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def _summary(stdout: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) records, (\d+) values checked, (\d+) mismatches", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_builtin_checks(host_tests):
    r = _run(host_tests)
    assert r.returncode == 0, r.stderr
    assert _summary(r.stdout)[2] == 0


def test_qk_math_equals_reference(host_tests, case_lines, tmp_path):
    path = tmp_path / "cases.txt"
    path.write_text("\n".join(case_lines) + "\n")
    r = _run(host_tests, path)
    records, values, mismatches = _summary(r.stdout)
    assert r.returncode == 0 and mismatches == 0, r.stderr[-4000:]
    assert records == len(case_lines)
    kinds = {line.split(" ", 1)[0] for line in case_lines}
    assert kinds == {"code4", "enc4", "lutidx", "lut", "bf16", "f16", "bf16in", "f16in", "ddq", "q4", "dq4", "q8", "dq8",
                     "adamw", "adamw8", "gemv"}
    assert values > 1_000_000


def _corrupt(lines: list[str], kind: str) -> list[str]:
    """The case file with the last expected value of the first `kind` record changed."""
    out = list(lines)
    for i, line in enumerate(out):
        if line.startswith(kind + " "):
            toks = line.split(" ")
            last = int(toks[-1], 0)
            toks[-1] = hex(last ^ 1)
            out[i] = " ".join(toks)
            return out
    raise AssertionError(f"no {kind} record")


@pytest.mark.parametrize("kind", ["enc4", "lut", "bf16", "q4", "dq4", "q8", "adamw", "adamw8"])
def test_a_wrong_expectation_fails(host_tests, case_lines, tmp_path, kind):
    # The program must be able to fail: one flipped bit in one expected value of one record.
    lines = [line for line in case_lines if line.startswith(kind + " ")][:2]
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(_corrupt(lines, kind)) + "\n")
    r = _run(host_tests, path)
    assert r.returncode == 1
    assert _summary(r.stdout)[2] == 1
    assert "MISMATCH" in r.stderr


def test_gemv_bound_is_tight_enough_to_fail(host_tests, case_lines, tmp_path):
    # With every sum-of-|x w| scale set to 0 the bound is 0: the fp32 sums' real rounding errors
    # must then show up as mismatches (the float64 expectation is not just echoed back).
    line = next(line for line in case_lines if line.startswith("gemv "))
    toks = line.split(" ")
    m, n = int(toks[1]), int(toks[2])
    toks[len(toks) - m * n:] = ["0x0"] * (m * n)
    path = tmp_path / "gemv.txt"
    path.write_text(" ".join(toks) + "\n")
    r = _run(host_tests, path)
    assert r.returncode == 1
    assert _summary(r.stdout)[2] > m * n // 2
    assert "gemv y[" in r.stderr


def test_a_malformed_file_is_an_error(host_tests, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("enc4 0 3 0x0 0x1\n")
    assert _run(host_tests, path).returncode == 2
    path.write_text("nonsense 1 2 3\n")
    assert _run(host_tests, path).returncode == 2
