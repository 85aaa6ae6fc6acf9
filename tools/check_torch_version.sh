#!/usr/bin/env bash
# The whole test suite against another torch release, in a throw-away venv and clone, so that
# the supported range (pyproject.toml: torch >= 2.6) is a tested claim:
#
#   tools/check_torch_version.sh 2.6.0      # torch 2.6.0 + triton 3.2 (PyPI's CUDA 12.4 build)
#   tools/check_torch_version.sh 2.11.0     # torch 2.11.0 + triton 3.6 (the GPU machine's versions)
#
# Builds the package as a user would (`pip install --no-build-isolation --no-deps -e .`: the CUDA
# ops when nvcc matches torch's CUDA major version, the CPU ops otherwise) and runs python_tests.
# Downloads several GB on first use; WORK (default /tmp/ekd_torch_VERSION) keeps the venv.
set -euo pipefail
version=${1:?usage: tools/check_torch_version.sh TORCH_VERSION}
top=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/ekd_torch_$version}
mkdir -p "$work"
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q "torch==$version" numpy pytest ninja wheel "setuptools>=64"
rm -rf "$work/src"
git clone -q "$top" "$work/src"
cd "$work/src"
"$py" tools/ensure_deps.py
MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | grep "ekd_kernels:" | head -1
golden="$top/../shared/golden"
[ -d "$golden" ] || golden="$top/shared/golden"
# the workers make test uses (tools/pytest_workers.py; ensure_deps installed pytest-xdist when it could)
workers=$("$py" tools/pytest_workers.py)
# shellcheck disable=SC2086  # (the options are words: -n 2 --dist loadfile)
EKD_GOLDEN_DIR="$golden" "$py" -m pytest python_tests $workers -q -rs -p no:cacheprovider "${@:2}"
