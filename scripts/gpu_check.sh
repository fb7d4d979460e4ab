#!/usr/bin/env bash
# Checks the runner's GPU paths in one command: sets up .venv (scripts/setup.sh installs PyTorch's
# CUDA build where nvidia-smi works), then runs benchmarks/gpu_check, which prints a
# PASS / FAIL / WARN / SKIP table and writes the same rows, with the device's description, as JSON.
#
#   bash scripts/gpu_check.sh [--out PATH] [--dry-run] [--only device,numerics,...] [--skip-setup]
#
# --out: the JSON (default gpu_check.json; each check's log goes to a folder beside it).
# --dry-run: list the checks and write them as SKIP rows (also what happens without a GPU).
# --skip-setup: run with $PYTHON (default .venv/bin/python) as it is, installing nothing.
# GPU_CHECK_BUDGET: seconds for everything, setup included (default 480); each check also has its
# own limit, and one that hangs is killed without holding up the others.
# Exit code: 0 when nothing FAILed (and without a GPU), 1 otherwise.
set -euo pipefail
BUDGET=${GPU_CHECK_BUDGET:-480}
SETUP=1
OUT=gpu_check.json
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-setup) SETUP="" ;;
    --out) OUT=${2:?--out needs a path}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where it was called from
cd "$(dirname "$0")/.."

if [ -n "$SETUP" ] && ! bash scripts/setup.sh test; then
  echo "gpu_check: FAIL: setup failed (bash scripts/setup.sh test); nothing was checked" >&2
  mkdir -p "$(dirname "$OUT")"
  printf '{"summary": {"FAIL": 1}, "rows": [{"name": "setup", "status": "FAIL", "detail": "bash scripts/setup.sh test failed"}]}\n' >"$OUT"
  exit 1
fi
PY=${PYTHON:-${VENV:-.venv}/bin/python}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: no Python at $PY: run without --skip-setup, or set PYTHON" >&2
  exit 1
fi
SETUP_SECONDS=$SECONDS
LEFT=$((BUDGET - SETUP_SECONDS - 15))  # 15 s kept for the table and the JSON
[ "$LEFT" -ge 60 ] || LEFT=60
PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m gpu_check --out "$OUT" --budget "$LEFT" \
  --setup-seconds "$SETUP_SECONDS" ${ARGS[@]+"${ARGS[@]}"}
