"""`python -m qlora_kernels validate`: passes on this machine, and fails when a kernel is wrong."""

import io

import pytest
import torch

from qlora_kernels import __main__ as cli
from qlora_kernels import validate


def test_validate_quick_passes_on_reference_and_triton(capsys):
    assert cli.main(["validate", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    for backend in ("reference", "triton"):
        assert f" {backend} " in out
    assert "backend cuda: unavailable" in out or torch.cuda.is_available()


def test_validate_fails_on_a_broken_kernel(monkeypatch):
    from qlora_kernels.backends.triton import quant_4bit

    real = quant_4bit.IMPLS["dequantize_4bit"]

    def off_by_one_ulp(*args):
        out = real(*args)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setitem(quant_4bit.IMPLS, "dequantize_4bit", off_by_one_ulp)
    buf = io.StringIO()
    rows = validate.validate(["triton"], quick=True, out=buf)
    assert any(not r.ok for r in rows) and "FAIL" in buf.getvalue()
    assert cli.main(["validate", "--quick", "--backend", "triton"]) == 1


def test_unknown_command_and_help(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["validate", "--backend", "tpu"]])
def test_bad_backend_argument(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_validate_checks_the_linear_gradients(monkeypatch):
    """A backward whose dA is off by 0.1% fails its "dA" rows, while Y and dX still pass."""
    from qlora_kernels.backends.triton import qlora_linear

    real = qlora_linear.IMPLS["qlora_linear_bwd"]

    def wrong_da(*args):
        dx, da, db = real(*args)
        return dx, da * (1 + 2.0**-10), db

    monkeypatch.setitem(qlora_linear.IMPLS, "qlora_linear_bwd", wrong_da)
    rows = validate.validate(["triton"], quick=True, out=io.StringIO())
    linear = [r for r in rows if r.op.startswith("qlora_linear")]
    assert {r.op.split()[-1] for r in linear if not r.ok} == {"dA"}
    assert any(r.ok for r in linear if r.op.endswith(" Y")) and any(r.ok for r in linear if r.op.endswith(" dX"))
