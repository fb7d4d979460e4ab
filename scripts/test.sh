#!/usr/bin/env bash
# Sets up .venv with the test extra, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
