#!/usr/bin/env bash
# The tests command: lint (ruff), types (mypy), then the test suite on CPU. Sets itself up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check terse tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q -x --durations=15 "$@"
