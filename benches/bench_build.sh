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
# (from ninja's log), and writes bench_results/bench_build.json after each build. The python
# used (PYTHON, else .venv/bin/python, else python3) needs pip, scikit-build-core, pybind11,
# cmake and ninja, which the README's set-up does not put into .venv (its pip builds in an
# isolated environment): `.venv/bin/pip install scikit-build-core pybind11 cmake ninja`.
# Without ninja the build would fall back to make, one file at a time, and measure something
# else: the script refuses. ON needs nvcc (reported as skipped otherwise).
set -euo pipefail
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
root=$(cd "$(dirname "$0")/.." && pwd)

settings=()
for arg in "$@"; do
  case $arg in
    OFF | ON) settings+=("$arg") ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench_build.sh: a setting must be OFF or ON, got '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
[ ${#settings[@]} -gt 0 ] || settings=(OFF ON)

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
  if ! { [ -f "$py" ] && [ -x "$py" ]; } && ! py=$(command -v "$PYTHON"); then
    echo "bench_build.sh: PYTHON=$PYTHON is not an executable" >&2
    exit 2
  fi
elif [ -x "$root/.venv/bin/python" ]; then
  py=$root/.venv/bin/python
elif ! py=$(command -v python3); then
  echo "bench_build.sh: no python3 on PATH and no .venv/bin/python; set PYTHON" >&2
  exit 2
fi

# What the build needs, checked before anything is built. ninja and cmake count when they are
# on PATH or installed as Python packages (where scikit-build-core finds them too).
missing=()
for mod in pip scikit_build_core pybind11; do
  "$py" -c "import $mod" >/dev/null 2>&1 || missing+=("${mod//_/-}")
done
for tool in cmake ninja; do
  command -v "$tool" >/dev/null 2>&1 || "$py" -c "import $tool" >/dev/null 2>&1 \
    || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench_build.sh: $py lacks ${missing[*]}; install with" >&2
  echo "  $py -m pip install scikit-build-core pybind11 cmake ninja" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/pn-bench-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cxx=${CXX:-c++}
echo "bench_build: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')," \
  "$(nproc) cores, $("$py" -c 'import platform; print("Python", platform.python_version())')" \
  "($py), $cxx: $("$cxx" --version 2>/dev/null | head -1)"
nvcc_version=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || true)
echo "nvcc: ${nvcc_version:-not found}; CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-unset}"

mkdir -p "$root/bench_results"
json="["
sep=""
for setting in "${settings[@]}"; do
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
  else
    echo "  (no ninja log: the build did not run ninja; its time is not comparable)"
  fi
  json+="$sep{\"setting\": \"$setting\", \"seconds\": $seconds, \"load\": \"$load\"}"
  sep=", "
  # Written after each build, so that a later build that fails loses nothing.
  printf '{"cpu_count": %s, "builds": %s]}\n' "$(nproc)" "$json" \
    >"$root/bench_results/bench_build.json"
done
if [ -n "$sep" ]; then
  echo; echo "wrote bench_results/bench_build.json"
else
  echo; echo "nothing built"
fi
