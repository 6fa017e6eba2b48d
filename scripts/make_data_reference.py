#!/usr/bin/env python3
"""Reference token ids and assistant masks for teamtune-data's tests, computed with transformers.

Run it through scripts/make-data-reference.sh, which makes the virtual environment with pinned
versions and fetches the tokenizers. Writes into crates/data/tests/fixtures/:

- smollm2-tokenizer.json.gz: SmolLM2-135M-Instruct's tokenizer as transformers loads it from the
  default model's GGUF (so the Rust tests need no GGUF reader), and smollm2-chat_template.jinja,
  the template from the GGUF metadata.
- reference-<config>.json: for each conversation of conversations.jsonl, the rendered text, the ids
  of `tokenizer.apply_chat_template(messages, tokenize=True)`, and two masks computed
  independently that must agree:
    * `assistant_masks` from `apply_chat_template(..., return_assistant_tokens_mask=True)` with a
      copy of the template patched with {% generation %} around each reply and its end-of-turn
      token (llama31-generation.jinja, smollm2-generation.jinja);
    * a prefix-difference mask computed here: reply i spans from the end of
      render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i+1]),
      tokens overlapping it are trained, then cut after the span's last end-of-turn token.
  plus the mask for training on the last reply only and the decoded trained text.
"""

import argparse
import gzip
import json
import os
import sys

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast


def gguf_tokenizer(path):
    """The tokenizer transformers makes from a GGUF (`AutoTokenizer.from_pretrained(dir,
    gguf_file=name)`), without torch: transformers' GGUF reader imports torch, so the metadata is
    read with the gguf package and handed to transformers' own converter, as
    `integrations.gguf.get_gguf_tokenizer` does. When torch is installed, the result is checked
    against AutoTokenizer."""
    from gguf import GGUFReader
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    reader = GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items()}
    architecture = metadata["general.architecture"]
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    assert tokenizer_dict.get("tokenizer_type") not in ("llama", "gemma4"), "not handled here"
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tok = TokenizersBackend(tokenizer_object=backend, **tokenizer_config, **extra)

    try:
        import torch  # noqa: F401
    except ImportError:
        return tok
    d, name = os.path.split(os.path.abspath(path))
    auto = AutoTokenizer.from_pretrained(d, gguf_file=name)
    assert auto.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert auto.chat_template == tok.chat_template
    assert auto.special_tokens_map == tok.special_tokens_map, (auto.special_tokens_map, tok.special_tokens_map)
    print("checked: same tokenizer as AutoTokenizer.from_pretrained(gguf_file=...)", file=sys.stderr)
    return tok


TOOLS = [
    {
        "name": "move",
        "description": "Move one cell; é \"q\" <tag> & ' \\ \n\t 你好 🤖",
        "parameters": {"dir": "left", "speed": 0.5, "tiny": 1e-07, "big": 1e20, "n": 3, "ok": True,
                       "nothing": None, "list": [], "obj": {}, "nested": [1, [2.0, {"x": -1.5}]]},
    }
]

CASE_MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "  Hello, world, again  ", "name": "A"},
    {"role": "assistant", "content": "{\"action\": \"left\", \"note\": \"é\"}"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]

