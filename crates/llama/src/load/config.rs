//! `config.json` of a Llama-3.x model, read the way transformers reads it: every field of the
//! 4.x form (`rope_theta`, `rope_scaling`) and the 5.x form (`rope_parameters`), defaults as in
//! `LlamaConfig`, unknown fields ignored, missing required ones named in the error.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{LlamaError, Result};

/// How rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    None,
    /// Llama-3.1 frequency smoothing: long wavelengths divided by `factor`, short ones kept,
    /// a linear blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (equivalently every frequency).
    Linear { factor: f64 },
    /// One divisor per frequency, as llama.cpp stores Llama-3.1 scaling in `rope_freqs.weight`.
    FrequencyDivisors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::load::text_file::read_text_file(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a config.json; `path` is only used to name the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| LlamaError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        let obj = value.as_object().ok_or_else(|| LlamaError::Config {
            path: path.to_path_buf(),
            message: "the top level is not a JSON object".into(),
        })?;
        Fields { obj, path }.parse()
    }

    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Inverse rotary frequencies, one per pair of head dimensions, after scaling.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::FrequencyDivisors(div) => {
                base.iter().zip(div).map(|(f, d)| f / *d as f64).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

/// Field access with errors that name the file and the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn path(&self) -> PathBuf {
        self.path.to_path_buf()
    }

    fn bad(&self, field: &str, want: &str) -> LlamaError {
        LlamaError::Config {
            path: self.path(),
            message: format!("field `{field}` must be {want}, found {}", self.obj[field]),
        }
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.bad(field, "a non-negative integer")),
        }
    }

    fn usize_req(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?
            .ok_or_else(|| LlamaError::MissingField {
                path: self.path(),
                field: field.into(),
            })
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(field, "a number")),
        }
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(field, "true or false")),
        }
    }

    /// Token ids may be an integer or a list of integers (Llama-3.1 lists three EOS ids).
    fn ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.present(field) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.bad(field, "an integer or a list of integers")),
            Some(v) => v
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.bad(field, "an integer or a list of integers")),
        }
    }

    fn parse(&self) -> Result<LlamaConfig> {
        if let Some(mt) = self.present("model_type").and_then(Value::as_str) {
            if mt != "llama" {
                return Err(LlamaError::Config {
                    path: self.path(),
                    message: format!("model_type `{mt}` is not supported (only `llama`)"),
                });
            }
        }
        if let Some(act) = self.present("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(LlamaError::Config {
                    path: self.path(),
                    message: format!("hidden_act `{act}` is not supported (only `silu`)"),
                });
            }
        }
        for field in ["attention_bias", "mlp_bias"] {
            if self.bool_opt(field)? == Some(true) {
                return Err(LlamaError::Config {
                    path: self.path(),
                    message: format!("`{field}: true` is not supported (Llama-3.x has no biases)"),
                });
            }
        }
        let hidden_size = self.usize_req("hidden_size")?;
        let num_attention_heads = self.usize_req("num_attention_heads")?;
        let num_key_value_heads = self
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(LlamaError::Config {
                path: self.path(),
                message: format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            });
        }
        let head_dim = match self.usize_opt("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(LlamaError::Config {
                path: self.path(),
                message: format!("head_dim {head_dim} must be even and positive"),
            });
        }
        let (rope_theta, rope_scaling) = self.rope()?;
        // Zero layers load and write blank text: refused here, where the file is known.
        for field in ["num_hidden_layers", "vocab_size", "intermediate_size"] {
            if self.usize_req(field)? == 0 {
                return Err(LlamaError::Config {
                    path: self.path(),
                    message: format!("{field} is 0"),
                });
            }
        }
        let cfg = LlamaConfig {
            vocab_size: self.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: self.usize_req("intermediate_size")?,
            num_hidden_layers: self.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: self.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: self.ids("bos_token_id")?.first().copied(),
            eos_token_ids: self.ids("eos_token_id")?,
            pad_token_id: self.ids("pad_token_id")?.first().copied(),
        };
        Ok(cfg)
    }

    /// `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let params = self.present("rope_parameters");
        let scaling = self.present("rope_scaling");
        let theta = match params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            Some(t) => t,
            None => self.f64_opt("rope_theta")?.unwrap_or(10000.0),
        };
        let Some(spec) = params.or(scaling) else {
            return Ok((theta, RopeScaling::None));
        };
        let field = if params.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let spec = spec
            .as_object()
            .ok_or_else(|| self.bad(field, "an object"))?;
        let kind = spec
            .get("rope_type")
            .or_else(|| spec.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            spec.get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| LlamaError::MissingField {
                    path: self.path(),
                    field: format!("{field}.{key}"),
                })
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => {
                let s = RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?
                        as usize,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } = s
                {
                    if high_freq_factor <= low_freq_factor {
                        return Err(LlamaError::Config {
                            path: self.path(),
                            message: format!(
                                "{field}: high_freq_factor must exceed low_freq_factor"
                            ),
                        });
                    }
                }
                s
            }
            other => {
                return Err(LlamaError::Config {
                    path: self.path(),
                    message: format!(
                        "{field}: rope_type `{other}` is not supported (default, linear, llama3)"
                    ),
                })
            }
        };
        Ok((theta, scaling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_json_str(text, Path::new("config.json"))
    }

    const LLAMA31_8B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
      "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
      "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256
    }"#;

    #[test]
    fn reads_llama31_8b() {
        let c = parse(LLAMA31_8B).unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.n_rep(), 4);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.bos_token_id, Some(128000));
        assert!(!c.tie_word_embeddings);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let c = parse(LLAMA31_8B).unwrap();
        let plain: Vec<f64> = (0..64)
            .map(|i| 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0))
            .collect();
        let scaled = c.inv_freq();
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f64::consts::PI / p;
            let ratio = *s as f64 / p;
            if wavelen < 2048.0 {
                assert!(
                    (ratio - 1.0).abs() < 1e-6,
                    "wavelen {wavelen}: ratio {ratio}"
                );
            } else if wavelen > 8192.0 {
                assert!(
                    (ratio - 0.125).abs() < 1e-6,
                    "wavelen {wavelen}: ratio {ratio}"
                );
            } else {
                assert!(
                    ratio > 0.125 && ratio < 1.0,
                    "wavelen {wavelen}: ratio {ratio}"
                );
            }
        }
    }

    #[test]
    fn transformers5_rope_parameters_equal_the_classic_form() {
        let v5 = r#"{"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
          "rms_norm_eps": 1e-05, "max_position_embeddings": 131072, "bos_token_id": 128000,
          "eos_token_id": [128001, 128008, 128009], "model_type": "llama",
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}"#;
        assert_eq!(parse(v5).unwrap(), parse(LLAMA31_8B).unwrap());
    }

    #[test]
    fn eos_as_int_and_defaults() {
        let c = parse(
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 100, "eos_token_id": 7}"#,
        )
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![7]);
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn missing_hidden_size_is_named() {
        let text = LLAMA31_8B.replace("\"hidden_size\": 4096,", "");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("`hidden_size`"),
            "{err}"
        );
    }

    #[test]
    fn incomplete_llama3_scaling_names_the_key() {
        let text = LLAMA31_8B.replace("\"low_freq_factor\": 1.0,", "");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("rope_scaling.low_freq_factor"), "{err}");
    }

    #[test]
    fn wrong_types_and_unsupported_values_are_clear() {
        let err = parse(&LLAMA31_8B.replace("\"hidden_size\": 4096", "\"hidden_size\": \"big\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hidden_size") && err.contains("integer"),
            "{err}"
        );
        let err =
            parse(&LLAMA31_8B.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let err = parse(&LLAMA31_8B.replace("\"llama3\"", "\"yarn\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("yarn"), "{err}");
        let err = parse(&LLAMA31_8B.replace("\"mlp_bias\": false", "\"mlp_bias\": true"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mlp_bias"), "{err}");
    }
}
