#!/usr/bin/env bash
# Prepares .device-carry/site/ (gitignored) with the Python packages the lent GPU machine lacks,
# for the device tool's `carry` (64 MiB limit per call): bitsandbytes 0.50.2, the baseline of the
# bitsandbytes+PEFT benchmarks. The GPU machine runs CPython 3.12 with a CUDA 13.0 torch, so only
# the wheel's CUDA 13.0 library is kept (the whole wheel is 43 MB; slimmed, about 4 MB).
# Then: run `bash bench/device_check.sh` there with carry [".device-carry"].
set -euo pipefail
cd "$(dirname "$0")/.."

BNB_VERSION=${BNB_VERSION:-0.50.2}
CUDA_LIB=${BNB_CUDA_LIB:-cuda130}
PY=${PYTHON:-python3}
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dl" "bitsandbytes==$BNB_VERSION"

rm -rf .device-carry
mkdir -p .device-carry/site
"$PY" -m zipfile -e "$dl"/bitsandbytes-*.whl .device-carry/site
find .device-carry/site/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' \
  ! -name "libbitsandbytes_${CUDA_LIB}.so" ! -name 'libbitsandbytes_cpu.so' -delete
ls .device-carry/site/bitsandbytes/libbitsandbytes_*.so
du -sh .device-carry
