#!/usr/bin/env python3
"""Conversations of a chosen length for timing `teamtune train` (docs/BENCHMARKS.md).

    scripts/long_conversations.py --tokens 2048 --out conv2048.jsonl [--count 4] [--seed 0]

Each line is a training conversation (`{"messages", "task", "score"}`): a short system message
and 8 user/assistant exchanges of grid-world words, sized to about --tokens tokens in the
SmolLM2 chat template (about 1.15 tokens a word). Deterministic for a seed.
"""

import argparse
import json
import random

WORDS = ("north south east west agent picks item target grid cell moves claims corner reaches "
         "waits drops checks memory message teammate plan route blocked free").split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.tokens < 64 or args.count < 1:
        ap.error("--tokens must be at least 64 and --count at least 1")
    rng = random.Random(args.seed)
    per_turn = int(args.tokens / 16 / 1.15)
    with open(args.out, "x", encoding="utf-8") as f:
        for _ in range(args.count):
            messages = [{"role": "system", "content": "You are an agent in a cooperative grid world."}]
            for _ in range(8):
                for role in ("user", "assistant"):
                    text = " ".join(rng.choice(WORDS) for _ in range(per_turn))
                    messages.append({"role": role, "content": text})
            f.write(json.dumps({"messages": messages, "task": "single_nav", "score": 100}) + "\n")


if __name__ == "__main__":
    main()
