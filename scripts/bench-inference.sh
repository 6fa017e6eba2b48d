#!/usr/bin/env bash
# Inference beside llama.cpp (docs/BENCHMARKS.md, "Model"): SmolLM2-135M-Instruct at batch 1,
# 2 threads, for 4-bit, 8-bit and f32 weights and for the default model's own file (Q4_1, read
# by teamtune with --quantize gguf), teamtune's smollm2 bench and llama.cpp's llama-bench one
# after the other, ROUNDS times (default 2). teamtune decodes after a 512-token
# prefill, so llama.cpp's comparable decode is `-d 512` (its default `-n 128` row, from an empty
# context, is printed too).
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin scripts/bench-inference.sh
# llama.cpp's CPU build (llama-bench, llama-quantize targets): ../shared/notes/gguf-and-peers.md.
# TEAMTUNE_BENCH_KV=f16 runs teamtune with an f16 KV cache, as llama.cpp runs by default.
# The GGUFs are made once from the default model's Q4_1 file into $GGUF_DIR (default
# target/bench-gguf) with `llama-quantize --allow-requantize`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to the build/bin folder of llama.cpp}"
gguf_dir="${GGUF_DIR:-target/bench-gguf}"
rounds="${ROUNDS:-2}"
export RAYON_NUM_THREADS=2
source_gguf="$(scripts/fetch-default-model.sh | head -1)"
mkdir -p "$gguf_dir"
for t in Q4_0 Q8_0 F32 Q4_K_M; do
  [ -f "$gguf_dir/smol-$t.gguf" ] ||
    "$bin/llama-quantize" --allow-requantize "$source_gguf" "$gguf_dir/smol-$t.gguf" "$t" 2 >/dev/null 2>&1
done
cargo bench -p teamtune-llama --bench smollm2 --no-run 2>/dev/null
ours=$(cargo bench -p teamtune-llama --bench smollm2 --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and "smollm2" in m["executable"]: print(m["executable"])' | tail -1)
llama_bench() {
  "$bin/llama-bench" -m "$1" -t 2 -r 3 -o json "${@:2}" 2>/dev/null | python3 -c 'import json,sys
for t in json.load(sys.stdin):
    kind = ("prefill %d" % t["n_prompt"]) if t["n_prompt"] else ("decode %d" % t["n_gen"])
    print("%s at depth %d: %.1f tok/s" % (kind, t.get("n_depth", 0), t["avg_ts"]))' | paste -sd';' -
}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for _ in $(seq "$rounds"); do
  # q4_0, q8_0, f32: teamtune starts from the default model's file (q4_0 and q8_0 re-quantise
  # its dense weights), llama.cpp from its own re-quantised copy. gguf and q4_k_m: both engines
  # run the same file as it is (teamtune with --quantize gguf): the default model's own (Q4_1,
  # a Q8_0 embedding), and llama.cpp's Q4_K_M of it (mostly Q5_0: SmolLM2's rows of 576 are
  # not whole Q4_K super-blocks).
  for t in q4_0 q8_0 f32 gguf q4_k_m; do
    T=$(echo "$t" | tr a-z A-Z)
    file="$gguf_dir/smol-$T.gguf"; ours_model="$source_gguf"; q=$t
    case "$t" in
      f32) q="" ;;
      gguf) file="$source_gguf" ;;
      q4_k_m) ours_model="$file"; q=gguf ;;
    esac
    echo "llama.cpp $t: $(llama_bench "$file" -p 512 -n 128); $(llama_bench "$file" -p 0 -n 128 -d 512)"
    echo "teamtune $t: $(env ${q:+TEAMTUNE_BENCH_QUANTIZE=$q} TEAMTUNE_BENCH_MODEL="$ours_model" "$ours" 2>/dev/null | tail -1)"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
