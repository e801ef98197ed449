#!/usr/bin/env bash
# The test files with CUDA tests, on a GPU machine whose torch is preinstalled (no network there):
# installs the checkout without dependencies (the "osp" backend string needs the entry point), then
# runs those files, in parallel where pytest-xdist is installed (as on the GPU machines). Tests under
# Triton's CPU interpreter skip where it cannot run (Triton 3.6 under NumPy 2), with the reason;
# test_hif8_qat.py needs en-dtypes and runs on CPU only.
# Usage: bash scripts/gpu_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps --no-build-isolation -e .
workers=()
if python -c "import xdist" 2>/dev/null; then workers=(-n "${OSP_TEST_WORKERS:-8}"); fi
python -m pytest -q -rfs ${workers[@]+"${workers[@]}"} -p no:cacheprovider \
  tests/test_hif8_fusions.py tests/test_hif8_infer.py tests/test_hif8_kernels.py tests/test_norm_rope.py \
  tests/test_linear_fusions.py tests/test_backend.py tests/test_cli.py tests/test_cublaslt.py "$@"
