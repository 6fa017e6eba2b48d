//! The text side of a model: tokenizer, chat template, special tokens and the ids that end a
//! turn. Read from tokenizer.json/tokenizer_config.json (HF folder) or the GGUF metadata.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{LlamaError, Result};
use crate::load::source::ModelFiles;
use crate::load::text_file::read_text_file;
use crate::load::weights::GgufWeights;

/// Tokens that end an assistant turn in the chat formats we know; generation stops on any of
/// them that the vocabulary has, besides the config's EOS ids.
const TURN_END_TOKENS: [&str; 5] = [
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
];

#[derive(Clone)]
pub struct ChatAssets {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every id that ends generation (config EOS ids and turn-end tokens), sorted, unique.
    pub eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for ChatAssets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatAssets")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("has_chat_template", &self.chat_template.is_some())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

/// Loads tokenizer and template of `model` ("" = default model, folder, .gguf, hub id).
pub fn load_chat_assets(model: &str) -> Result<ChatAssets> {
    let files = ModelFiles::resolve(model)?;
    ChatAssets::load(&files, &[])
}

impl ChatAssets {
    /// `config_eos` are the EOS ids of the model config, added to the stop set.
    pub fn load(files: &ModelFiles, config_eos: &[u32]) -> Result<Self> {
        let (tokenizer, chat_template, bos_token, eos_token, mut eos_ids) = match files {
            ModelFiles::Gguf { path } => {
                return Self::from_gguf(&GgufWeights::open(path)?, config_eos)
            }
            ModelFiles::HfFolder { dir, .. } => {
                let tok_path = dir.join("tokenizer.json");
                let tokenizer = read_text_file(&tok_path)?
                    .parse::<Tokenizer>()
                    .map_err(|e| LlamaError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
                let cfg = read_json_opt(&dir.join("tokenizer_config.json"))?;
                let jinja = dir.join("chat_template.jinja");
                let template = if jinja.exists() {
                    Some(read_text_file(&jinja)?)
                } else {
                    cfg.as_ref()
                        .and_then(|c| template_from_config(c.get("chat_template")?))
                };
                let token_str = |key: &str| -> Option<String> {
                    let v = cfg.as_ref()?.get(key)?;
                    v.as_str()
                        .or_else(|| v.get("content").and_then(Value::as_str))
                        .map(str::to_string)
                };
                let mut eos = vec![];
                if let Some(gen) = read_json_opt(&dir.join("generation_config.json"))? {
                    eos.extend(ids(gen.get("eos_token_id")));
                }
                (
                    tokenizer,
                    template,
                    token_str("bos_token"),
                    token_str("eos_token"),
                    eos,
                )
            }
        };
        eos_ids.extend_from_slice(config_eos);
        Ok(Self::assemble(
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            eos_ids,
        ))
    }

    /// The assets of an already opened GGUF file (tokenizer and template from its metadata).
    pub fn from_gguf(g: &GgufWeights, config_eos: &[u32]) -> Result<Self> {
        let mut eos_ids = g.eos_token_ids();
        eos_ids.extend_from_slice(config_eos);
        Ok(Self::assemble(
            g.tokenizer()?,
            g.chat_template(),
            g.special_token("tokenizer.ggml.bos_token_id"),
            g.special_token("tokenizer.ggml.eos_token_id"),
            eos_ids,
        ))
    }

    /// Completes the stop set with the EOS token and the turn-end tokens the vocabulary has.
    fn assemble(
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        mut eos_ids: Vec<u32>,
    ) -> Self {
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.extend(
            TURN_END_TOKENS
                .iter()
                .filter_map(|t| tokenizer.token_to_id(t)),
        );
        eos_ids.sort_unstable();
        eos_ids.dedup();
        ChatAssets {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            eos_token_ids: eos_ids,
        }
    }

    /// Errors when the tokenizer can produce ids the model has no embedding for.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let n = self.tokenizer.get_vocab_size(true);
        if n > vocab_size {
            return Err(LlamaError::Tokenizer(format!(
                "the tokenizer has {n} tokens but the model's vocabulary has only {vocab_size}: they do not belong together"
            )));
        }
        Ok(())
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| LlamaError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| LlamaError::Tokenizer(e.to_string()))
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text_file(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LlamaError::Tokenizer(format!("{}: not valid JSON: {e}", path.display())))
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` is used.
fn template_from_config(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        Some(x) => x.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        None => vec![],
    }
}
