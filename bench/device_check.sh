#!/usr/bin/env bash
# One-shot check on a lent GPU machine (torch 2.11 + triton 3.6 + nvcc 13.0 there, nothing
# downloadable): build csrc, run the GPU tests, validate every backend, bench --quick, then print
# a short summary table last. Everything lands in $OUT (when set) and bench/results/<card>/.
# Budget: 8 minutes on an H100; every step has its own timeout so one hang cannot eat the lease.
#
# CPU form (CI): QK_DEVICE_CHECK_CPU=1 runs the same steps as they exist on a CPU-only machine
# (csrc compiled but not run, GPU tests skipped, validate/bench on the CPU with the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
CPU_FORM=${QK_DEVICE_CHECK_CPU:-0}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

card=$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown)
results="bench/results/$card"
out=${OUT:-$results}
# The CPU form (CI) writes only to $OUT: CPU numbers do not belong in bench/results/.
[ "$CPU_FORM" = 1 ] && results=$out
mkdir -p "$results" "$out"
log="$out/device_check.log"
: >"$log"

declare -a names=() codes=() secs=()
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  names+=("$name"); codes+=("$rc"); secs+=("$((SECONDS - t0))")
}

step "environment" 60 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda)'"

# GPU form: sm_90 only (the card at hand), in its own build dir. CPU form: the default archs in
# setup.py's incremental build/ (already built by the install, so this step checks it is current).
arch=90 build_dir=build/device
[ "$CPU_FORM" = 1 ] && arch="80;90" build_dir=build
step "build csrc (sm_$arch)" 240 bash -c "cmake -S . -B $build_dir -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA_ARCHS='$arch' >/dev/null && cmake --build $build_dir -j \"\$(nproc)\""

gpu_tests=()
for f in python_tests/test_triton_gpu.py python_tests/test_cuda_backend.py python_tests/test_optim_cuda.py; do
  [ -f "$f" ] && gpu_tests+=("$f")
done
# The fused-linear tests run on the GPU when there is one; on a CPU they are the interpreter tests
# the main suite already runs.
[ "$CPU_FORM" = 1 ] || gpu_tests+=(python_tests/test_qlora_linear.py)
step "GPU tests" 300 "$PY" -m pytest -q -p no:cacheprovider -x "${gpu_tests[@]}"

if [ "$CPU_FORM" != 1 ] && command -v compute-sanitizer >/dev/null; then
  step "memcheck (csrc)" 120 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" bench/sanitizer_case.py
fi

if [ "$CPU_FORM" = 1 ]; then
  step "validate --quick" 300 "$PY" -m qlora_kernels validate --quick
  step "bench --quick" 300 "$PY" -m qlora_kernels bench --quick --ops dequantize linear --out "$out"
else
  step "validate --quick" 150 "$PY" -m qlora_kernels validate --quick
  step "bench --quick" 240 "$PY" -m qlora_kernels bench --quick --out "$out"
fi

if [ "$out" != "$results" ]; then
  cp "$out"/*.json "$out"/*.png "$log" "$results"/ 2>/dev/null || true
fi

echo
echo "summary ($card)" | tee -a "$log"
printf '%-28s %6s %6s\n' step rc seconds | tee -a "$log"
failed=0
for i in "${!names[@]}"; do
  printf '%-28s %6s %6s\n' "${names[$i]}" "${codes[$i]}" "${secs[$i]}" | tee -a "$log"
  [ "${codes[$i]}" = 0 ] || failed=1
done
grep -h '^ratio ' "$log" | tail -n 40
exit "$failed"
