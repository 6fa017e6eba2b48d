#!/usr/bin/env python3
"""Random PEFT LoRA adapters for SmolLM2-135M (the default model), for load tests that serve
several adapters: the study's shape (r 8, alpha 16, all seven projections), seeded A and B.

    $(scripts/ref-env.sh) scripts/random_adapters.py --out /tmp/adapters --count 4

writes /tmp/adapters/a0 ... a3, each a folder `teamtune serve --adapter NAME=DIR` loads.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

LAYERS, HIDDEN, INTER, KV = 30, 576, 1536, 3 * 64
# (module, its parent, out features, in features)
TARGETS = [
    ("q_proj", "self_attn", HIDDEN, HIDDEN), ("k_proj", "self_attn", KV, HIDDEN),
    ("v_proj", "self_attn", KV, HIDDEN), ("o_proj", "self_attn", HIDDEN, HIDDEN),
    ("gate_proj", "mlp", INTER, HIDDEN), ("up_proj", "mlp", INTER, HIDDEN),
    ("down_proj", "mlp", HIDDEN, INTER),
]


def write(out: Path, seed: int, r: int = 8) -> None:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LAYERS):
        for name, parent, out_dim, in_dim in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            bound = 1.0 / np.sqrt(in_dim)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (r, in_dim)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0.0, 0.02, (out_dim, r)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.0,
              "target_modules": [t[0] for t in TARGETS], "base_model_name_or_path": "SmolLM2-135M-Instruct",
              "bias": "none", "use_rslora": False, "fan_in_fan_out": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=4)
    args = ap.parse_args()
    for i in range(args.count):
        write(args.out / f"a{i}", seed=100 + i)
        print(args.out / f"a{i}")


if __name__ == "__main__":
    main()
