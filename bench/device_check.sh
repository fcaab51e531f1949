#!/usr/bin/env bash
# One-shot check on a lent GPU machine (torch 2.11 + triton 3.6 + nvcc 13.0 there, nothing
# downloadable): build csrc, run the GPU tests, bench (linear, dequantize, optimizer, with the
# dispatch entries to paste), compute-sanitizer memcheck of csrc, validate every backend, and with
# any time left an Nsight Compute profile of the key kernels; a short summary table last.
# Everything lands in $OUT (when set) and bench/results/<card>/.
#
# Time: the whole script keeps within QK_DEVICE_CHECK_BUDGET_S (default 480 s, inside the device
# tool's 600 s per call): every step's timeout is cut to what is left, less a reserve for the
# steps after it, so the summary and the files always come back. About 7 minutes on an H100.
#
# Packages the GPU machine lacks (bitsandbytes, for the bitsandbytes+PEFT baselines): run
# `bash bench/prepare_device_carry.sh` here first and name `.device-carry` in the run's carry;
# this script puts .device-carry/site on PYTHONPATH when it exists.
#
# CPU form (CI): QK_DEVICE_CHECK_CPU=1 runs the same steps as they exist on a CPU-only machine
# (csrc compiled but not run, GPU tests skipped, validate/bench on the CPU with the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
CPU_FORM=${QK_DEVICE_CHECK_CPU:-0}
BUDGET=${QK_DEVICE_CHECK_BUDGET_S:-480}
[ "$CPU_FORM" = 1 ] && BUDGET=${QK_DEVICE_CHECK_BUDGET_S:-1500}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .device-carry/site ]; then
  export PYTHONPATH="$PWD/.device-carry/site:$PYTHONPATH"
fi

card=$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown)
results="bench/results/$card"
out=${OUT:-$results}
# The CPU form (CI) writes only to $OUT: CPU numbers do not belong in bench/results/.
[ "$CPU_FORM" = 1 ] && results=$out
mkdir -p "$results" "$out"
log="$out/device_check.log"
: >"$log"

declare -a names=() codes=() secs=()
within() {  # within LIMIT_S RESERVE_S: LIMIT_S cut to the budget left after RESERVE_S for later steps
  local left=$((BUDGET - SECONDS - $2))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
step() {  # step NAME LIMIT_S COMMAND... (LIMIT_S from `within`)
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, the time budget is spent" | tee -a "$log"
    names+=("$name"); codes+=("skipped"); secs+=(0)
    return
  fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  names+=("$name"); codes+=("$rc"); secs+=("$((SECONDS - t0))")
}

step "environment" "$(within 60 420)" bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda)'; $PY -c 'import bitsandbytes; print(\"bitsandbytes\", bitsandbytes.__version__)' 2>/dev/null || echo 'bitsandbytes: not importable (no bitsandbytes baselines)'"

# GPU form: sm_90 only (the card at hand), in its own build dir. CPU form: the default archs in
# setup.py's incremental build/ (already built by the install, so this step checks it is current).
arch=90 build_dir=build/device blimit=150
# The CPU form's build is normally a no-op, but two archs from scratch take minutes on 2 cores.
[ "$CPU_FORM" = 1 ] && arch="80;90" build_dir=build blimit=400
step "build csrc (sm_$arch)" "$(within "$blimit" 330)" bash -c "cmake -S . -B $build_dir -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA_ARCHS='$arch' >/dev/null && cmake --build $build_dir --target qlora_kernels -j \"\$(nproc)\""

# The fused-linear tests run on the GPU when there is one; on a CPU they are the interpreter tests
# the main suite already runs, as are the csrc tests (under the fiber emulation there: 2 to over 3
# minutes on a 2-core runner). The CPU form keeps the GPU-only files, which skip, to check the step.
gpu_files=(python_tests/test_triton_gpu.py python_tests/test_optim_cuda.py)
[ "$CPU_FORM" = 1 ] || gpu_files+=(python_tests/test_cuda_backend.py python_tests/test_qlora_linear.py)
gpu_tests=()
for f in "${gpu_files[@]}"; do
  [ -f "$f" ] && gpu_tests+=("$f")
done
# pytest-xdist (in the GPU image) spreads the Triton compiles over the machine's cores.
xdist=()
if [ "$CPU_FORM" != 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then
  xdist=(-n 8)
fi
step "GPU tests" "$(within 180 230)" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" "${gpu_tests[@]}"

if [ "$CPU_FORM" = 1 ]; then
  step "bench --quick" "$(within 300 300)" "$PY" -m qlora_kernels bench --quick --ops dequantize linear --out "$out"
else
  # --budget-s ends the case loop 40 s before the step's limit: the last case, the tables and the
  # JSON/PNG still get written. Under 50 s left there is no budget to give it: skipped.
  limit=$(within 170 140)
  if [ "$limit" -lt 50 ]; then limit=0; fi
  step "bench" "$limit" "$PY" -m qlora_kernels bench --out "$out" --budget-s "$((limit - 40))"
fi

if [ "$CPU_FORM" != 1 ] && command -v compute-sanitizer >/dev/null; then
  step "memcheck (csrc)" "$(within 90 45)" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" bench/sanitizer_case.py
fi

vlimit=150
[ "$CPU_FORM" = 1 ] && vlimit=300
step "validate --quick" "$(within "$vlimit" 0)" "$PY" -m qlora_kernels validate --quick

# Nsight Compute on the kernels the speed goals hang on (bench/profile_case.py), with whatever time
# is left: it tells what bounds each one (tensor cores, the L1/shared-memory pipe that serves the
# NF4 code lookups, or DRAM), which the bench's timings cannot. Informational: it never fails the run.
if [ "$CPU_FORM" != 1 ] && command -v ncu >/dev/null; then
  step "(info) ncu profile" "$(within 90 0)" ncu --profile-from-start off --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --log-file "$out/ncu_profile.txt" "$PY" bench/profile_case.py
fi

if [ "$out" != "$results" ]; then
  cp "$out"/*.json "$out"/*.png "$out"/*.txt "$log" "$results"/ 2>/dev/null || true
fi

echo
echo "summary ($card)" | tee -a "$log"
printf '%-28s %7s %7s\n' step rc seconds | tee -a "$log"
failed=0
for i in "${!names[@]}"; do
  printf '%-28s %7s %7s\n' "${names[$i]}" "${codes[$i]}" "${secs[$i]}" | tee -a "$log"
  [ "${codes[$i]}" = 0 ] || [[ "${names[$i]}" == "(info)"* ]] || failed=1
done
grep -h '^ratio \|MEASURED_' "$log" | tail -n 60
exit "$failed"
