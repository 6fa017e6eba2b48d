#!/usr/bin/env python3
"""transformers baseline for the Rust benchmarks: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to f32).

Run as:  $(scripts/ref-env.sh) scripts/bench_reference.py [--gguf PATH] [--prefill 512] [--decode 128] [--batch4]

Prints one JSON object on stdout (progress goes to stderr):
  {"impl": "transformers", "torch": ..., "transformers": ..., "threads": 2,
   "prefill_tokens": 512, "prefill_tok_s": ..., "decode_tokens": 128, "decode_tok_s": ..., ...}

Method (the Rust bench should do the same):
- prompt: PROMPT_UNIT repeated and tokenised with add_special_tokens=False, cut to exactly N ids
  (prompt_ids_head in the output lets the Rust side check it builds the same ids);
- f32 weights, eager attention, torch.set_num_threads(2), OMP/MKL threads 2, torch.inference_mode;
- prefill: one forward over the N-token prompt (batch 1, use_cache=True, logits of every position as
  transformers computes them), best of 3 after a warm-up;
- decode: a manual greedy loop with the KV cache (past_key_values), batch 1: the prompt is prefilled
  (not timed), then 128 single-token steps are timed (forward + argmax), best of 3 after a warm-up.
  EOS is ignored, so exactly 128 tokens are decoded. For comparison, `generate` (min_new_tokens =
  max_new_tokens = 128, do_sample=False) is timed too and reported as generate_total_s plus
  generate_decode_tok_s = 128 / (generate_total_s - prefill time), the prefill subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "2"
os.environ["MKL_NUM_THREADS"] = "2"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
THREADS = 2
PROMPT_UNIT = (
    "The quick brown fox jumps over the lazy dog. "
    "A journey of a thousand miles begins with a single step. "
)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def default_gguf() -> Path:
    out = subprocess.run([str(REPO / "scripts" / "fetch-default-model.sh")], check=True,
                         capture_output=True, text=True).stdout.split()
    return Path(out[0])


def build_prompt(tok, n: int) -> list[int]:
    text = PROMPT_UNIT
    while len(tok.encode(text, add_special_tokens=False)) < n:
        text += PROMPT_UNIT
    ids = tok.encode(text, add_special_tokens=False)[:n]
    assert len(ids) == n
    return ids


def best_of(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch4", action="store_true", help="also time the prefill at batch 4")
    ap.add_argument("--no-generate", action="store_true", help="skip the model.generate cross-check")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    gguf_path = args.gguf or default_gguf()
    d, name = gguf_path.parent, gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    log(f"loaded {name} in {time.perf_counter() - t0:.1f}s")

    P, N = args.prefill, args.decode
    load_before = os.getloadavg()
    ids = build_prompt(tok, P)
    x = torch.tensor([ids], dtype=torch.long)

    result = {
        "impl": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": THREADS,
        "model": name,
        "dtype": "float32",
        "attn_implementation": "eager",
        "prompt_unit": PROMPT_UNIT,
        "prompt_ids_head": ids[:16],
    }

    with torch.inference_mode():
        def prefill():
            return model(input_ids=x, use_cache=True)

        t_prefill = best_of(prefill, args.reps)
        result.update(prefill_tokens=P, prefill_s=round(t_prefill, 4), prefill_tok_s=round(P / t_prefill, 2))
        log(f"prefill {P} tokens: {t_prefill:.3f}s = {P / t_prefill:.1f} tok/s")

        # Manual greedy decode loop with the KV cache: prefill untimed, N steps timed.
        def decode():
            out = model(input_ids=x, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(N):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t

        decode()  # warm-up
        t_decode = min(decode() for _ in range(args.reps))
        result.update(decode_tokens=N, decode_s=round(t_decode, 4), decode_tok_s=round(N / t_decode, 2),
                      decode_method=f"manual greedy loop with past_key_values after an untimed {P}-token "
                                    f"prefill; batch 1; best of {args.reps} after a warm-up")
        log(f"decode {N} tokens: {t_decode:.3f}s = {N / t_decode:.1f} tok/s")

        if not args.no_generate:
            am = torch.ones_like(x)

            def gen():
                return model.generate(input_ids=x, attention_mask=am, max_new_tokens=N, min_new_tokens=N,
                                      do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                                      temperature=None, top_p=None, top_k=None)

            t_gen = best_of(gen, 1)
            result.update(generate_total_s=round(t_gen, 4),
                          generate_decode_tok_s=round(N / max(t_gen - t_prefill, 1e-9), 2))
            log(f"generate {N} tokens after {P}-token prompt: {t_gen:.3f}s total")

        if args.batch4:
            xb = x.repeat(4, 1)
            t_b4 = best_of(lambda: model(input_ids=xb, use_cache=True), args.reps)
            result.update(prefill_batch4_s=round(t_b4, 4), prefill_batch4_tok_s=round(4 * P / t_b4, 2))
            log(f"prefill 4x{P} tokens: {t_b4:.3f}s = {4 * P / t_b4:.1f} tok/s")

    # Other processes on a 2-core box distort these numbers badly (decode steps are short and
    # OpenMP threads that get descheduled stall every op): record the load to judge a run by.
    result["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
