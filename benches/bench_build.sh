#!/usr/bin/env bash
# Build-time benchmark: the wall time of `pip wheel --no-build-isolation --no-deps` from a clean
# copy of this tree (tracked and untracked, not ignored files: no build/ folder, no cached
# objects), once with PUB_NATIVE_CUDA=OFF and once with PUB_NATIVE_CUDA=ON, one after the other.
#
#   bash benches/bench_build.sh              # both settings
#   bash benches/bench_build.sh OFF          # one setting (OFF or ON)
#   PYTHON=/path/to/python bash benches/bench_build.sh
#
# Prints the machine, its load before each build, each build's time and its five slowest steps
# (from ninja's log), and writes bench_results/bench_build.json. The python used needs pip,
# scikit-build-core, pybind11, cmake and ninja; ON needs nvcc (reported as skipped otherwise).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(OFF ON)
work=$(mktemp -d "${TMPDIR:-/tmp}/pn-bench-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "bench_build: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')," \
  "$(nproc) cores, $("$py" -c 'import platform; print("Python", platform.python_version())')," \
  "$(c++ --version 2>/dev/null | head -1)"
nvcc_version=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || true)
echo "nvcc: ${nvcc_version:-not found}; CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-unset}"

json="["
sep=""
for setting in "${settings[@]}"; do
  case $setting in OFF | ON) ;; *) echo "setting must be OFF or ON, got $setting" >&2; exit 2 ;; esac
  if [ "$setting" = ON ] && [ -z "$nvcc_version" ]; then
    echo; echo "PUB_NATIVE_CUDA=ON: skipped (no nvcc on PATH)"; continue
  fi
  src=$work/src-$setting
  mkdir -p "$src"
  (cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$src"
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  start=$(date +%s.%N)
  if ! PUB_NATIVE_CUDA=$setting "$py" -m pip wheel --no-build-isolation --no-deps -q \
      -w "$work/wheels-$setting" "$src" >"$work/log-$setting" 2>&1; then
    cat "$work/log-$setting" >&2
    echo "PUB_NATIVE_CUDA=$setting: build failed" >&2
    exit 1
  fi
  end=$(date +%s.%N)
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  wheel=$(ls "$work/wheels-$setting"/*.whl)
  echo
  echo "PUB_NATIVE_CUDA=$setting: $seconds s (load average before: $load; wheel $(du -k "$wheel" | cut -f1) KiB)"
  log=$(ls "$src"/build/*/.ninja_log 2>/dev/null | head -1 || true)
  if [ -n "$log" ]; then
    echo "  slowest steps (s):"
    awk 'NR > 1 { printf "%8.1f  %s\n", ($2 - $1) / 1000, $4 }' "$log" | sort -rn | head -5
  fi
  json+="$sep{\"setting\": \"$setting\", \"seconds\": $seconds, \"load\": \"$load\"}"
  sep=", "
done
json+="]"
mkdir -p "$root/bench_results"
printf '{"cpu_count": %s, "builds": %s}\n' "$(nproc)" "$json" >"$root/bench_results/bench_build.json"
echo; echo "wrote bench_results/bench_build.json"
