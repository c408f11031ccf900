#!/usr/bin/env bash
# The main job: document QA over the bundled sample data with the embedded defaults. Sets itself up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/terse demo "$@"
