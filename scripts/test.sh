#!/usr/bin/env bash
# Set up the environment, then run the whole test suite (slow-marked tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
