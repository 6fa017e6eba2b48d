//! What a GGUF file says besides its tensors: the model config (llama.cpp metadata keys) and
//! the tokenizer with its chat template.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{PreTokenizerWrapper, Tokenizer};

use crate::error::{LlamaError, Result};
use crate::load::config::{LlamaConfig, RopeScaling};
use crate::load::weights::GgufWeights;

impl GgufWeights {
    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn err(&self, message: impl Into<String>) -> LlamaError {
        LlamaError::Gguf {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn meta_u64(&self, key: &str) -> Option<u64> {
        let v = self.meta(key)?;
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .or_else(|| v.to_i32().ok().map(|x| x as u64))
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        let v = self.meta(key)?;
        v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok())
    }

    fn meta_str(&self, key: &str) -> Option<String> {
        self.meta(key)?.to_string().ok().cloned()
    }

    /// The model config from llama.cpp's `llama.*` keys.
    pub fn config(&self) -> Result<LlamaConfig> {
        let req = |key: &str| -> Result<usize> {
            self.meta_u64(key)
                .map(|x| x as usize)
                .ok_or_else(|| self.err(format!("metadata `{key}` is missing")))
        };
        let hidden_size = req("llama.embedding_length")?;
        let n_heads = req("llama.attention.head_count")?;
        let head_dim = self
            .meta_u64("llama.attention.key_length")
            .or_else(|| self.meta_u64("llama.rope.dimension_count"))
            .map(|x| x as usize)
            .unwrap_or(hidden_size / n_heads);
        let vocab_size = match self.meta_u64("llama.vocab_size") {
            Some(v) => v as usize,
            None => self
                .meta("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| self.err("neither `llama.vocab_size` nor a token list"))?,
        };
        let rope_scaling = if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let divisors = self
                .raw("rope_freqs.weight")?
                .flatten_all()?
                .to_vec1::<f32>()?;
            RopeScaling::FrequencyDivisors(divisors)
        } else {
            match self.meta_str("llama.rope.scaling.type").as_deref() {
                None | Some("none") => RopeScaling::None,
                Some("linear") => RopeScaling::Linear {
                    factor: self.meta_f64("llama.rope.scaling.factor").unwrap_or(1.0),
                },
                Some(other) => {
                    return Err(self.err(format!("rope scaling `{other}` is not supported")))
                }
            }
        };
        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: req("llama.feed_forward_length")?,
            num_hidden_layers: req("llama.block_count")?,
            num_attention_heads: n_heads,
            num_key_value_heads: self.n_kv_heads,
            head_dim,
            rms_norm_eps: self
                .meta_f64("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64("llama.rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: req("llama.context_length").unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self
                .meta_u64("tokenizer.ggml.bos_token_id")
                .map(|x| x as u32),
            eos_token_ids: self.eos_token_ids(),
            pad_token_id: self
                .meta_u64("tokenizer.ggml.padding_token_id")
                .map(|x| x as u32),
        })
    }

    /// The EOS and end-of-turn ids the metadata names.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let eos = self.meta_u64("tokenizer.ggml.eos_token_id");
        let eot = self.meta_u64("tokenizer.ggml.eot_token_id");
        let mut ids: Vec<u32> = eos.into_iter().chain(eot).map(|x| x as u32).collect();
        ids.dedup();
        ids
    }

    pub fn chat_template(&self) -> Option<String> {
        self.meta_str("tokenizer.chat_template")
    }

    /// The token string for an id stored under `key` (e.g. `tokenizer.ggml.bos_token_id`).
    pub fn special_token(&self, key: &str) -> Option<String> {
        let id = self.meta_u64(key)? as usize;
        let tokens = self.meta("tokenizer.ggml.tokens")?.to_vec().ok()?;
        tokens.get(id)?.to_string().ok().cloned()
    }

    /// A `tokenizers` tokenizer rebuilt from the GGUF vocabulary and merges. candle builds the
    /// BPE model and the special tokens; the pre-tokenizer is chosen here from
    /// `tokenizer.ggml.pre` because candle maps only a few names and falls back to GPT-2's
    /// (with a prefix space) for the rest, which splits text differently from the original.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.meta_str("tokenizer.ggml.model").unwrap_or_default();
        if model != "gpt2" {
            return Err(self.err(format!(
                "tokenizer model `{model}` is not supported (only BPE `gpt2`)"
            )));
        }
        let pre = self
            .meta_str("tokenizer.ggml.pre")
            .unwrap_or_else(|| "default".into());
        let mut content_view = self.content.metadata.clone();
        // llama.cpp's names for the Llama-3 regex; candle knows it as `llama3`.
        if matches!(pre.as_str(), "llama-bpe" | "llama-v3" | "llama3") {
            content_view.insert("tokenizer.ggml.pre".into(), Value::String("llama3".into()));
            content_view.insert("tokenizer.ggml.ignore_merges".into(), Value::Bool(true));
        }
        let ct = candle_core::quantized::gguf_file::Content {
            magic: self.content.magic,
            metadata: content_view,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        let mut tok = Tokenizer::from_gguf(&ct)
            .map_err(|e| LlamaError::Tokenizer(format!("{}: {e}", self.path.display())))?;
        match pre.as_str() {
            "llama-bpe" | "llama-v3" | "llama3" | "smaug-bpe" | "qwen2" => {}
            // SmolLM: each digit is its own token, then GPT-2 byte-level splitting without a
            // prefix space (HF: Sequence[Digits(individual), ByteLevel(add_prefix_space=false)]).
            "smollm" | "starcoder" => {
                let pre: PreTokenizerWrapper = Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])
                .into();
                tok.with_pre_tokenizer(Some(pre));
            }
            "gpt-2" | "gpt2" | "default" => {
                tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            other => {
                return Err(self.err(format!(
                    "tokenizer pre-tokenizer `{other}` is not supported (llama-bpe, smollm, gpt-2, qwen2)"
                )))
            }
        }
        Ok(tok)
    }
}
