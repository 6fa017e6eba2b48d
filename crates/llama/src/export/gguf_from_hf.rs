//! What llama.cpp's `convert_hf_to_gguf.py` writes for a LLaMA Hugging Face folder, for
//! `teamtune merge --format gguf` from such a folder: the `llama.*` metadata from config.json,
//! the tokenizer as `tokenizer.ggml.*` (a byte-level BPE's tokens, token types and merges,
//! the pre-tokenizer's name, the special ids) with the chat template, llama3 rope scaling as
//! the `rope_freqs.weight` divisors, and the weights under GGUF names (q and k permuted).

use candle_core::quantized::gguf_file::Value;
use candle_core::Tensor;
use serde_json::Value as Json;

use crate::error::{LlamaError, Result};
use crate::load::assets::ChatAssets;
use crate::load::config::{LlamaConfig, RopeScaling};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The HF tensor names of the model in the order convert_hf_to_gguf.py writes them, with their
/// GGUF names.
pub(super) fn tensor_names(config: &LlamaConfig) -> Vec<(String, String)> {
    let mut names = vec![(
        "model.embed_tokens.weight".to_string(),
        "token_embd.weight".to_string(),
    )];
    for l in 0..config.num_hidden_layers {
        for (hf, gguf) in [
            ("input_layernorm.weight", "attn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
        ] {
            names.push((format!("model.layers.{l}.{hf}"), format!("blk.{l}.{gguf}")));
        }
    }
    names.push(("model.norm.weight".into(), "output_norm.weight".into()));
    if !config.tie_word_embeddings {
        names.push(("lm_head.weight".into(), "output.weight".into()));
    }
    names
}

/// Llama-3.1's rope scaling as llama.cpp stores it: one divisor per frequency.
pub(super) fn rope_freqs(config: &LlamaConfig) -> Option<Vec<f32>> {
    match &config.rope_scaling {
        RopeScaling::Llama3 { .. } | RopeScaling::FrequencyDivisors(_) => {
            let plain = LlamaConfig {
                rope_scaling: RopeScaling::None,
                ..config.clone()
            };
            let (base, scaled) = (plain.inv_freq(), config.inv_freq());
            Some(base.iter().zip(&scaled).map(|(b, s)| b / s).collect())
        }
        _ => None,
    }
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

/// The `llama.*`, `general.*` and `tokenizer.*` metadata of a model.
pub(super) fn metadata(
    config: &LlamaConfig,
    assets: &ChatAssets,
    name: &str,
    file_type: u32,
) -> Result<Vec<(String, Value)>> {
    let c = config;
    let u = |v: usize| Value::U32(v as u32);
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.type".into(), s("model")),
        ("general.name".into(), s(name)),
        ("llama.block_count".into(), u(c.num_hidden_layers)),
        ("llama.context_length".into(), u(c.max_position_embeddings)),
        ("llama.embedding_length".into(), u(c.hidden_size)),
        ("llama.feed_forward_length".into(), u(c.intermediate_size)),
        (
            "llama.attention.head_count".into(),
            u(c.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(c.num_key_value_heads),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.attention.key_length".into(), u(c.head_dim)),
        ("llama.attention.value_length".into(), u(c.head_dim)),
        ("general.file_type".into(), Value::U32(file_type)),
        ("llama.vocab_size".into(), u(c.vocab_size)),
        ("llama.rope.dimension_count".into(), u(c.head_dim)),
    ];
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        m.push(("llama.rope.scaling.type".into(), s("linear")));
        m.push((
            "llama.rope.scaling.factor".into(),
            Value::F32(factor as f32),
        ));
    }
    m.extend(tokenizer_metadata(c, assets)?);
    m.push(("general.quantization_version".into(), Value::U32(2)));
    Ok(m)
}

/// The tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary.
fn tokenizer_metadata(config: &LlamaConfig, assets: &ChatAssets) -> Result<Vec<(String, Value)>> {
    let tok = &assets.tokenizer;
    let unsupported = |why: String| LlamaError::Tokenizer(format!("writing it as GGUF: {why}"));
    let json: Json = serde_json::from_str(
        &tok.to_string(false)
            .map_err(|e| unsupported(e.to_string()))?,
    )
    .map_err(|e| unsupported(e.to_string()))?;
    if json["model"]["type"] != "BPE" {
        return Err(unsupported(format!(
            "a {} tokenizer; only byte-level BPE (LLaMA-3, SmolLM2) is written",
            json["model"]["type"]
        )));
    }
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .ok_or_else(|| unsupported("the BPE model has no merges".into()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(pair) if pair.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap_or(""),
                pair[1].as_str().unwrap_or("")
            ))),
            other => Err(unsupported(format!("a merge that is {other}"))),
        })
        .collect::<Result<_>>()?;
    let added = tok.get_added_tokens_decoder();
    let vocab = tok.get_vocab(true);
    let mut tokens = vec![None; config.vocab_size.max(vocab.len())];
    for (text, id) in &vocab {
        if let Some(slot) = tokens.get_mut(*id as usize) {
            *slot = Some(text.clone());
        }
    }
    let (mut texts, mut types) = (
        Vec::with_capacity(tokens.len()),
        Vec::with_capacity(tokens.len()),
    );
    for (id, t) in tokens.into_iter().enumerate() {
        match t {
            Some(text) => {
                let ty = match added.get(&(id as u32)) {
                    Some(a) if a.special => CONTROL,
                    Some(_) => USER_DEFINED,
                    None => NORMAL,
                };
                texts.push(Value::String(text));
                types.push(Value::I32(ty));
            }
            // Ids past the tokenizer's (a padded embedding), as the converter fills them.
            None => {
                texts.push(Value::String(format!("[PAD{id}]")));
                types.push(Value::I32(UNUSED));
            }
        }
    }
    let has = |t: &str| vocab.contains_key(t);
    // llama.cpp picks its pre-tokenizer regex by this name (the converter hashes a test string;
    // these are the families teamtune knows).
    let pre = if has("<|begin_of_text|>") {
        "llama-bpe"
    } else if has("<|im_start|>") && vocab.len() == 49152 {
        "smollm"
    } else {
        tracing::warn!("an unknown BPE family: tokenizer.ggml.pre = \"default\" (llama.cpp may pre-tokenize differently)");
        "default"
    };
    let id_of = |t: &Option<String>| t.as_ref().and_then(|t| tok.token_to_id(t));
    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    if let Some(bos) = config.bos_token_id.or_else(|| id_of(&assets.bos_token)) {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(eos) = config
        .eos_token_ids
        .first()
        .copied()
        .or_else(|| id_of(&assets.eos_token))
    {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(eot) = ["<|eot_id|>", "<|im_end|>"]
        .iter()
        .find_map(|t| tok.token_to_id(t))
    {
        m.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(eot)));
    }
    let pad = config.pad_token_id.or_else(|| {
        ["<|pad|>", "<pad>", "[PAD]"]
            .iter()
            .find_map(|t| tok.token_to_id(t))
    });
    if let Some(pad) = pad {
        m.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(pad)));
    }
    // Whether the tokenizer itself puts BOS first (Llama-3's post-processor does).
    let with = tok
        .encode("a", true)
        .map_err(|e| unsupported(e.to_string()))?;
    let without = tok
        .encode("a", false)
        .map_err(|e| unsupported(e.to_string()))?;
    let adds_bos = with.get_ids().len() > without.get_ids().len();
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    if let Some(t) = &assets.chat_template {
        m.push(("tokenizer.chat_template".into(), s(t)));
    }
    Ok(m)
}

/// A tensor of the rope divisors, f32.
pub(super) fn rope_freqs_tensor(divisors: Vec<f32>) -> Result<Tensor> {
    let n = divisors.len();
    Ok(Tensor::from_vec(divisors, n, &candle_core::Device::Cpu)?)
}