# (name, template, kwargs). Each is rendered by transformers with the SmolLM2 tokenizer's special
# tokens; teamtune-data must give the same text (or raise with the same message).
TEMPLATE_CASES = [
    ("tojson", "{{ messages[2].content | tojson }}|{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|"
     "{{ tools[0] | tojson(ensure_ascii=True) }}|{{ tools[0].parameters | tojson(sort_keys=True) }}|"
     "{{ tools[0] | tojson(separators=(',', ':')) }}|{{ messages | tojson(indent=4) }}", {"tools": TOOLS}),
    ("string_methods", "{% for m in messages %}[{{ m.content.strip() }}|{{ m.content.split(',') | length }}|"
     "{{ m.content.upper() }}|{{ m.content.lower().replace('l', 'L') }}|{{ m.content.lstrip() }}|"
     "{{ m.content.rstrip() }}|{{ m.content.title() }}|{{ m.content.strip().capitalize() }}|"
     "{{ m.content.count('o') }}|{{ m.content.find('o') }}|{{ m.content.strip().endswith('n') }}]{% endfor %}", {}),
    ("printing", "{{ true }} {{ false }} {{ none }} {{ 1.0 }} {{ 0.1 + 0.2 }} {{ 10 / 4 }} {{ 7 // 2 }} {{ 2 ** 10 }} "
     "{{ [1, 'a', none, true, 2.5] }} {{ {'k': 'v', 'n': 1} }} {{ 1e20 }} {{ -0.0 }} {{ 'x' in messages[0].content }} "
     "{{ messages[0] is mapping }} {{ messages[0].content is string }} {{ tools is none }} {{ ('a', 1) }} "
     "{{ messages[1] }}", {}),
    ("whitespace", "{# comment #}\n{% for m in messages %}\n    {% if m.role == 'user' %}\n        U: {{ m.content }}\n"
     "    {% elif m.role == 'assistant' %}\n  A: {{ m.content }}\n    {%- endif %}\n\n    {%+ if loop.last %}END{% endif %}\n"
     "{% endfor %}\n{%- if add_generation_prompt -%}\n   GEN\n{%- endif %}\n", {}),
    ("loops_namespace", "{% set ns = namespace(n=0, last='') %}{% for m in messages %}{% if m.role == 'system' %}"
     "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{% set ns.last = m.role %}{% if loop.index > 4 %}{% break %}"
     "{% endif %}{{ loop.index0 }}/{{ loop.length }}:{{ m.role }}{{ ',' if not loop.last }};{% endfor %}{{ ns.n }} {{ ns.last }}"
     "{% for x in range(3) %}{{ loop.first }}{{ loop.revindex }}{% endfor %}", {}),
    ("slicing", "{{ messages[-1].content }}|{% for m in messages[::-1] %}{{ m.role[0] }}{% endfor %}|"
     "{{ messages[1:3] | length }}|{{ 'abcdef'[1:-1] }}|{{ 'abcdef'[::2] }}|{{ messages[0]['role'] }}", {}),
    ("filters", "{{ messages | map(attribute='role') | join(',') }}|{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|"
     "{{ messages | rejectattr('role', 'equalto', 'user') | map(attribute='role') | unique | join('+') }}|"
     "{% for k, v in tools[0].parameters | items %}{{ k }}={{ v }};{% endfor %}|{{ missing | default('dflt') }}|"
     "{{ (messages | first).role }}|{{ (messages | last).content | trim }}|{{ messages | length }}|"
     "{{ [3, 1, 2] | sort | join }}|{{ 'a-b' | replace('-', '+') }}|{{ 'x' * 3 }}|{{ [1, 2] + [3] }}", {"tools": TOOLS}),
    ("dicts", "{% set d = dict(a=1, b='x') %}{% for k, v in d.items() %}{{ k }}{{ v }}{% endfor %}|{{ d.get('c', 'none') }}|"
     "{{ messages[1].get('name', 'anon') }}|{{ messages[0].get('name', 'anon') }}|{{ d.keys() | list }}|{{ d.values() | list }}|"
     "{{ messages[1].name }}|{{ 'name' in messages[1] }}", {}),
    ("specials", "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ add_generation_prompt }}|"
     "{{ date_string }}|{{ enable_thinking }}|{{ documents is none }}", {"date_string": "1 Jan 2025", "enable_thinking": False}),
    ("raise", "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}", {}),
]


