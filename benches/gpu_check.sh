#!/usr/bin/env bash
# One-command GPU check: build pub_native with its CUDA module, run every `cuda`-marked test
# (slow ones included) and the GPU benchmarks, and write one report.
#
#   bash benches/gpu_check.sh [OUT_DIR]      # default: $OUT if set, else ./gpu_check
#
# Meant for a machine with an NVIDIA GPU, nvcc, cmake, ninja, pybind11, scikit-build-core,
# torch and pytest and no network: it installs nothing from an index (--no-build-isolation
# --no-deps). Optional wheels in .whl/ (cvxpy, ecos, ... for the solver comparison) are
# installed from there when present. On a machine without a GPU every step still runs: the
# cuda tests report as skipped and the benchmarks say that nothing was measured. Budget: the
# whole script is sized to finish in under 10 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
report="$out/gpu_check_report.txt"
exec > >(tee "$report") 2>&1
py=${PYTHON:-python3}
status=0
step() { echo; echo "==== $* ($(date +%T))"; }

step "machine"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null \
  || echo "nvidia-smi: not available"
"$py" -c "import sys, torch; print('Python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| devices', torch.cuda.device_count())"
nvcc --version 2>/dev/null | tail -1 || echo "nvcc: not found"

if compgen -G ".whl/*.whl" >/dev/null; then
  step "optional wheels from .whl/"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pn-site .whl/*.whl \
    && export PYTHONPATH="/tmp/pn-site${PYTHONPATH:+:$PYTHONPATH}"
fi

step "build (PUB_NATIVE_CUDA=ON)"
t0=$SECONDS
# The default architectures (sm_80, sm_90, compute_80 PTX: what a user's build gets) on a device
# of compute capability 8.x or 9.0, whose machine code they hold; on any other, only the
# device's own, so nothing is JIT-compiled. An empty value resets one cached by an earlier build.
arch=$("$py" -c "import torch; c=torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print('default' if c is None or c[0] in (8, 9) else f'{c[0]}{c[1]}')")
cmake_args="-DCMAKE_CUDA_ARCHITECTURES="
[ "$arch" = default ] || cmake_args="-DCMAKE_CUDA_ARCHITECTURES=$arch"
if PUB_NATIVE_CUDA=ON CMAKE_ARGS="$cmake_args" \
    "$py" -m pip install -q --no-build-isolation --no-deps -e . ; then
  echo "built in $((SECONDS - t0)) s for CUDA architectures $arch"
else
  echo "BUILD FAILED"; exit 1
fi
"$py" -m pub_native

step "cuda-marked tests (slow included)"
"$py" -m pytest python_tests -m cuda -q -rA -p no:cacheprovider \
  --junitxml="$out/cuda_tests.xml" 2>&1 | tail -n 80 || status=1

step "CPU suite on this machine (sanity, not timed)"
"$py" -m pytest python_tests -q -m "not cuda and not slow" -x -p no:cacheprovider 2>&1 \
  | tail -n 5 || status=1

step "GPU step benchmark: PUB vs fused Adam, copy bandwidth, device solver vs cvxpy"
"$py" benches/bench_step_cuda.py --json "$out/bench_step_cuda.json" || status=1

if [ -f benches/bench_train_step.py ]; then
  step "training step on CUDA (census MMoE/PLE, batch 4096)"
  "$py" benches/bench_train_step.py --device cuda --quick --json "$out/bench_train_step_cuda.json" \
    || status=1
fi

step "done: status $status; report in $report"
exit $status
