//! `config.json` written back: a [`LlamaConfig`] as transformers' `LlamaForCausalLM` config
//! (the reader is [`super::config`]; the two together own config.json both ways).

use candle_core::DType;
use serde_json::{json, Value};

use super::config::{LlamaConfig, RopeScaling};
use crate::error::{LlamaError, Result};

/// The names of a dtype the export writes: safetensors' (`F32`), torch's (config.json's
/// `torch_dtype`) and its size in bytes.
pub(crate) fn dtype_names(dtype: DType) -> Result<(&'static str, &'static str, u64)> {
    Ok(match dtype {
        DType::F32 => ("F32", "float32", 4),
        DType::BF16 => ("BF16", "bfloat16", 2),
        DType::F16 => ("F16", "float16", 2),
        other => {
            return Err(LlamaError::Config {
                path: "--dtype".into(),
                message: format!("cannot export weights as {other:?} (f32, bf16, f16)"),
            })
        }
    })
}

/// An f64 that came from an f32 (GGUF metadata) written as the f32's shortest decimal, so
/// that `1e-5` stays `1e-5` instead of `9.999999747378752e-6`.
fn clean_f64(x: f64) -> f64 {
    let f = x as f32;
    if f as f64 == x {
        f.to_string().parse().unwrap_or(x)
    } else {
        x
    }
}

/// The HF `rope_scaling` object for `c`, `None` for plain RoPE. A GGUF file stores Llama-3.1
/// scaling only as per-frequency divisors (`rope_freqs.weight`); the llama3 parameters that
/// give exactly those frequencies are searched for, and an error says so if none do.
pub(crate) fn hf_rope_scaling(c: &LlamaConfig) -> Result<Option<Value>> {
    match &c.rope_scaling {
        RopeScaling::None => Ok(None),
        RopeScaling::Linear { factor } => Ok(Some(
            json!({"factor": clean_f64(*factor), "rope_type": "linear"}),
        )),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => Ok(Some(json!({
            "factor": clean_f64(*factor),
            "high_freq_factor": clean_f64(*high_freq_factor),
            "low_freq_factor": clean_f64(*low_freq_factor),
            "original_max_position_embeddings": original_max_position_embeddings,
            "rope_type": "llama3",
        }))),
        RopeScaling::FrequencyDivisors(div) => {
            let want = c.inv_freq();
            let close = |got: &[f32]| {
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| ((g - w) / w).abs() <= 1e-5)
            };
            let plain = LlamaConfig {
                rope_scaling: RopeScaling::None,
                ..c.clone()
            };
            if close(&plain.inv_freq()) {
                return Ok(None);
            }
            let max = div.iter().cloned().fold(1.0f32, f32::max) as f64;
            let factor = if (max - max.round()).abs() < 1e-3 {
                max.round()
            } else {
                clean_f64(max as f32 as f64)
            };
            // Only the ratios old/low and old/high matter; Llama's own low = 1, high = 4 first.
            for low in [1.0, 0.5, 2.0] {
                for high in [4.0, 2.0, 8.0, 1.5, 3.0, 16.0] {
                    for old in (4..=20).map(|k| 1usize << k) {
                        if high <= low {
                            continue;
                        }
                        let s = RopeScaling::Llama3 {
                            factor,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: old,
                        };
                        let cand = LlamaConfig {
                            rope_scaling: s.clone(),
                            ..c.clone()
                        };
                        if close(&cand.inv_freq()) {
                            let c2 = LlamaConfig {
                                rope_scaling: s,
                                ..c.clone()
                            };
                            return hf_rope_scaling(&c2);
                        }
                    }
                }
            }
            Err(LlamaError::Config {
                path: "rope_freqs.weight".into(),
                message: "the GGUF's per-frequency RoPE divisors match no llama3 rope_scaling; \
                          an HF config.json cannot express them"
                    .into(),
            })
        }
    }
}

/// `config.json` of `LlamaForCausalLM` (transformers 4 form: `rope_theta` + `rope_scaling`,
/// which transformers 5 reads too) for `c` with weights in `dtype`.
pub(crate) fn hf_config_json(c: &LlamaConfig, dtype: DType) -> Result<Value> {
    let (_, torch_dtype, _) = dtype_names(dtype)?;
    let eos: Value = match c.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    Ok(json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "pad_token_id": c.pad_token_id,
        "pretraining_tp": 1,
        "rms_norm_eps": clean_f64(c.rms_norm_eps),
        "rope_scaling": hf_rope_scaling(c)?,
        "rope_theta": clean_f64(c.rope_theta),
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": true,
        "vocab_size": c.vocab_size,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_metadata_values_are_written_short() {
        assert_eq!(clean_f64(1e-5f32 as f64), 1e-5);
        assert_eq!(clean_f64(1e-5), 1e-5);
        assert_eq!(clean_f64(500000.0), 500000.0);
    }
}
