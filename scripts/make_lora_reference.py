#!/usr/bin/env python3
"""Produce the PEFT LoRA fixture that crates/llama's LoRA tests compare against.

Run as:  $(scripts/ref-env.sh) scripts/make_lora_reference.py

Reads crates/llama/tests/fixtures/tiny-llama31 (model + reference.safetensors) and writes
crates/llama/tests/fixtures/tiny-lora/:
  adapter_config.json, adapter_model.safetensors   as PEFT's save_pretrained writes them
      (r 4, alpha 8, dropout 0, all seven projections; A with PEFT's default init, B random
      N(0, 0.1^2) with a fixed seed so that the adapter changes the logits)
  reference.safetensors   input_ids_0 (copied) and logits_0 (f32 [T, vocab]) of the base model
      with the adapter applied

and, the other direction, crates/llama/tests/fixtures/tiny-lora-ours/peft_logits.safetensors:
  PEFT loads the adapter that teamtune saved there (rsLoRA, rank 4; rewritten by
  `TEAMTUNE_WRITE_FIXTURES=1 cargo test -p teamtune-llama --test lora an_adapter_saved_here`)
  and computes input_ids_0's logits with it.

Deterministic: fixed seed, 2 threads, eager attention, f32.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "crates" / "llama" / "tests" / "fixtures"
BASE = FIX / "tiny-llama31"
OUT = FIX / "tiny-lora"
SEED = 20240723
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        BASE, torch_dtype=torch.float32, attn_implementation="eager"
    )
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
        bias="none",
    )
    model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    ref = load_file(BASE / "reference.safetensors")
    ids = ref["input_ids_0"]
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0].float().contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = "tiny-llama31"
    # PEFT keeps target_modules as a set; a sorted list makes the file reproducible.
    model.peft_config["default"].target_modules = sorted(TARGETS)
    model.save_pretrained(OUT)
    readme = OUT / "README.md"
    if readme.exists():
        readme.unlink()
    save_file({"input_ids_0": ids, "logits_0": logits}, OUT / "reference.safetensors")
    print("wrote", OUT, "logits", tuple(logits.shape), "mean |logit|", logits.abs().mean().item())


def peft_reads_ours() -> None:
    from peft import PeftModel

    ours = FIX / "tiny-lora-ours"
    if not (ours / "adapter_model.safetensors").exists():
        print("skipping", ours, "(write it with the Rust test first)")
        return
    base = AutoModelForCausalLM.from_pretrained(
        BASE, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, ours)
    model.eval()
    ids = load_file(BASE / "reference.safetensors")["input_ids_0"]
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0].float().contiguous()
    save_file({"input_ids_0": ids, "logits_0": logits}, ours / "peft_logits.safetensors")
    print("wrote", ours / "peft_logits.safetensors", "use_rslora", model.peft_config["default"].use_rslora)


if __name__ == "__main__":
    main()
    peft_reads_ours()
