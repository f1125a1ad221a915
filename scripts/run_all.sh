#!/usr/bin/env bash
# Run Experiment 1 for every model config in turn, then print the results table.
# Usage: bash scripts/run_all.sh [config ...]   (default: the two embedded models and the four seed models)
# Extra Lightning options go in EXTRA, e.g. EXTRA="--config configs/trainer/ddp.yaml".
# A model whose weights are not available offline is reported and skipped; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/smollm2-135m.yaml configs/qwen2.5-coder-0.5b.yaml configs/llama-3.2-1b.yaml configs/llama-3.2-3b.yaml configs/gemma-3-1b.yaml configs/gemma-3-4b.yaml)
failed=()
for cfg in "${configs[@]}"; do
  echo "=== $cfg"
  # shellcheck disable=SC2086
  if ! "$PY" -m selfinterp fit --config "$cfg" ${EXTRA:-}; then
    failed+=("$cfg")
  fi
done
"$PY" -m selfinterp report results || true
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
