"""The compile gate: build every shipped Triton (kernel, config) for sm_80 and sm_90 without a GPU.

    python -m qlora_kernels compile-check [--kernels SUBSTR ...] [--arch 80 90] [--json PATH]

For each KernelSpec from `qlora_kernels.backends.triton.compile_specs()` (or `--specs-from
MODULE:FUNCTION`) and each arch, triton.compile() lowers the kernel to PTX ahead of time (no driver
needed), ptxas -v reports registers, spills and static shared memory, and the PTX is searched for
tensor-core instructions and fused multiply-adds. A row fails on a compile error, any spill, shared
memory over the chip's per-block limit, a GEMM without mma (sm_80) / wgmma (sm_90) where
`needs_tensor_cores`, fma where `exact_fp32`, a byte sign-extension (`cvt.s32.s8`: a uint8 used
as an offset, which Triton 3.2 reads as int8), or more single-byte global loads than
`max_byte_loads` (`--allow-spills` and `--allow-byte-loads` report those two without failing, for
older Tritons). A compile that kills its process (an LLVM abort) is retried alone and becomes
a failed row naming the kernel. Exit 0: all rows ok; 1: a row failed (or the specs could not be
loaded); 2: no spec matched --kernels.

Launch-time specialization: Triton's JIT compiles a kernel per argument specialization (pointers
16-byte aligned, ints that are multiples of 16 or equal to 1). The gate compiles the variant every
launch can hit: pointers aligned (torch allocations are), ints unknown. A spec can name int
arguments its launches always see as multiples of 16 in `extra["divisible_by_16"]` and ones always
equal to 1 in `extra["equal_to_1"]`; that is the variant that runs, and its register use differs.
The kernels that stream packed weights add such a variant (`_utils.launch_variant`, named
`...@ints16`) for the shapes of real models (N, K and row strides multiples of 16, unit inner
strides): it is the one whose speed matters, and the only one where Triton can prove the packed
bytes contiguous and aligned. There the gate also counts single-byte global loads (`ld.global.b8`):
a packed stream loaded a byte at a time costs 4-16x the load instructions of a vectorized one,
which the interpreter cannot show.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from .backends.triton._utils import triton_version

DEFAULT_SPECS = "qlora_kernels.backends.triton:compile_specs"

# Max shared memory per block (opt-in) by compute capability, from the CUDA programming guide.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_FALSE_VALUES = ("", "0", "false", "off", "no", "n")

# sm_80 GEMMs use mma.sync (MMAv2); on sm_90 Triton should pick wgmma (MMAv3), and mma.sync there
# means the kernel runs at a fraction of the chip's tensor throughput.
_MMA_RE = re.compile(r"\bmma\.sync\.")
_WGMMA_RE = re.compile(r"\bwgmma\.mma_async\.")
# `mad.f32` is fused too on sm_20+, so it counts as an fma.
_FMA_RE = re.compile(r"\b(?:fma|mad)(?:\.rn)?(?:\.ftz)?(?:\.sat)?\.f32\b")
_COMMENT_RE = re.compile(r"//.*$", re.MULTILINE)
# A scalar byte load from global memory (vector forms such as ld.global.v4.b32 do not match).
_BYTE_LOADS_FAILURE = "single-byte global loads"
_BYTE_LOAD_RE = re.compile(r"\bld\.global(?:\.(?!v\d)[a-z0-9_]+)*\.[bus]8\b")
# A byte sign-extended to 32 or 64 bits: no kernel here has signed 8-bit data (codes, packed
# nibbles and scales are uint8), so this is a uint8 on its way to an address, which Triton 3.2
# computes as int8 (codes >= 128 index before the table). Casting the byte to int32 first
# zero-extends it on every release. (cvt.s16.s8 is left alone: 3.2 also emits it before byte
# stores to shared memory, where only the low 8 bits are kept.)
_SIGNED_BYTE_RE = re.compile(r"\bcvt\.s(?:32|64)\.s8\b")

# Set in the parent before forking workers: a fork shares them without pickling JIT functions.
_SPECS: list[Any] = []
_CONFIGS: list[str] = []
_PTXAS: dict[str, Any] = {}


@dataclasses.dataclass
class Row:
    kernel: str
    config: str
    arch: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_frame: int | None = None
    shared: int | None = None
    tensor_cores: str = "-"
    fma_free: str = "-"
    byte_loads: int | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    # Findings reported but not failed on (spills under --allow-spills).
    warnings: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    # Where the ptxas numbers come from: "triton" (the log of the ptxas run that built the cubin),
    # "ptxas" (a run of our own) or "cache" (an earlier run on identical PTX).
    ptxas_log: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        if not self.ok:
            return "FAIL: " + "; ".join(self.failures)
        return "ok" + (f" (allowed: {'; '.join(self.warnings)})" if self.warnings else "")


# ---------------------------------------------------------------------------------------------
# Triton-version shims. Known forms: 3.2 takes ASTSource(fn, signature, constants, attrs) with
# name-keyed constants and an AttrsDescriptor; 3.3+ renamed it constexprs (keyed by name or by
# argument path) and takes attrs as {(index,): [["tt.divisibility", 16]]}. From 3.2 on, the
# signature names every argument and gives constexprs the type "constexpr".
# ---------------------------------------------------------------------------------------------


def _make_attrs(divisible: list[int], legacy: bool) -> Any:
    if not legacy:
        return {(i,): [["tt.divisibility", 16]] for i in divisible}
    try:
        from triton.backends.compiler import AttrsDescriptor

        return AttrsDescriptor.from_hints({i: 16 for i in divisible})
    except Exception:
        # Without hints the kernel compiles as for unaligned pointers: worse, never wrong.
        return None


def _make_source(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], divisible: list[int]):
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn, signature, constexprs=constexprs, attrs=_make_attrs(divisible, legacy=False))
    if triton_version() >= (3, 2):
        return ASTSource(fn, signature, constants=constexprs, attrs=_make_attrs(divisible, legacy=True))
    raise RuntimeError(f"triton {triton_version()} is older than the 3.2 this gate supports")


def _unwrap_jit(fn: Any) -> Any:
    from triton.runtime.jit import JITFunction

    seen = 0
    # @triton.autotune / @triton.heuristics wrap the JITFunction in objects with `.fn`.
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"{type(fn).__name__} is not a compilable @triton.jit function "
            "(was its module imported with TRITON_INTERPRET=1?)"
        )
    return fn


def _full_signature(spec: Any, fn: Any) -> tuple[dict[str, str], dict[str, Any], list[int]]:
    """The (signature, constexprs, indices with divisibility 16) ASTSource needs, checked."""
    extra = spec.extra or {}
    constexprs = dict(spec.constexprs)
    for name in extra.get("equal_to_1", ()):
        constexprs[name] = 1
    div16 = set(extra.get("divisible_by_16", ()))
    names = list(fn.arg_names)
    unknown = (set(spec.signature) | set(constexprs) | div16) - set(names)
    if unknown:
        raise ValueError(f"spec names arguments the kernel does not have: {sorted(unknown)}")
    by_name = {p.name: p for p in getattr(fn, "params", [])}
    signature: dict[str, str] = {}
    divisible: list[int] = []
    for i, name in enumerate(names):
        p = by_name.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in spec.signature:
            if p is not None and p.is_constexpr:
                raise ValueError(f"{name} is a tl.constexpr: give it in constexprs, not signature")
            ty = spec.signature[name]
            signature[name] = ty
            if ty.startswith("*") or name in div16:
                divisible.append(i)
        elif p is not None and p.is_constexpr and p.default is not inspect.Parameter.empty:
            constexprs[name] = p.default
            signature[name] = "constexpr"
        else:
            raise ValueError(f"argument {name} is in neither signature nor constexprs")
    return signature, constexprs, divisible


# ---------------------------------------------------------------------------------------------
# ptxas
# ---------------------------------------------------------------------------------------------


def _find_ptxas(override: str | None) -> tuple[str, list[str]]:
    """The ptxas Triton itself uses for the cubin, and the extra flags it passes.

    Triton's own ptxas, not the first one on PATH: the PTX's .version follows that ptxas (an older
    one rejects it), and that is the ptxas that builds the cubin which ships, whose numbers count.
    """
    flags: list[str] = []
    try:
        import triton.backends.nvidia.compiler as nv

        src = inspect.getsource(nv)
        # Newer Tritons pass this to every ptxas (a workaround for a 13.x register-allocator
        # bug); the numbers must come from the same allocator settings as the shipped cubin.
        if "--regAllocOptLevel=2" in src:
            flags.append("--regAllocOptLevel=2")
    except Exception:
        nv = None
    if override:
        return override, flags
    candidates: list[str | None] = [os.environ.get("TRITON_PTXAS_PATH")]
    try:
        from triton import knobs

        candidates.append(knobs.nvidia.ptxas.path)
    except Exception:
        pass
    if nv is not None and hasattr(nv, "_path_to_binary"):
        try:
            candidates.append(nv._path_to_binary("ptxas")[0])
        except Exception:
            pass
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    except Exception:
        pass
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates += [os.path.join(cuda_home, "bin", "ptxas"), shutil.which("ptxas")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c, flags
    raise FileNotFoundError("no ptxas found (set TRITON_PTXAS_PATH or pass --ptxas)")


def _ptxas_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception:
        return "?"
    m = re.search(r"release (\S+),", out)
    return m.group(1) if m else "?"


def _ptxas_cmd(arch: int, exact_fp32: bool) -> list[str]:
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    cmd = [_PTXAS["path"], "-v", *_PTXAS["flags"], f"--gpu-name={gpu}"]
    if exact_fp32:
        # Triton builds such kernels' cubins with --fmad=false; measure what ships.
        cmd.append("--fmad=false")
    return cmd


def _cache_path(ptx: str, cmd: list[str]) -> str | None:
    cache_dir = _PTXAS.get("cache_dir")
    if not cache_dir:
        return None
    h = hashlib.sha256("\0".join([_PTXAS["version"], *cmd, ptx]).encode()).hexdigest()
    return os.path.join(cache_dir, h + ".log")


def _cache_put(path: str | None, log: str) -> None:
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(log)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def _ptxas_log(ptx: str, arch: int, exact_fp32: bool, triton_log: str | None, row: Row) -> str | None:
    """ptxas -v output for this PTX: Triton's own if it was captured, else cached, else run."""
    cmd = _ptxas_cmd(arch, exact_fp32)
    cache = _cache_path(ptx, cmd)
    if triton_log and re.search(r"Used \d+ registers", triton_log):
        row.ptxas_log = "triton"
        _cache_put(cache, triton_log)
        return triton_log
    if cache is not None and os.path.isfile(cache):
        with open(cache) as f:
            row.ptxas_log = "cache"
            return f.read()
    with tempfile.TemporaryDirectory(prefix="qlk-compile-check-") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(cmd + [src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = [ln for ln in log.splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
        row.failures.append(f"ptxas error: {last[0].strip()[:200]}")
        return None
    row.ptxas_log = "ptxas"
    _cache_put(cache, log)
    return log


def _parse_ptxas(log: str, row: Row) -> None:
    m = re.search(r"Used (\d+) registers", log)
    row.registers = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        row.stack_frame, row.spill_stores, row.spill_loads = map(int, m.groups())
    # Triton's tiles live in dynamic shared memory (metadata.shared); ptxas only sees static smem.
    m = re.search(r"(\d+) bytes smem", log)
    row.shared = (row.shared or 0) + (int(m.group(1)) if m else 0)
    if row.registers is None or row.spill_stores is None:
        row.failures.append("could not parse ptxas -v output")


def _compile(src: Any, target: Any, options: dict[str, Any]) -> tuple[Any, str | None]:
    """triton.compile, plus the -v log of the ptxas run that built the cubin when Triton can
    print it (3.4+: knobs.nvidia.dump_ptxas_log): saves running ptxas a second time, which on a
    kernel that spills heavily takes as long as the whole Triton compile."""
    import triton

    nv_knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    # Look the knob up on the class: reading the descriptor there raises instead of answering.
    if nv_knobs is None or not any("dump_ptxas_log" in vars(k) for k in type(nv_knobs).__mro__):
        return triton.compile(src, target=target, options=options), None
    before = nv_knobs.__dict__.get("dump_ptxas_log", _MISSING)
    out = io.StringIO()
    try:
        # Stored the way the knob stores an override, bypassing its setter, which would also
        # export TRITON_DUMP_PTXAS_LOG=1 to the environment (and to anything run later). Should a
        # later Triton read it differently, no log comes back and the gate runs ptxas itself.
        nv_knobs.__dict__["dump_ptxas_log"] = True
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(src, target=target, options=options)
    finally:
        if before is _MISSING:
            nv_knobs.__dict__.pop("dump_ptxas_log", None)
        else:
            nv_knobs.__dict__["dump_ptxas_log"] = before
    return compiled, out.getvalue()


_MISSING = object()


# ---------------------------------------------------------------------------------------------
# One (spec, arch)
# ---------------------------------------------------------------------------------------------


def _check_one(task: tuple[int, int]) -> Row:
    idx, arch = task
    spec = _SPECS[idx]
    row = Row(kernel=spec.name, config=_CONFIGS[idx], arch=arch)
    t0 = time.perf_counter()
    try:
        _compile_and_inspect(spec, arch, row)
    except Exception as e:  # a compile error is a result, not a crash of the gate
        row.failures.append(f"compile error: {_describe_error(e)}")
    row.seconds = time.perf_counter() - t0
    return row


def _describe_error(e: BaseException) -> str:
    # Triton's CompilationError text is "at L:C:", the kernel source, a caret line, then the
    # reason: keep the location and the reason, drop the source.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    where = lines[0].rstrip(":") if len(lines) > 1 and lines[0].startswith("at ") else ""
    cause = e.__cause__
    reason = f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else (lines[-1] if lines else "")
    text = f"{type(e).__name__}{' ' + where if where else ''}: {reason}" if reason else type(e).__name__
    return " ".join(text.split())[:300]


def _compile_and_inspect(spec: Any, arch: int, row: Row) -> None:
    from triton.backends.compiler import GPUTarget

    fn = _unwrap_jit(spec.fn)
    signature, constexprs, divisible = _full_signature(spec, fn)
    options: dict[str, Any] = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.exact_fp32:
        options["enable_fp_fusion"] = False
    src = _make_source(fn, signature, constexprs, divisible)
    compiled, triton_log = _compile(src, GPUTarget("cuda", arch, 32), options)
    ptx = compiled.asm["ptx"]
    row.shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    log = _ptxas_log(ptx, arch, spec.exact_fp32, triton_log, row)
    if log is not None:
        _parse_ptxas(log, row)
    code = _COMMENT_RE.sub("", ptx)

    if spec.needs_tensor_cores:
        if arch >= 90:
            has = bool(_WGMMA_RE.search(code))
            row.tensor_cores = "yes" if has else ("no (mma.sync only)" if _MMA_RE.search(code) else "no")
            if not has:
                row.failures.append("tensor cores required but no wgmma in the sm_90 PTX"
                                    + (" (mma.sync only)" if _MMA_RE.search(code) else ""))
        else:
            has = bool(_MMA_RE.search(code))
            row.tensor_cores = "yes" if has else "no"
            if not has:
                row.failures.append(f"tensor cores required but no mma in the sm_{arch} PTX")
    if spec.exact_fp32:
        fmas = _FMA_RE.findall(code)
        if spec.explicit_fma:
            row.fma_free = f"{len(fmas)} own"
            if not fmas or len(fmas) % spec.explicit_fma:
                row.failures.append(f"exact_fp32 kernel has {len(fmas)} fma instruction(s), not a multiple of the "
                                    f"{spec.explicit_fma} it writes itself per loop trip")
        else:
            row.fma_free = "no" if fmas else "yes"
            if fmas:
                row.failures.append(f"exact_fp32 kernel has {len(fmas)} fma instruction(s) ({fmas[0]})")
    signed_bytes = _SIGNED_BYTE_RE.findall(code)
    if signed_bytes:
        row.failures.append(f"{len(signed_bytes)} byte(s) sign-extended ({signed_bytes[0]}): a uint8 offset read as "
                            "int8; cast it to int32 before adding it to a pointer")
    row.byte_loads = len(_BYTE_LOAD_RE.findall(code))
    if spec.max_byte_loads is not None and row.byte_loads > spec.max_byte_loads:
        row.failures.append(f"{row.byte_loads} {_BYTE_LOADS_FAILURE} (at most {spec.max_byte_loads}): "
                            "a packed stream is not loaded in vectors")
    if row.spill_stores or row.spill_loads:
        row.failures.append(f"spills {row.spill_stores} B stored / {row.spill_loads} B loaded "
                            f"({row.registers} registers)")
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and row.shared is not None and row.shared > limit:
        row.failures.append(f"shared memory {row.shared} B over the sm_{arch} limit of {limit} B")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qlora_kernels compile-check",
        description="Compile every shipped Triton kernel config for sm_80/sm_90 (no GPU needed) and "
                    "fail on compile errors, register spills, shared memory over the limit, GEMMs "
                    "without tensor cores, and fma in kernels that must round like the reference.",
    )
    p.add_argument("--kernels", nargs="+", metavar="SUBSTR",
                   help="only specs whose name (or name[config]) contains one of these")
    p.add_argument("--arch", nargs="+", type=int, default=[80, 90], choices=sorted(SHARED_LIMIT),
                   help="compute capabilities to compile for (default: 80 90)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    p.add_argument("--specs-from", default=DEFAULT_SPECS, metavar="MODULE:FUNCTION",
                   help=f"function returning the KernelSpecs (default: {DEFAULT_SPECS})")
    p.add_argument("--allow-spills", action="store_true",
                   help="report register spills without failing on them (for older Tritons whose "
                        "code generation the shipped configs are not tuned for)")
    p.add_argument("--allow-byte-loads", action="store_true",
                   help="report packed streams loaded a byte at a time without failing on them (for "
                        "older Tritons, which do not vectorize those loads)")
    p.add_argument("--jobs", "-j", type=int, default=0,
                   help="parallel compiles (default: CPU count, at most 4; 1 = in this process)")
    p.add_argument("--ptxas", help="ptxas to use (default: the one Triton uses)")
    p.add_argument("--no-cache", action="store_true",
                   help=f"do not reuse ptxas results of earlier runs on identical PTX "
                        f"(kept in {_default_cache_dir()})")
    return p


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in _FALSE_VALUES


def _rerun_without_interpreter(argv: list[str]) -> int:
    # Under TRITON_INTERPRET=1, @triton.jit yields interpreted functions that cannot be compiled,
    # and the flag must be unset before the kernel modules are imported: hence a fresh process.
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [pkg_parent, os.getcwd()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "qlora_kernels.compile_check", *argv], env=env).returncode


def _load_specs(target: str) -> list[Any]:
    mod_name, _, func_name = target.partition(":")
    mod = importlib.import_module(mod_name)
    specs = getattr(mod, func_name or "compile_specs")()
    return list(specs)


def _matches(spec: Any, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    label = f"{spec.name}[{spec.config}]"
    return any(p in label for p in patterns)


def _config_labels(specs: list[Any]) -> list[str]:
    """spec.config, plus the argument types that tell apart specs sharing a name and config
    (the same kernel built for several input dtypes)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault((s.name, s.config), []).append(i)
    labels = [s.config for s in specs]
    for members in groups.values():
        if len(members) < 2:
            continue
        sigs = [specs[i].signature for i in members]
        differing = [k for k in sigs[0] if len({str(sg.get(k)) for sg in sigs}) > 1]
        for i in members:
            if differing:
                labels[i] += "," + ",".join(f"{k}:{specs[i].signature.get(k)}" for k in differing)
    return labels


def _default_cache_dir() -> str:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"qlora_kernels-compile-check-{uid}")


def _fmt_int(v: int | None) -> str:
    return "?" if v is None else str(v)


def _table(rows: list[Row]) -> str:
    head = ["kernel", "config", "arch", "regs", "spill st/ld", "smem B", "tensor cores", "fma-free", "byte lds",
            "status"]
    body = [[r.kernel, r.config, f"sm_{r.arch}", _fmt_int(r.registers),
             "?" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}",
             _fmt_int(r.shared), r.tensor_cores, r.fma_free, _fmt_int(r.byte_loads), r.status] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head) - 1)]
    lines = []
    for cells in [head] + body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1])
        if cells is head:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def _run_tasks(tasks: list[tuple[int, int]], jobs: int) -> list[Row]:
    import multiprocessing as mp

    if not (jobs > 1 and len(tasks) > 1 and "fork" in mp.get_all_start_methods()):
        return _with_progress(map(_check_one, tasks), len(tasks))
    # Separate processes, not threads: triton.compile is CPU-bound Python + MLIR and not
    # guaranteed thread-safe before 3.4. Forking before any compilation keeps it safe (no
    # MLIR/LLVM thread pools exist yet) and hands the workers the specs without pickling.
    ctx = mp.get_context("fork")
    rows: list[Row | None] = [None] * len(tasks)
    crashed: list[int] = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
        futures = {pool.submit(_check_one, t): i for i, t in enumerate(tasks)}
        done = _with_progress(_results_as_completed(futures, crashed), len(tasks))
    for i, row in done:
        rows[i] = row
    # A compiler that aborts (Triton 3.2's "LLVM ERROR: Failed to emit transfer from register to
    # shared", say) takes its worker down and breaks the pool: every task it left unfinished runs
    # again alone, so the gate names the kernel that crashes instead of dying with it.
    for i in crashed:
        rows[i] = _check_alone(tasks[i], ctx)
    return [r for r in rows if r is not None]


def _results_as_completed(futures: dict, crashed: list[int]):
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    for fut in as_completed(futures):
        try:
            yield futures[fut], fut.result()
        except BrokenProcessPool:
            crashed.append(futures[fut])


def _check_alone(task: tuple[int, int], ctx: Any) -> Row:
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(_check_one, task).result()
        except BrokenProcessPool:
            idx, arch = task
            row = Row(kernel=_SPECS[idx].name, config=_CONFIGS[idx], arch=arch)
            row.failures.append("compiler crashed: its process died (message above; --jobs 1 to reproduce)")
            return row


def _with_progress(rows: Any, total: int) -> list[Row]:
    # All of the package's configs take minutes on a small CI machine: say now and then that the
    # gate is alive, so a no-output watchdog does not kill it (stderr keeps stdout the table).
    out, last = [], time.perf_counter()
    for row in rows:
        out.append(row)
        if time.perf_counter() - last > 30 and len(out) < total:
            print(f"compile-check: {len(out)}/{total} compiled", file=sys.stderr, flush=True)
            last = time.perf_counter()
    return out


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The paths given checked before any compile (minutes of them): parser.error (exit status 2,
    naming the argument) rather than a failure on every kernel, or after all of them."""
    if args.ptxas is not None:
        found = shutil.which(args.ptxas)
        if found is None:
            why = ("is not an executable file" if os.path.exists(args.ptxas)
                   else "does not exist" if os.sep in args.ptxas or (os.altsep and os.altsep in args.ptxas)
                   else "is not on PATH")
            parser.error(f"argument --ptxas: {args.ptxas!r} {why}")
        args.ptxas = found
    if args.json is not None:
        path = os.path.abspath(args.json)
        parent = os.path.dirname(path)
        if os.path.isdir(path):
            parser.error(f"argument --json: {args.json!r} is a directory")
        if not os.path.isdir(parent):
            parser.error(f"argument --json: directory {parent!r} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            parser.error(f"argument --json: {args.json!r} is not writable")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv[:1] == ["compile-check"]:
        argv = argv[1:]
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if _interpret_requested():
        return _rerun_without_interpreter(argv)

    t0 = time.perf_counter()
    try:
        import triton
    except ImportError as e:
        print(f"compile-check: triton is not installed ({e})", file=sys.stderr)
        return 1
    try:
        specs = _load_specs(args.specs_from)
    except Exception as e:
        print(f"compile-check: could not load specs from {args.specs_from}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    specs = [s for s in specs if _matches(s, args.kernels)]
    if not specs:
        print(f"compile-check: no kernel spec matched {args.kernels or '(all)'} in {args.specs_from}",
              file=sys.stderr)
        return 2
    try:
        path, flags = _find_ptxas(args.ptxas)
    except FileNotFoundError as e:
        print(f"compile-check: {e}", file=sys.stderr)
        return 1
    _PTXAS.update(path=path, flags=flags, version=_ptxas_version(path),
                  cache_dir=None if args.no_cache else _default_cache_dir())
    _SPECS[:] = specs
    _CONFIGS[:] = _config_labels(specs)

    archs = list(dict.fromkeys(args.arch))
    # A spec with `archs` is a config only that architecture family launches (an sm_90 tile shape).
    tasks = [(i, a) for i in range(len(specs)) for a in archs
             if getattr(specs[i], "archs", None) is None or a in specs[i].archs]
    jobs = args.jobs if args.jobs > 0 else min(os.cpu_count() or 1, 4)
    print(f"compile-check: triton {triton.__version__}, ptxas {_PTXAS['version']} ({path}), "
          f"{len(specs)} spec(s) x {len(archs)} arch(s), {min(jobs, len(tasks))} job(s)", flush=True)
    rows = _run_tasks(tasks, jobs)
    allowed = (["spills "] if args.allow_spills else []) + ([_BYTE_LOADS_FAILURE] if args.allow_byte_loads else [])
    for r in rows:
        r.warnings += [f for f in r.failures if any(a in f for a in allowed)]
        r.failures = [f for f in r.failures if not any(a in f for a in allowed)]
    elapsed = time.perf_counter() - t0

    print(_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"compile-check: {len(rows) - len(failed)} ok, {len(failed)} failed, {elapsed:.1f} s")
    if args.json:
        doc = {
            "ok": not failed,
            "triton": triton.__version__,
            "ptxas": {"path": path, "version": _PTXAS["version"], "flags": flags},
            "elapsed_s": round(elapsed, 2),
            "rows": [dict(dataclasses.asdict(r), ok=r.ok, status=r.status) for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
