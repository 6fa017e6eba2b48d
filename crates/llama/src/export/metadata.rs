//! The HF folder's files besides weights and config: `generation_config.json`, the tokenizer
//! files, and JSON written as Python writes it.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{LlamaError, Result};
use crate::load::assets::ChatAssets;
use crate::load::config::LlamaConfig;
use crate::load::weights::WeightSource;

/// Pretty JSON as Python's `json.dumps(indent=2, sort_keys=True)` plus a newline (for
/// objects built from sorted keys).
pub(super) fn json_text(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
                let mut out = Map::new();
                for (k, v) in b {
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let mut s = serde_json::to_string_pretty(&sorted(v)).expect("JSON always serialises");
    s.push('\n');
    s
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::load::text_file::read_text_file(path)?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        _ => Err(LlamaError::Config {
            path: path.to_path_buf(),
            message: "not a JSON object".into(),
        }),
    }
}

/// The source's `generation_config.json` (sampling defaults kept) or a new one, with BOS and
/// the EOS ids (config EOS and the turn-end tokens generation stops on) filled in if absent.
pub(super) fn generation_config(
    source_dir: Option<&Path>,
    c: &LlamaConfig,
    assets: Option<&ChatAssets>,
) -> Result<Value> {
    let mut g = match source_dir {
        Some(d) => read_json_object(&d.join("generation_config.json"))?,
        None => None,
    }
    .unwrap_or_else(|| {
        let mut m = Map::new();
        m.insert("_from_model_config".into(), Value::Bool(true));
        m
    });
    if !g.contains_key("bos_token_id") {
        g.insert("bos_token_id".into(), json!(c.bos_token_id));
    }
    if !g.contains_key("eos_token_id") {
        let mut eos = c.eos_token_ids.clone();
        if let Some(a) = assets {
            eos.extend(&a.eos_token_ids);
        }
        eos.sort_unstable();
        eos.dedup();
        g.insert("eos_token_id".into(), json!(eos));
    }
    if !g.contains_key("pad_token_id") {
        if let Some(p) = c.pad_token_id {
            g.insert("pad_token_id".into(), json!(p));
        }
    }
    Ok(Value::Object(g))
}

/// `tokenizer.json` (copied from an HF source, else saved by the tokenizers crate) and
/// `tokenizer_config.json` (the source's, completed with the chat template, BOS/EOS/pad token
/// strings and `model_max_length`).
pub(super) fn write_tokenizer(
    tmp: &Path,
    source_dir: Option<&Path>,
    c: &LlamaConfig,
    assets: &ChatAssets,
    weights: &WeightSource,
) -> Result<()> {
    let tok_path = tmp.join("tokenizer.json");
    let mut tok_config = Map::new();
    let mut has_jinja = false;
    match source_dir {
        Some(dir) => {
            let src = dir.join("tokenizer.json");
            std::fs::copy(&src, &tok_path).map_err(|e| LlamaError::io(&src, e))?;
            for extra in ["special_tokens_map.json", "chat_template.jinja"] {
                let p = dir.join(extra);
                if p.exists() {
                    let dst = tmp.join(extra);
                    std::fs::copy(&p, &dst).map_err(|e| LlamaError::io(&p, e))?;
                    has_jinja |= extra == "chat_template.jinja";
                }
            }
            if let Some(m) = read_json_object(&dir.join("tokenizer_config.json"))? {
                tok_config = m;
            }
        }
        None => {
            assets
                .tokenizer
                .save(&tok_path, true)
                .map_err(|e| LlamaError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        }
    }
    let mut set_default = |key: &str, v: Value| {
        if !tok_config.contains_key(key) && !v.is_null() {
            tok_config.insert(key.into(), v);
        }
    };
    if !has_jinja {
        set_default("chat_template", json!(assets.chat_template));
    }
    set_default("bos_token", json!(assets.bos_token));
    set_default("eos_token", json!(assets.eos_token));
    let pad = match weights {
        WeightSource::Gguf(g) => g.special_token("tokenizer.ggml.padding_token_id"),
        WeightSource::Safetensors { .. } => c
            .pad_token_id
            .and_then(|id| assets.tokenizer.id_to_token(id)),
    };
    set_default("pad_token", json!(pad));
    set_default("model_max_length", json!(c.max_position_embeddings));
    set_default("clean_up_tokenization_spaces", json!(false));
    set_default("tokenizer_class", json!("PreTrainedTokenizerFast"));
    let p = tmp.join("tokenizer_config.json");
    std::fs::write(&p, json_text(&Value::Object(tok_config))).map_err(|e| LlamaError::io(&p, e))
}
