"""Toy kernels with known compile-gate outcomes, for python_tests/test_compile_check.py.

Loaded by the gate as `--specs-from _toy_kernels:toy_specs` in a subprocess without
TRITON_INTERPRET, so these are real (compilable) @triton.jit functions there. Each spec name says
what the gate must conclude about it: `ok_*` pass on sm_80 and sm_90, `bad_*` fail, for the reason
in EXPECTED_FAILURE.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qlora_kernels.backends.triton._utils import KernelSpec, launch_variant


@triton.jit
def toy_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Row-major operands (unit inner stride), as the package's GEMMs take them: a runtime inner
    # stride would turn every tile load into a gather.
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(tl.bfloat16), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def toy_axpy_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # x * y + z is what FMA contraction turns into fma.rn.f32 unless fp fusion is off.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    z = tl.load(z_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * y + z, mask=mask)


@triton.jit
def toy_explicit_fma_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # tl.fma is emitted as fma even with fp fusion off: an exact_fp32 kernel must not use it.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    z = tl.load(z_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, tl.fma(x, y, z), mask=mask)


@triton.jit
def toy_broken_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, 4)
    # A tl.dot over K=4: the interpreter accepts it, the GPU compiler wants K >= 16.
    a = tl.load(x_ptr + rows[:, None] * 4 + cols[None, :])
    c = tl.dot(a, tl.trans(a))
    tl.store(out_ptr + rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], c)


@triton.jit
def toy_unpack_kernel(packed_ptr, out_ptr, n, nbytes, BYTES: tl.constexpr, MASK_FROM_N: tl.constexpr):
    # Nibbles of a packed byte stream to fp32, high nibble first. With the byte count computed
    # here from n, Triton cannot prove it a multiple of 16, the mask varies inside any vector, and
    # every byte is a load of its own; passed in as `nbytes`, the loads become vectors.
    offs = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    if MASK_FROM_N:
        limit = (n + 1) // 2
    else:
        limit = nbytes
    b = tl.load(packed_ptr + offs, mask=offs < limit, other=0)
    vals = tl.reshape(tl.join((b >> 4).to(tl.float32), (b & 0xF).to(tl.float32)), (2 * BYTES,))
    elems = tl.program_id(0) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + elems, vals, mask=elems < n)


_MATMUL_SIG = {
    "a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
    "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32",
}
_AXPY_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"}

# spec name -> substring the gate's status must contain.
EXPECTED_FAILURE = {
    "bad_matmul_spills": "spill",
    "bad_axpy_fma": "fma",
    "bad_axpy_fma_count": "not a multiple of the 3 it writes itself",
    "bad_axpy_no_tensor_cores": "tensor cores",
    "bad_matmul_smem": "shared memory",
    "bad_broken_compile": "compile error",
    "bad_unpack_bytewise@ints16": "single-byte global loads",
}


def _matmul(name: str, bm: int, bn: int, bk: int, warps: int, stages: int) -> KernelSpec:
    return KernelSpec(
        name=name, fn=toy_matmul_kernel, signature=dict(_MATMUL_SIG),
        constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
        num_warps=warps, num_stages=stages, needs_tensor_cores=True,
        # LLM shapes: the JIT sees multiples of 16 and specializes on them (the variant that runs).
        extra={"divisible_by_16": ["M", "N", "K", "stride_am", "stride_bk", "stride_cm"]},
    )


def toy_specs() -> list[KernelSpec]:
    return [
        # 8 warps: with 4, sm_80 sits at 255 registers and spills 8 B under triton 3.3 (0 under
        # 3.2 and 3.7), so it would be a test of the Triton version, not of the gate.
        _matmul("ok_matmul", 128, 128, 64, warps=8, stages=3),
        KernelSpec(
            name="ok_axpy_exact", fn=toy_axpy_kernel, signature=dict(_AXPY_SIG),
            constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, exact_fp32=True,
        ),
        # DESIGN.md section 4: 255 registers and ~2.4 KB of spills on sm_90.
        _matmul("bad_matmul_spills", 128, 256, 64, warps=4, stages=3),
        KernelSpec(
            name="bad_axpy_fma", fn=toy_explicit_fma_kernel, signature=dict(_AXPY_SIG),
            constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, exact_fp32=True,
        ),
        # tl.fma on purpose, declared: 1024 elements / 128 threads = 8 per thread.
        KernelSpec(
            name="ok_axpy_declared_fma", fn=toy_explicit_fma_kernel, signature=dict(_AXPY_SIG),
            constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, exact_fp32=True, explicit_fma=8,
        ),
        KernelSpec(
            name="bad_axpy_fma_count", fn=toy_explicit_fma_kernel, signature=dict(_AXPY_SIG),
            constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, exact_fp32=True, explicit_fma=3,
        ),
        KernelSpec(
            name="bad_axpy_no_tensor_cores", fn=toy_axpy_kernel, signature=dict(_AXPY_SIG),
            constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, needs_tensor_cores=True,
        ),
        # 6 stages of two 128x128 bf16 tiles (64 KiB a stage): over both chips.
        _matmul("bad_matmul_smem", 128, 128, 128, warps=8, stages=6),
        KernelSpec(
            name="bad_broken_compile", fn=toy_broken_kernel, signature={"x_ptr": "*fp32", "out_ptr": "*fp32"},
            constexprs={"BLOCK": 16}, num_warps=4, num_stages=1,
        ),
        *[launch_variant(KernelSpec(
            name=name, fn=toy_unpack_kernel,
            signature={"packed_ptr": "*u8", "out_ptr": "*fp32", "n": "i32", "nbytes": "i32"},
            constexprs={"BYTES": 1024, "MASK_FROM_N": from_n}, num_warps=4, num_stages=1,
        ), divisible_by_16=("n", "nbytes"), max_byte_loads=2)
          for name, from_n in (("ok_unpack_vector", False), ("bad_unpack_bytewise", True))],
    ]


def crashing_specs() -> list[KernelSpec]:
    """Three ok specs and one whose compile kills its process, as Triton 3.2's LLVM abort did
    (os.abort() stands in for the compiler: the gate must name that spec and keep going)."""
    import os
    import sys

    from qlora_kernels import compile_check

    # The gate runs as `python -m qlora_kernels.compile_check`: its functions live in __main__.
    gate = sys.modules["__main__"] if hasattr(sys.modules["__main__"], "_compile_and_inspect") else compile_check
    real = gate._compile_and_inspect

    def compile_or_abort(spec, arch, row):
        if spec.name == "crash_compiler":
            os.abort()
        real(spec, arch, row)

    # Loaded in the gate's main process before it forks its workers, so they inherit the patch.
    gate._compile_and_inspect = compile_or_abort
    axpy = dict(fn=toy_axpy_kernel, signature=dict(_AXPY_SIG), num_warps=4, num_stages=1)
    return [KernelSpec(name=name, constexprs={"BLOCK": block}, **axpy)
            for name, block in (("ok_axpy_a", 256), ("crash_compiler", 512), ("ok_axpy_b", 1024), ("ok_axpy_c", 2048))]