def template_cases(tok):
    out = []
    for name, template, kwargs in TEMPLATE_CASES:
        for gen in (False, True):
            case = {"name": name, "template": template, "kwargs": kwargs, "add_generation_prompt": gen,
                    "messages": CASE_MESSAGES}
            try:
                case["output"] = tok.apply_chat_template(
                    CASE_MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=gen, **kwargs
                )
            except Exception as e:  # noqa: BLE001 - the message is the expected result
                case["error"] = str(e)
            out.append(case)
    # {% generation %} on lines of their own: trim_blocks/lstrip_blocks apply to them as block tags.
    gen_template = (
        "{%- for message in messages %}\n    {%- if message.role == 'assistant' %}\n<|im_start|>assistant\n"
        "    {% generation %}\n        {{ message.content }}<|im_end|>\n    {% endgeneration %}\n\n"
        "    {%- else %}\n<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n    {%- endif %}\n"
        "{% endfor %}\n{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = tok.apply_chat_template(
        CASE_MESSAGES, chat_template=gen_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    generation = {
        "template": gen_template,
        "messages": CASE_MESSAGES,
        "text": tok.apply_chat_template(CASE_MESSAGES, chat_template=gen_template, tokenize=False),
        "input_ids": enc["input_ids"],
        "assistant_mask": list(enc["assistant_masks"]),
    }
    return {
        "transformers": transformers.__version__,
        "special_tokens": tok.special_tokens_map,
        "cases": out,
        "generation": generation,
    }


def render(tok, template, messages, add_generation_prompt):
    return tok.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def overlap_mask(offsets, spans):
    """transformers' rule: a token is in a span when its character range overlaps it."""
    mask = [0] * len(offsets)
    ranges = [None] * len(spans)
    si = 0
    for t, (ts, te) in enumerate(offsets):
        while si < len(spans) and ts >= spans[si][1]:
            si += 1
        if si == len(spans):
            break
        if te > spans[si][0]:
            mask[t] = 1
            ranges[si] = (ranges[si][0] if ranges[si] else t, t + 1)
    return mask, ranges


def prefix_diff_mask(tok, template, messages, eot_ids):
    full = render(tok, template, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        pre = render(tok, template, messages[:i], True)
        post = render(tok, template, messages[: i + 1], False)
        assert full.startswith(post) and post.startswith(pre), (i, pre, post)
        spans.append((len(pre), len(post)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    mask, ranges = overlap_mask(enc["offset_mapping"], spans)
    trimmed = []
    for r in ranges:
        if r is None:
            continue
        a, b = r
        last = max((t for t in range(a, b) if ids[t] in eot_ids), default=None)
        if last is not None:
            for t in range(last + 1, b):
                mask[t] = 0
            b = last + 1
        trimmed.append((a, b))
    mask[0] = 0
    return full, ids, mask, trimmed


def reference(name, tok, template, generation_template, eot_names, conversations):
    eot_ids = {tok.convert_tokens_to_ids(t) for t in eot_names}
    out = {
        "config": name,
        "transformers": transformers.__version__,
        "eot_ids": sorted(eot_ids),
        "conversations": [],
    }
    for k, conv in enumerate(conversations):
        messages = conv["messages"]
        ids = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        text = render(tok, template, messages, False)
        gen = tok.apply_chat_template(
            messages,
            chat_template=generation_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert gen["input_ids"] == ids, f"{name} #{k}: the patched template renders differently"
        assert render(tok, generation_template, messages, False) == text
        gen_mask = list(gen["assistant_masks"])
        full, pd_ids, pd_mask, ranges = prefix_diff_mask(tok, template, messages, eot_ids)
        assert full == text and pd_ids == ids
        assert pd_mask == gen_mask, f"{name} #{k}: prefix-diff mask != generation mask"
        last = [0] * len(ids)
        a, b = ranges[-1]
        last[a:b] = [1] * (b - a)
        trained = [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in ranges]
        bos = tok.convert_tokens_to_ids(tok.bos_token) if tok.bos_token else None
        out["conversations"].append(
            {
                "index": k,
                "text": text,
                "input_ids": ids,
                "assistant_mask": gen_mask,
                "last_assistant_mask": last,
                "trained_text": trained,
                "bos_count": sum(1 for i in ids if i == bos) if bos is not None else 0,
            }
        )
        print(f"{name} #{k}: {len(ids)} tokens, {sum(gen_mask)} trained", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-tokenizer", required=True, help="Llama-3 tokenizer.json")
    ap.add_argument("--smollm2-gguf", required=True, help="SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--fixtures", required=True, help="crates/data/tests/fixtures")
    ap.add_argument("--llama-template", required=True, help="crates/data/src/templates/llama31.jinja")
    ap.add_argument("--chatml-template", required=True, help="crates/data/src/templates/chatml.jinja")
    args = ap.parse_args()
    fx = args.fixtures

    with open(os.path.join(fx, "conversations.jsonl"), encoding="utf-8") as f:
        conversations = [json.loads(line) for line in f if line.strip()]

    def read(path):
        with open(path, encoding="utf-8") as f:
            return f.read()

    # Llama-3.1 template with the real Llama-3 tokenizer. The bare tokenizer.json carries no special
    # token roles, so name them as Llama-3.1's tokenizer_config.json does.
    llama = PreTrainedTokenizerFast(
        tokenizer_file=args.llama_tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    llama_ref = reference(
        "llama31",
        llama,
        read(args.llama_template),
        read(os.path.join(fx, "llama31-generation.jinja")),
        ["<|eot_id|>", "<|end_of_text|>"],
        conversations,
    )

    # SmolLM2 from the default model's GGUF, with the ChatML template of its metadata.
    smol = gguf_tokenizer(args.smollm2_gguf)
    smol_template = smol.chat_template
    with open(os.path.join(fx, "smollm2-chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(smol_template)
    data = smol.backend_tokenizer.to_str().encode("utf-8")
    with gzip.GzipFile(os.path.join(fx, "smollm2-tokenizer.json.gz"), "wb", mtime=0) as f:
        f.write(data)
    smol_ref = reference(
        "smollm2",
        smol,
        smol_template,
        read(os.path.join(fx, "smollm2-generation.jinja")),
        ["<|im_end|>", "<|endoftext|>"],
        conversations,
    )
    # The built-in ChatML template (no default system message) with the same tokenizer; its
    # generation copy is made here.
    chatml = read(args.chatml_template)
    chatml_gen = chatml.replace(
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}",
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}",
    )
    assert chatml_gen != chatml
    chatml_ref = reference("chatml", smol, chatml, chatml_gen, ["<|im_end|>", "<|endoftext|>"], conversations)

    with open(os.path.join(fx, "reference-templates.json"), "w", encoding="utf-8") as f:
        json.dump(template_cases(smol), f, ensure_ascii=False, indent=1)
        f.write("\n")

    for ref in (llama_ref, smol_ref, chatml_ref):
        with open(os.path.join(fx, f"reference-{ref['config']}.json"), "w", encoding="utf-8") as f:
            json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
    print("wrote fixtures to", fx, file=sys.stderr)


if __name__ == "__main__":
    main()
