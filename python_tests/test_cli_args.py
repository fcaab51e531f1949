"""Bad command-line arguments of demo, bench and compile-check: argparse's exit status 2 with a
message naming the argument, before anything slow runs (model load, training, benchmarks,
compiles): the slow functions are replaced by ones that fail the test when called."""

import contextlib
import os
import signal
import stat

import pytest
import torch

from qlora_kernels import bench, compile_check, demo, demo_data


class SlowPathCalled(Exception):
    """Raised by the stand-ins of the slow functions: the arguments got past validation."""


def _forbid(*_a, **_k):
    raise SlowPathCalled


def _rejects(main, argv, capsys, names):
    """main(argv) exits with status 2 (before any slow function: those raise SlowPathCalled) and
    its message names every one of `names`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    for name in names:
        assert name in err, err
    return err


@contextlib.contextmanager
def _time_limit(seconds):
    """Fail (instead of hanging the session) when the body runs longer than `seconds`."""

    def on_alarm(*_):
        raise TimeoutError(f"still running after {seconds} s (hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- demo --------------------------------------------------------------------------------------


@pytest.fixture
def demo_no_run(monkeypatch):
    monkeypatch.setattr(demo, "run", _forbid)
    monkeypatch.setattr(demo, "load_base", _forbid)


N_TRAIN = len(demo_data.load_splits(0)[0])


@pytest.mark.parametrize("argv, name", [
    (["--batch-size", str(N_TRAIN + 1)], "--batch-size"),  # hung forever in batches()
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--quick", "--steps", "0"], "--steps"),
    (["--r", "0"], "--r"),
    (["--r", "-2"], "--r"),
    (["--lr", "nan"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--head-lr", "nan"], "--head-lr"),
    (["--head-lr", "-1"], "--head-lr"),
    (["--seed", str(2**70)], "--seed"),
    (["--device", "nope"], "--device"),
    (["--device", "meta"], "--device"),
])
def test_demo_rejects_bad_numbers_and_devices(argv, name, demo_no_run, tmp_path, capsys):
    err = _rejects(demo.main, argv + ["--out", str(tmp_path / "out")], capsys, [name])
    assert "expected one argument" not in err  # argparse's own complaint, not the check's


def test_demo_rejects_cuda_without_cuda(demo_no_run, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:0"):
        err = _rejects(demo.main, ["--device", dev, "--out", str(tmp_path)], capsys, ["--device"])
        assert "not available" in err


def test_demo_rejects_a_cuda_index_past_the_devices(demo_no_run, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _rejects(demo.main, ["--device", "cuda:3", "--out", str(tmp_path)], capsys, ["--device", "cuda:3"])


def test_demo_rejects_an_unusable_out_before_training(demo_no_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _rejects(demo.main, ["--out", str(a_file)], capsys, ["--out", "not a directory"])
    _rejects(demo.main, ["--out", str(a_file / "sub")], capsys, ["--out"])
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "results.json").mkdir()
    _rejects(demo.main, ["--out", str(out)], capsys, ["--out", "results.json"])
    (out / "results.json").rmdir()
    (out / "adapter").rmdir()
    (out / "adapter").write_text("x")
    _rejects(demo.main, ["--out", str(out)], capsys, ["--out", "adapter"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_demo_rejects_a_read_only_out(demo_no_run, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        _rejects(demo.main, ["--out", str(ro / "out")], capsys, ["--out", "not writable"])
    finally:
        ro.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("argv", [
    [],
    ["--quick"],
    ["--batch-size", str(N_TRAIN), "--steps", "1", "--r", "1", "--lr", "0", "--device", "cpu"],
])
def test_demo_good_arguments_reach_the_run(argv, monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run(kind, args, train, evals, device, compute_dtype, texts):
        seen.update(args=args, device=device, n_train=len(train))
        raise SlowPathCalled

    monkeypatch.setattr(demo, "run", fake_run)
    out = tmp_path / "new" / "dir"  # not there yet: created later by save_adapter
    with pytest.raises(SlowPathCalled):
        demo.main(argv + ["--out", str(out)])
    assert seen["n_train"] == N_TRAIN and seen["args"].steps >= 1
    assert seen["device"].type in ("cpu", "cuda")


def test_batches_raises_instead_of_hanging_when_no_batch_fits():
    with _time_limit(10):
        for bs in (N_TRAIN + 1, 0, -1):
            with pytest.raises(ValueError, match="batch_size"):
                demo.batches(N_TRAIN, bs, 5, 0)
        with pytest.raises(ValueError, match="steps"):
            demo.batches(N_TRAIN, 8, -1, 0)
    full = demo.batches(N_TRAIN, N_TRAIN, 3, 0)  # exactly one batch per epoch still works
    assert len(full) == 3 and all(sorted(b) == list(range(N_TRAIN)) for b in full)
    few = demo.batches(10, 3, 7, 0)
    assert len(few) == 7 and all(len(b) == 3 and len(set(b)) == 3 for b in few)


# --- bench -------------------------------------------------------------------------------------


@pytest.fixture
def bench_no_run(monkeypatch):
    monkeypatch.setattr(bench, "run", _forbid)


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf", "-inf"])
def test_bench_rejects_a_bad_budget(budget, bench_no_run, tmp_path, capsys):
    # "--budget-s=X": argparse would take a bare "-inf" for an option and fail on its own.
    _rejects(bench.main, [f"--budget-s={budget}", "--out", str(tmp_path)], capsys, ["--budget-s", "> 0"])


def test_bench_rejects_an_out_that_is_a_file_before_running(bench_no_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _rejects(bench.main, ["--quick", "--out", str(a_file)], capsys, ["--out", "not a directory"])
    _rejects(bench.main, ["--quick", "--out", str(a_file / "sub")], capsys, ["--out"])


def test_bench_good_arguments_reach_the_run(monkeypatch, tmp_path):
    seen = {}

    def fake_run(ops, quick, out_dir, stream=None, budget_s=None):
        seen.update(ops=ops, quick=quick, out_dir=out_dir, budget_s=budget_s)
        return {}, ["a result"]

    monkeypatch.setattr(bench, "run", fake_run)
    out = tmp_path / "new" / "dir"
    assert bench.main(["--quick", "--ops", "optimizer", "--budget-s", "2.5", "--out", str(out)]) == 0
    assert out.is_dir()  # made before the run, so a bad path fails before it
    assert seen == {"ops": ["optimizer"], "quick": True, "out_dir": out, "budget_s": 2.5}
    assert bench.main(["--out", str(out)]) == 0 and seen["budget_s"] is None


# --- compile-check -----------------------------------------------------------------------------


@pytest.fixture
def no_compiles(monkeypatch):
    monkeypatch.setattr(compile_check, "_rerun_without_interpreter", _forbid)
    monkeypatch.setattr(compile_check, "_load_specs", _forbid)
    monkeypatch.setattr(compile_check, "_run_tasks", _forbid)


@pytest.fixture
def fake_ptxas(tmp_path):
    p = tmp_path / "bin" / "ptxas"
    p.parent.mkdir()
    p.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.0'\n")
    p.chmod(0o755)
    return p


def test_compile_check_rejects_a_missing_ptxas_once_up_front(no_compiles, tmp_path, capsys):
    err = _rejects(compile_check.main, ["--ptxas", str(tmp_path / "missing")], capsys, ["--ptxas", "missing"])
    assert err.count("error:") == 1
    not_exec = tmp_path / "not_exec"
    not_exec.write_text("")
    _rejects(compile_check.main, ["--ptxas", str(not_exec)], capsys, ["--ptxas", "not an executable"])
    _rejects(compile_check.main, ["--ptxas", str(tmp_path)], capsys, ["--ptxas"])
    _rejects(compile_check.main, ["--ptxas", "no-such-ptxas-here"], capsys, ["--ptxas", "PATH"])


def test_compile_check_rejects_an_unwritable_json_up_front(no_compiles, fake_ptxas, tmp_path, capsys):
    _rejects(compile_check.main, ["--json", str(tmp_path / "no" / "dir" / "x.json")], capsys,
             ["--json", "does not exist"])
    _rejects(compile_check.main, ["--json", str(tmp_path)], capsys, ["--json", "is a directory"])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _rejects(compile_check.main, ["--json", str(a_file / "x.json")], capsys, ["--json"])


def test_compile_check_good_paths_pass_the_checks(no_compiles, fake_ptxas, tmp_path):
    with pytest.raises(SlowPathCalled):  # got as far as the compiles (or the rerun that runs them)
        compile_check.main(["--ptxas", str(fake_ptxas), "--json", str(tmp_path / "rows.json")])
    assert not (tmp_path / "rows.json").exists()  # nothing written before the compiles


def test_help_still_works(capsys):
    for main in (demo.main, bench.main, compile_check.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out
