#!/usr/bin/env bash
# Create (or reuse) ./.venv and install terse with what it needs. Safe to run again.
# torch is installed first, pinned, so pip never pulls multi-GB GPU builds on a CPU machine.
# Says what it does in a few lines; pip's own output goes to .venv/setup.log, shown when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "terse setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
fi
stamp=.venv/.terse-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0
log=.venv/setup.log
: > "$log"
step() {  # step "what it does" <pip install arguments>
  say "$1"
  shift
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >>"$log" 2>&1; then
    say "that step failed; the end of $log:"
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 25 >&2
    exit 1
  fi
}
start=$SECONDS
step "updating pip" --upgrade pip
step "installing torch ${TERSE_TORCH_VERSION:-2.13.0}" "torch==${TERSE_TORCH_VERSION:-2.13.0}"
step "installing terse with its server and test dependencies (first run: a few minutes)" -e ".[dev,server]"
echo "$want" > "$stamp"
say "ready in $((SECONDS - start)) s (pip's log: $log)"
