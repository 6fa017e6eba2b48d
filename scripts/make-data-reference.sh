#!/usr/bin/env bash
# Regenerate teamtune-data's reference fixtures (crates/data/tests/fixtures/reference-*.json,
# smollm2-tokenizer.json.gz, smollm2-chat_template.jinja) with transformers.
#
# Makes (or reuses) a virtual environment at ${TEAMTUNE_REF_VENV:-.venv-ref} with pinned versions,
# fetches the Llama-3 tokenizer and the default model with scripts/fetch-default-model.sh, and runs
# scripts/make_data_reference.py. The tests never need Python: the fixtures are committed.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${TEAMTUNE_REF_VENV:-$root/.venv-ref}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv ..." >&2
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "transformers==5.24.0" "tokenizers==0.23.3" "jinja2==3.1.6" "gguf==0.19.0" "numpy==2.4.6" >&2

mapfile -t assets < <("$root/scripts/fetch-default-model.sh")
gguf="${assets[0]}"
llama_tok="${assets[1]}"

"$venv/bin/python" "$root/scripts/make_data_reference.py" \
  --llama-tokenizer "$llama_tok" \
  --smollm2-gguf "$gguf" \
  --fixtures "$root/crates/data/tests/fixtures" \
  --llama-template "$root/crates/data/src/templates/llama31.jinja" \
  --chatml-template "$root/crates/data/src/templates/chatml.jinja"
