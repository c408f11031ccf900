#!/usr/bin/env bash
# Create (or reuse) ./.venv and install terse with what it needs. Safe to run again.
# torch is installed first, pinned, so pip never pulls multi-GB GPU builds on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.terse-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TERSE_TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[dev,server]"
  echo "$want" > "$stamp"
fi
