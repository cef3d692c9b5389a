#!/usr/bin/env bash
# CI, second part: the test suite (slow tests excluded) on the oldest torch the project supports,
# 2.4.1, and on the oldest Python, 3.10, where the machine has one (pyenv's 3.10; else the default
# python3), in a virtual environment of its own. That torch comes from the package index as a
# CUDA build (about 2.7 GB, downloaded on purpose; its CUDA libraries are not used). The native
# modules do not link against torch, so only the CPU module is built here, in a build folder of
# its own.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-torch-oldest
py=python3
root=$(pyenv root 2>/dev/null || true)
for candidate in "$root"/versions/3.10.*/bin/python3.10; do
  if [ -x "$candidate" ]; then py=$candidate; fi
done
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv"/bin/pip install -q torch==2.4.1
PUB_NATIVE_CUDA=OFF "$venv"/bin/pip install -q --config-settings=build-dir=build/torch-oldest \
  -e ".[test]"
"$venv"/bin/python -c "import platform, torch, pub_native; print('Python', platform.python_version(), '| torch', torch.__version__, '| pub_native', pub_native.__version__)"
"$venv"/bin/python -m pytest python_tests -q -p no:cacheprovider
