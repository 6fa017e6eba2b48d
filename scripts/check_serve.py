#!/usr/bin/env python3
"""Check `teamtune serve` with the official `openai` Python client. Run in the pinned
reference venv (scripts/ref-env.sh installs `openai`):

    $(scripts/ref-env.sh) scripts/check_serve.py [--teamtune target/release/teamtune] [--model M]
        [--serve-args '--prefix-cache-tokens 8192']

Against the default model (SmolLM2-135M-Instruct from scripts/fetch-default-model.sh) and a
small LoRA adapter written here in PEFT format (rank 8 on q_proj/v_proj, seeded random A and
B), served as model `tuned` next to the base, behind an API key:

1. `client.models.list()` lists the base and `tuned`.
2. plain: a greedy answer equals what `teamtune generate` prints for the same request
   (system + user message, max tokens, temperature 0); usage counts add up.
3. streamed (`stream_options={"include_usage": True}`): the deltas put together give the same
   text; the finish reason comes last, then a chunk with the usage and no choices.
4. JSON schema (`response_format={"type": "json_schema", ...}`): the reply parses and has the
   schema's required fields with their types; JSON mode gives a JSON object.
5. adapter by model name: `model="tuned"` answers differently from the base, and equals
   `teamtune generate` on the folder `teamtune merge` writes for that adapter.
6. errors come back as the client's exceptions: unknown model (NotFoundError), n=99
   (BadRequestError), wrong key (AuthenticationError).
7. tools: `tool_choice="required"` and a named function give `message.tool_calls` whose
   arguments parse and follow the function's schema, `finish_reason == "tool_calls"`; streamed,
   the client's tool-call deltas add up to the same call; a next request with the call and a
   `tool` result is answered.
8. adapters at run time (`--allow-runtime-lora`): `load_lora_adapter` serves a second copy of
   the adapter as `again`, which answers as `tuned`; `unload_lora_adapter` removes it from
   `models.list()`.
9. SIGTERM: the server exits 0.

Exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import openai
from openai import OpenAI
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-teamtune-check"
SYSTEM = "You are a helpful assistant. Answer briefly."
QUESTION = "What is the capital of France?"
MAX_TOKENS = 48


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def check(cond: bool, msg: str) -> None:
    if not cond:
        fail(msg)
    print(f"ok: {msg}", flush=True)


def default_binary() -> str:
    for profile in ("release", "debug"):
        p = REPO / "target" / profile / "teamtune"
        if p.exists():
            return str(p)
    return str(REPO / "target" / "release" / "teamtune")


def make_adapter(out: Path) -> None:
    """A PEFT LoRA adapter for SmolLM2-135M (30 layers, hidden 576, 3 KV heads of 64)."""
    rng = np.random.default_rng(8)
    r, layers, hidden, kv = 8, 30, 576, 3 * 64
    tensors = {}
    for layer in range(layers):
        for name, out_dim in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            bound = 1.0 / np.sqrt(hidden)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (r, hidden)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0.0, 0.2, (out_dim, r)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "SmolLM2-135M-Instruct",
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))


def generate(teamtune: str, model: str) -> str:
    """What `teamtune generate` prints for the request (its trailing newline removed)."""
    cmd = [teamtune, "generate", "--system", SYSTEM, "--prompt", QUESTION,
           "--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
    if model:
        cmd += ["--model", model]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "RUST_LOG": "warn"}).stdout
    return out[:-1] if out.endswith("\n") else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teamtune", default=default_binary())
    ap.add_argument("--model", default="", help="model for teamtune (default: the default model)")
    ap.add_argument("--serve-args", default="",
                    help="more flags for teamtune serve, e.g. '--prefix-cache-tokens 8192' (then the streamed "
                         "request, the same as the plain one, starts from its cached conversation)")
    args = ap.parse_args()
    subprocess.run(["bash", str(REPO / "scripts/fetch-default-model.sh")], check=True, capture_output=True)

    tmp = Path(tempfile.mkdtemp(prefix="check-serve-"))
    adapter = tmp / "adapter"
    make_adapter(adapter)
    cmd = [args.teamtune, "serve", "--port", "0", "--api-key", KEY, "--served-model-name", "base",
           "--adapter", f"tuned={adapter}", "--allow-runtime-lora"]
    if args.model:
        cmd += ["--model", args.model]
    cmd += shlex.split(args.serve_args)
    log(f"$ {' '.join(cmd)}")
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"})
    try:
        url = server.stdout.readline().strip()
        if not url.startswith("http://"):
            fail(f"the server printed {url!r}")
        log(f"serving at {url}")
        client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=600)

        # 1. models
        ids = [m.id for m in client.models.list().data]
        check(ids == ["base", "tuned"], f"models.list() gives the base and the adapter: {ids}")

        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]

        # 2. plain, greedy = teamtune generate
        r = client.chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        text = r.choices[0].message.content
        log(f"base: {text!r} ({r.choices[0].finish_reason}, {r.usage})")
        expected = generate(args.teamtune, args.model)
        check(text == expected, f"greedy reply equals teamtune generate: {text!r} vs {expected!r}")
        u = r.usage
        check(u.prompt_tokens > 0 and u.completion_tokens > 0
              and u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage adds up: {u}")

        # 3. streamed
        chunks = list(client.chat.completions.create(model="base", messages=messages, temperature=0,
                                                     max_tokens=MAX_TOKENS, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check(streamed == text, f"streamed deltas ({len(chunks)} chunks) give the same text")
        last, finish = chunks[-1], chunks[-2]
        check(finish.choices[0].finish_reason == r.choices[0].finish_reason,
              f"the last choice chunk has the finish reason: {finish.choices[0].finish_reason}")
        check(not last.choices and last.usage is not None
              and last.usage.completion_tokens == u.completion_tokens,
              f"then a chunk with the usage and no choices: {last.usage}")

        # 4. JSON schema and JSON mode
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "country": {"type": "string", "maxLength": 40},
                           "is_capital": {"type": "boolean"}},
            "required": ["city", "country", "is_capital"],
            "additionalProperties": False,
        }
        r = client.chat.completions.create(
            model="base", temperature=0, max_tokens=120,
            messages=[{"role": "user", "content": "Describe Paris as JSON: city, country, is_capital."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        )
        content = r.choices[0].message.content
        log(f"json_schema: {content!r} ({r.choices[0].finish_reason})")
        try:
            v = json.loads(content)
        except json.JSONDecodeError as e:
            fail(f"the schema-constrained reply is not JSON ({e}): {content!r}")
        check(r.choices[0].finish_reason == "stop" and set(v) == set(schema["required"])
              and isinstance(v["city"], str) and isinstance(v["country"], str)
              and isinstance(v["is_capital"], bool),
              f"the JSON-schema reply matches the schema: {v}")
        r = client.chat.completions.create(
            model="tuned", temperature=0, max_tokens=120,
            messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
            response_format={"type": "json_object"},
        )
        content = r.choices[0].message.content
        log(f"json_object (tuned): {content!r} ({r.choices[0].finish_reason})")
        if r.choices[0].finish_reason == "stop":
            check(isinstance(json.loads(content), dict), "JSON mode gives a JSON object")
        else:
            check(content.startswith("{"), "JSON mode starts a JSON object (cut at the token limit)")

        # 5. adapter by model name
        r = client.chat.completions.create(model="tuned", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        tuned = r.choices[0].message.content
        log(f"tuned: {tuned!r}")
        check(tuned != text, "the adapter's reply differs from the base's")
        merged = tmp / "merged"
        subprocess.run([args.teamtune, "merge", "--adapter", str(adapter), "--out", str(merged)]
                       + (["--model", args.model] if args.model else []),
                       check=True, capture_output=True)
        expected = generate(args.teamtune, str(merged))
        check(tuned == expected, f"the adapter's greedy reply equals teamtune generate on the merged model: "
                                 f"{tuned!r} vs {expected!r}")

        # 6. errors
        for what, exc, call in [
            ("unknown model", openai.NotFoundError,
             lambda: client.chat.completions.create(model="nope", messages=messages)),
            ("n=99", openai.BadRequestError,
             lambda: client.chat.completions.create(model="base", messages=messages, n=99)),
            ("wrong key", openai.AuthenticationError,
             lambda: OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(
                 model="base", messages=messages)),
        ]:
            try:
                call()
                fail(f"{what}: no error")
            except exc as e:
                body = e.body if isinstance(e.body, dict) else {}
                check(bool(body.get("message")), f"{what}: {type(e).__name__} ({e.status_code}) {body.get('message')!r}")

        # 7. tools
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "The current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                           "required": ["city", "unit"], "additionalProperties": False}}}]
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            r = client.chat.completions.create(model="base", messages=ask, tools=tools, tool_choice=choice,
                                               temperature=0, max_tokens=60)
            calls = r.choices[0].message.tool_calls or []
            log(f"tool call ({choice}): {calls} ({r.choices[0].finish_reason})")
            check(r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
                  and calls[0].function.name == "get_weather", f"tool_choice={choice} gives one call")
            a = json.loads(calls[0].function.arguments)
            check(set(a) == {"city", "unit"} and a["unit"] in ("celsius", "fahrenheit"),
                  f"the arguments follow the schema: {a}")
        stream = client.chat.completions.create(model="base", messages=ask, tools=tools, tool_choice="required",
                                                temperature=0, max_tokens=60, stream=True)
        name, arguments, finish = "", "", None
        for c in stream:
            if not c.choices:
                continue
            for d in c.choices[0].delta.tool_calls or []:
                name += d.function.name or ""
                arguments += d.function.arguments or ""
            finish = c.choices[0].finish_reason or finish
        check(name == "get_weather" and json.loads(arguments) == a and finish == "tool_calls",
              f"streamed tool-call deltas add up to the same call: {name} {arguments} ({finish})")
        follow = ask + [{"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
                        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, light rain"}]
        r = client.chat.completions.create(model="base", messages=follow, tools=tools, temperature=0, max_tokens=40)
        log(f"after the tool result: {r.choices[0].message.content!r} ({r.choices[0].finish_reason})")
        check(r.choices[0].finish_reason in ("stop", "length", "tool_calls"), "the next turn is answered")

        # 8. adapters at run time
        http = client._client  # the client's own httpx session, with the key
        loaded = http.post(f"{url}/load_lora_adapter", json={"lora_name": "again", "lora_path": str(adapter)},
                           headers={"Authorization": f"Bearer {KEY}"})
        check(loaded.status_code == 200, f"load_lora_adapter: {loaded.status_code} {loaded.text}")
        ids = [m.id for m in client.models.list().data]
        check(ids == ["base", "tuned", "again"], f"the loaded adapter is listed: {ids}")
        again = client.chat.completions.create(model="again", messages=messages, temperature=0,
                                               max_tokens=MAX_TOKENS).choices[0].message.content
        check(again == tuned, f"the adapter loaded at run time answers as at start: {again!r}")
        gone = http.post(f"{url}/unload_lora_adapter", json={"lora_name": "again"},
                         headers={"Authorization": f"Bearer {KEY}"})
        check(gone.status_code == 200 and [m.id for m in client.models.list().data] == ["base", "tuned"],
              f"unload_lora_adapter: {gone.status_code} {gone.text}")

        # 9. SIGTERM
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        check(code == 0, f"SIGTERM: the server exited with {code}")
    finally:
        if server.poll() is None:
            server.kill()
    print("check_serve: all checks passed")


if __name__ == "__main__":
    main()
