#!/usr/bin/env bash
# Set up the environment, then run the quickstart: the whole pipeline on the embedded model, CPU-sized.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m selfinterp fit --config configs/quickstart.yaml "$@"
.venv/bin/python -m selfinterp report results/quickstart
