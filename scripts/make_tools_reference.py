#!/usr/bin/env python3
"""The Llama-3.1 chat template rendered with `tools`, as transformers renders it.

Writes crates/data/tests/fixtures/llama31_tools.json: messages (a user turn, an assistant call
with its arguments as an object, the tool's result), the function definitions, and the text
`apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)` gives
with crates/data/src/templates/llama31.jinja.

Run as:  $(scripts/ref-env.sh) scripts/make_tools_reference.py
"""

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models

REPO = Path(__file__).resolve().parent.parent

MESSAGES = [
    {"role": "system", "content": "You are a helpful agent."},
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]


def main():
    template = (REPO / "crates/data/src/templates/llama31.jinja").read_text()
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    text = tok.apply_chat_template(MESSAGES, tools=TOOLS, chat_template=template, tokenize=False,
                                   add_generation_prompt=True)
    out = {"source": "transformers apply_chat_template(messages, tools=tools, add_generation_prompt=True) "
                     "with crates/data/src/templates/llama31.jinja (scripts/make_tools_reference.py)",
           "messages": MESSAGES, "tools": TOOLS, "text": text}
    path = REPO / "crates/data/tests/fixtures/llama31_tools.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(text)


if __name__ == "__main__":
    main()
