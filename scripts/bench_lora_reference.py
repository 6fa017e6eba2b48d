#!/usr/bin/env python3
"""PEFT baseline for the LoRA training benchmark (crates/train/benches/lora_step.rs).

Run as:  $(scripts/ref-env.sh) scripts/bench_lora_reference.py --seq 512 [--steps 3] [--checkpointing]
         [--attn sdpa|eager]

Same work as the Rust bench: SmolLM2-135M-Instruct (the default Q4_1 GGUF, dequantised to f32),
a PEFT LoRA adapter (r 8, alpha 16, dropout 0.2 on q,k,v,o,gate,up,down), one sequence of --seq
tokens (ids 1000 + (i * 7919) mod (vocab - 2000)) with every next token trained, forward +
backward + global-norm clipping at 0.3 + torch AdamW on the adapter; torch.set_num_threads(2).
One warm-up step, then --steps timed steps. --checkpointing calls
model.gradient_checkpointing_enable() (transformers' per-layer checkpointing, non-reentrant).
--attn picks transformers' attention: sdpa (its default, what a PEFT user gets) or eager.

Prints one JSON line: tokens/s of the best and the mean step and the process's peak resident
memory (ru_maxrss, model load included, as the Rust bench reports VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "2"
os.environ["MKL_NUM_THREADS"] = "2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def default_gguf() -> Path:
    out = subprocess.run([str(REPO / "scripts" / "fetch-default-model.sh")], check=True,
                         capture_output=True, text=True).stdout.split()
    return Path(out[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    gguf = args.gguf or default_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation=args.attn)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.2, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    model.train()
    vocab = model.config.vocab_size
    ids = torch.tensor([[1000 + (i * 7919) % (vocab - 2000) for i in range(args.seq)]])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.03)
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - started)
        print(f"step {step}: {time.perf_counter() - started:.2f}s", file=sys.stderr, flush=True)
    best, mean = min(times), sum(times) / len(times)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "impl": f"peft-{args.attn}", "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "seq": args.seq, "gradient_checkpointing": args.checkpointing,
        "threads": torch.get_num_threads(), "steps": args.steps,
        "tokens_per_s_best": args.seq / best, "tokens_per_s_mean": args.seq / mean,
        "step_s": times,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "minor_faults": usage.ru_minflt, "system_s": usage.ru_stime,
    }))


if __name__ == "__main__":
    main()
