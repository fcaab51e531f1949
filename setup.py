"""Install qlora_kernels; builds csrc/ with CMake into qlora_kernels/lib/ when nvcc is found.

    pip install --no-build-isolation -e .     (scripts/setup.sh; no isolation: nothing to download)
    pip install --no-build-isolation .

Environment:
    QLORA_KERNELS_SKIP_CUDA=1      never build the CUDA library (pure Python + Triton install)
    QLORA_KERNELS_REQUIRE_CUDA=1   fail the install when the library cannot be built
                                   (otherwise a missing nvcc/cmake or a build error only warns)
    QLORA_CUDA_ARCHS="80;90"       CUDA architectures (CMake's CUDA_ARCHITECTURES syntax)
    QLORA_KERNELS_BUILD_DIR        CMake build directory (default: build/, reused: incremental)
    CMAKE_BUILD_PARALLEL_LEVEL     build jobs (default: the CPUs this process may use, at most 8)

The build writes qlora_kernels/lib/libqlora_kernels.so in the source tree, which an editable
install uses directly and a regular install copies as package data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
LIB_PATH = ROOT / "qlora_kernels" / "lib" / "libqlora_kernels.so"


def _log(msg: str) -> None:
    print(f"qlora_kernels setup: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() == "1"


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.realpath(c)
    return None


def will_build_cuda() -> bool:
    return not _flag("QLORA_KERNELS_SKIP_CUDA") and find_nvcc() is not None


def _cache_value(cache: Path, key: str) -> str | None:
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(key + ":"):
            return line.split("=", 1)[1].strip()
    return None


def _jobs() -> str:
    if os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL"):
        return os.environ["CMAKE_BUILD_PARALLEL_LEVEL"]
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return str(max(1, min(n, 8)))


def build_csrc() -> bool:
    """Configure (first time only) and build libqlora_kernels.so; True when it was built."""
    if _flag("QLORA_KERNELS_SKIP_CUDA"):
        _log("QLORA_KERNELS_SKIP_CUDA=1: not building the CUDA library")
        return False
    require = _flag("QLORA_KERNELS_REQUIRE_CUDA")

    def give_up(why: str) -> bool:
        if require:
            raise RuntimeError(f"qlora_kernels: CUDA library required (QLORA_KERNELS_REQUIRE_CUDA=1) but {why}")
        _log(f"WARNING: {why}; installing without the CUDA library (reference and Triton backends only)")
        return False

    nvcc = find_nvcc()
    if nvcc is None:
        return give_up("nvcc was not found (PATH, CUDACXX, CUDA_HOME, /usr/local/cuda)")
    cmake = shutil.which("cmake")
    if cmake is None:
        return give_up("cmake was not found on PATH")

    build_dir = Path(os.environ.get("QLORA_KERNELS_BUILD_DIR") or ROOT / "build").resolve()
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and _cache_value(cache, "CMAKE_HOME_DIRECTORY") != str(ROOT):
        # A build tree of another checkout (copied or moved): CMake refuses to reuse it.
        _log(f"{build_dir} was configured for another source tree; reconfiguring")
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)

    configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 "-DQLORA_KERNELS_REQUIRE_CUDA=ON"]
    if not cache.exists():
        configure.append("-DCMAKE_BUILD_TYPE=Release")
    archs = os.environ.get("QLORA_CUDA_ARCHS")
    if archs:
        configure.append(f"-DQLORA_CUDA_ARCHS={archs}")
    build = [cmake, "--build", str(build_dir), "--target", "qlora_kernels", "-j", _jobs()]
    # A tree configured by hand without nvcc on PATH has no CUDA compiler (and no library target).
    cuda_known = cache.exists() and (_cache_value(cache, "CMAKE_CUDA_COMPILER") or "").endswith("nvcc")
    try:
        # Configuring only once keeps a no-change reinstall to a make no-op; CMake re-runs its
        # own configure step when CMakeLists.txt changes.
        if not cuda_known or archs:
            _log(" ".join(configure))
            subprocess.run(configure, check=True)
        _log(" ".join(build))
        subprocess.run(build, check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        return give_up(f"the CMake build of csrc failed ({e})")
    if not LIB_PATH.exists():
        return give_up(f"the CMake build did not produce {LIB_PATH}")
    _log(f"built {LIB_PATH}")
    return True


class BuildPyWithCsrc(build_py):
    """build_py that first builds the CUDA library into the package (regular and editable)."""

    def run(self):
        build_csrc()
        super().run()


class MaybeBinaryDistribution(Distribution):
    # A wheel carrying libqlora_kernels.so is platform-specific, not py3-none-any.
    def has_ext_modules(self):
        return will_build_cuda() or LIB_PATH.exists()


setup(
    name="qlora_kernels",
    version="0.1.0",
    description="NF4 QLoRA kernels: pure-PyTorch reference, Triton and CUDA C++",
    packages=find_packages(include=["qlora_kernels", "qlora_kernels.*"]),
    package_data={"qlora_kernels": ["lib/*.so"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system=='Linux'",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": ["scipy", "pytest", "pytest-benchmark", "bitsandbytes==0.50.2", "transformers", "peft", "matplotlib"],
    },
    cmdclass={"build_py": BuildPyWithCsrc},
    distclass=MaybeBinaryDistribution,
    zip_safe=False,
)
