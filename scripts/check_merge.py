#!/usr/bin/env python3
"""Check that transformers itself loads a folder written by `teamtune merge`, with the right
logits. Run in the pinned reference venv:

    $(scripts/ref-env.sh) scripts/check_merge.py [--teamtune target/debug/teamtune]

1. tiny fixture: `teamtune merge` of the PEFT-made adapter (crates/llama/tests/fixtures/
   tiny-lora) into tiny-llama31, f32, max shard 200KB (several shards). transformers loads the
   folder (no missing/unexpected keys); its logits must equal PEFT's
   `PeftModel.from_pretrained(base, adapter)` on the same ids (max rel err <= 1e-4). And
   transformers' own `save_pretrained(max_shard_size="200KB")` of the loaded model must give
   the same shard files and weight_map (the sharding mirrors transformers').
2. default model (SmolLM2-135M-Instruct Q4_1 GGUF from scripts/fetch-default-model.sh): a fresh
   rank-8 adapter with random B and our own unmerged base+adapter logits are written by
   `cargo test -p teamtune-llama --test merge dump_adapter_and_logits_for_the_python_check
   -- --ignored`; `teamtune merge` writes the merged folder (f32, 200MB shards, tied
   embeddings) and transformers' save_pretrained must shard it the same way; transformers'
   logits on it must equal ours (max rel err <= TOL_SMOL), and equal PEFT on transformers' own reading of
   the GGUF with that adapter. The folder's tokenizer must encode like transformers' GGUF
   tokenizer, chat template included.

Exits non-zero on any mismatch. Relative error = max |a - b| / max(|b|, 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "crates" / "llama" / "tests" / "fixtures"
TOL_TINY = 1e-4
# 30 layers of f32 GEMMs summed in a different order (candle vs torch): a little more slack.
TOL_SMOL = 1e-3

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()


def load(path: Path, **kw):
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True, **kw
    )
    return model.eval(), info


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.view(1, -1).long()).logits[0].float()


def run(cmd: list[str], env: dict | None = None) -> str:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"command failed ({out.returncode})")
    return out.stdout


def loading_clean(info: dict) -> bool:
    return not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def tiny(teamtune: list[str], work: Path) -> None:
    print("== tiny fixture: PEFT-made adapter", flush=True)
    base_dir, adapter = FIX / "tiny-llama31", FIX / "tiny-lora"
    out = work / "tiny-merged"
    run(teamtune + ["merge", "--model", str(base_dir), "--adapter", str(adapter),
                    "--out", str(out), "--dtype", "f32", "--max-shard-size", "200KB"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    print(f"     {len(shards)} shards, {len(index['weight_map'])} tensors", flush=True)
    merged, info = load(out)
    check(loading_clean(info), f"transformers loads the folder without missing/unexpected keys {info}")
    base, _ = load(base_dir)
    peft = PeftModel.from_pretrained(base, adapter).eval()
    ids = load_file(adapter / "reference.safetensors")["input_ids_0"]
    err = rel_err(logits(merged, ids), logits(peft, ids))
    check(err <= TOL_TINY, f"tiny: transformers(merged folder) vs PEFT(base, adapter), "
          f"{ids.numel()} positions: max rel err {err:.2e} (<= {TOL_TINY:g})")
    again = work / "tiny-resaved"
    merged.save_pretrained(again, max_shard_size="200KB")
    theirs = json.loads((again / "model.safetensors.index.json").read_text())
    check(theirs["weight_map"] == index["weight_map"] and theirs["metadata"] == index["metadata"],
          "tiny: transformers' save_pretrained shards the same way (weight_map, metadata)")


def default_model(teamtune: list[str], work: Path, cargo: list[str]) -> None:
    print("== default model: SmolLM2-135M-Instruct GGUF, fresh adapter with random B", flush=True)
    gguf = Path(run(["bash", str(REPO / "scripts" / "fetch-default-model.sh")]).splitlines()[0])
    dump = work / "smol"
    dump.mkdir()
    env = dict(os.environ, MERGE_CHECK_DIR=str(dump), MERGE_CHECK_MODEL=str(gguf))
    run(cargo + ["test", "-q", "-p", "teamtune-llama", "--test", "merge",
                 "dump_adapter_and_logits_for_the_python_check", "--", "--ignored"], env=env)
    ours = load_file(dump / "ours.safetensors")
    ids = ours["input_ids"]
    out = dump / "merged"
    run(teamtune + ["merge", "--model", str(gguf), "--adapter", str(dump / "adapter"),
                    "--out", str(out), "--dtype", "f32", "--max-shard-size", "200MB"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    print(f"     {len(set(index['weight_map'].values()))} shards, {len(index['weight_map'])} tensors",
          flush=True)
    merged, info = load(out)
    check(loading_clean(info), f"transformers loads the SmolLM2 folder cleanly {info}")
    again = dump / "resaved"
    merged.save_pretrained(again, max_shard_size="200MB")
    theirs = json.loads((again / "model.safetensors.index.json").read_text())
    check(theirs["weight_map"] == index["weight_map"] and theirs["metadata"] == index["metadata"],
          "smollm2 (tied embeddings): transformers' save_pretrained shards the same way")
    got = logits(merged, ids)
    err = rel_err(got, ours["logits"])
    check(err <= TOL_SMOL, f"smollm2: transformers(merged folder) vs teamtune(base + adapter, "
          f"unmerged), {ids.numel()} positions: max rel err {err:.2e} (<= {TOL_SMOL:g})")
    moved = rel_err(ours["base_logits"], ours["logits"])
    check(moved > 10 * TOL_SMOL, f"smollm2: the adapter matters (base vs adapted: {moved:.2e})")
    base, _ = load(gguf.parent, gguf_file=gguf.name)
    peft = PeftModel.from_pretrained(base, dump / "adapter").eval()
    err = rel_err(got, logits(peft, ids))
    check(err <= TOL_SMOL, f"smollm2: transformers(merged folder) vs PEFT(transformers' GGUF "
          f"base, adapter): max rel err {err:.2e} (<= {TOL_SMOL:g})")

    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = ["What is the capital of France?", "  spaces,\tdigits 12345 and émojis 🙂!",
             "<|im_start|>user\nhi<|im_end|>"]
    same = all(tok.encode(t) == ref.encode(t) for t in texts)
    check(same, "smollm2: the folder's tokenizer encodes like transformers' GGUF tokenizer")
    msgs = [{"role": "user", "content": "Go north."}]
    a = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    b = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    check(a == b, "smollm2: the folder's chat template renders like the GGUF's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teamtune", help="teamtune binary (default: cargo run -q -p teamtune --)")
    ap.add_argument("--work", type=Path, help="folder for the outputs (default: a temporary one)")
    ap.add_argument("--skip-default-model", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cargo = ["cargo"]
    teamtune = [args.teamtune] if args.teamtune else cargo + ["run", "-q", "-p", "teamtune", "--"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tiny(teamtune, work)
        if not args.skip_default_model:
            default_model(teamtune, work, cargo)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        raise SystemExit(1)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
