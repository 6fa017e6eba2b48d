#!/usr/bin/env python3
"""How far SmolLM2's logits move when every projection's operands are rounded to bf16.

`--quantize bf16` rounds the input and the weight of every projection (the LM head included) to
bf16 and sums in f32. This script does the same in transformers: each nn.Linear runs
`linear(x.bfloat16().float(), W.bfloat16().float())`. It prints, per fixture prompt, the
error `sum |a - d| / sum |d|` over all positions and at the last one, for the exact rounding
and for inputs nudged by a few ulps before rounding. The last position alone swings several
fold with such nudges (one near tie in one layer); the all-positions figure is stable, which is
why crates/llama/tests/smollm2.rs bounds that one.

Run as:  $(scripts/ref-env.sh) scripts/bf16_rounding_reference.py
"""

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = Path.home() / ".cache/teamtune/models/smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL, gguf_file=GGUF, dtype=torch.float32, attn_implementation="eager").eval()
    fixture = json.loads((REPO / "crates/llama/tests/fixtures/smollm2/reference.json").read_text())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dense_forward = {id(m): m.forward for m in linears}

    def round_operands(nudge):
        for m in linears:
            if nudge is None:
                m.forward = dense_forward[id(m)]
            else:
                m.forward = lambda x, m=m: torch.nn.functional.linear(
                    (x * (1 + nudge)).bfloat16().float(), m.weight.bfloat16().float())

    def error(a, d):
        return ((a - d).abs().sum() / d.abs().sum()).item()

    with torch.no_grad():
        for i, case in enumerate(fixture["cases"]):
            ids = torch.tensor([case["prompt_ids"]])
            round_operands(None)
            dense = model(ids).logits[0]
            rows = []
            for nudge in (0.0, 1e-6, -1e-6, 3e-6, -3e-6):
                round_operands(nudge)
                rounded = model(ids).logits[0]
                rows.append(f"{error(rounded, dense):.4f} (last {error(rounded[-1], dense[-1]):.4f})")
            print(f"case {i} ({ids.shape[1]} tokens): all positions " + ", ".join(rows))


if __name__ == "__main__":
    main()
