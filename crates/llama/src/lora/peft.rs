//! LoRA adapters on disk in PEFT's layout: `adapter_config.json` and
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` etc.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use super::adapter::{LoraAdapter, LoraPair};
use super::config::{LoraConfig, LoraTarget};
use crate::error::{LlamaError, Result};
use crate::load::config::LlamaConfig;

/// The file names of an adapter folder, as PEFT writes them.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// PEFT's name of a factor: `base_model.model.model.layers.{i}.{path}.lora_{A|B}.weight`.
pub fn peft_tensor_name(layer: usize, target: LoraTarget, factor: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{factor}.weight",
        target.layer_path()
    )
}

impl LoraAdapter {
    /// `adapter_config.json` as PEFT writes it for this adapter.
    pub fn peft_config_json(&self) -> Value {
        let c = &self.config;
        let targets: Vec<&str> = c.targets.iter().map(|t| t.module_name()).collect();
        // f32 -> f64 through the shortest decimal form: 0.05, not 0.05000000074505806.
        let dropout: f64 = c.dropout.to_string().parse().unwrap_or(c.dropout as f64);
        json!({
            "alpha_pattern": {},
            "base_model_name_or_path": c.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": c.alpha,
            "lora_dropout": dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": c.rank,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": c.use_rslora,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if
    /// needed), each through a temporary file and a rename so that a crash never leaves a
    /// half-written adapter.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| LlamaError::io(dir, e))?;
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().contiguous()?)))
            .collect::<Result<_>>()?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        teamtune_formats::write_atomic_with(&weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| LlamaError::Weights {
            path: weights.clone(),
            message: format!("cannot write adapter weights: {e}"),
        })?;
        let text = serde_json::to_string_pretty(&self.peft_config_json())
            .expect("a JSON value always serialises");
        write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    /// Reads a PEFT LoRA adapter folder for a model with `model_config`, checking that its
    /// type, target modules and every tensor's name and shape fit that model.
    pub fn load(model_config: &LlamaConfig, dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let config = read_peft_config(&config_path)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        if !weights_path.exists() {
            return Err(LlamaError::NotFound(weights_path.display().to_string()));
        }
        let mut tensors = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
            LlamaError::Weights {
                path: weights_path.clone(),
                message: format!("cannot read adapter weights (truncated or corrupt?): {e}"),
            }
        })?;
        let err = |message: String| LlamaError::Weights {
            path: weights_path.clone(),
            message,
        };
        let r = config.rank;
        let mut layers = Vec::with_capacity(model_config.num_hidden_layers);
        for l in 0..model_config.num_hidden_layers {
            let mut map = BTreeMap::new();
            for &t in &config.targets {
                let (out, inp) = t.shape(model_config);
                let mut take = |factor: char, shape: [usize; 2]| -> Result<Var> {
                    let name = peft_tensor_name(l, t, factor);
                    let tensor = tensors.remove(&name).ok_or_else(|| {
                        err(format!(
                            "tensor `{name}` is missing (adapter_config.json targets {})",
                            t.module_name()
                        ))
                    })?;
                    if tensor.dims() != shape {
                        return Err(err(format!(
                            "tensor `{name}` has shape {:?}, the base model and r = {r} imply {:?} \
                             (adapter made for another base model?)",
                            tensor.dims(),
                            shape
                        )));
                    }
                    let tensor = tensor.to_dtype(DType::F32)?;
                    if !all_finite(&tensor)? {
                        return Err(err(format!(
                            "tensor `{name}` holds values that are not finite (NaN or infinity)"
                        )));
                    }
                    Ok(Var::from_tensor(&tensor)?)
                };
                let a = take('A', [r, inp])?;
                let b = take('B', [out, r])?;
                map.insert(t, LoraPair { a, b });
            }
            layers.push(map);
        }
        if let Some(name) = tensors.keys().min() {
            return Err(err(format!(
                "tensor `{name}` does not belong to any targeted projection of the base model \
                 ({} layers, targets {:?}; adapter made for another base model?)",
                model_config.num_hidden_layers,
                config
                    .targets
                    .iter()
                    .map(|t| t.module_name())
                    .collect::<Vec<_>>()
            )));
        }
        Ok(LoraAdapter { config, layers })
    }
}

/// Whether every value is a finite number (an adapter with a NaN merges into a model that
/// writes nothing).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_finite()))
}

/// Parses and checks a PEFT `adapter_config.json`: LoRA only, features that change the
/// forward (DoRA, bias, per-layer ranks, ...) are refused with the field's name.
pub fn read_peft_config(path: &Path) -> Result<LoraConfig> {
    let text = crate::load::text_file::read_text_file(path)?;
    let bad = |message: String| LlamaError::Config {
        path: path.to_path_buf(),
        message,
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(format!(
            "peft_type is `{peft_type}`, only LORA adapters are supported"
        )));
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("`lora_alpha` must be a number".into()))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let flag = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
    let use_rslora = flag("use_rslora");
    for key in [
        "use_dora",
        "fan_in_fan_out",
        "lora_bias",
        "use_qalora",
        "use_bdlora",
    ] {
        if flag(key) {
            return Err(bad(format!("`{key}` is true, which is not supported")));
        }
    }
    if let Some(bias) = v.get("bias").and_then(Value::as_str) {
        if bias != "none" {
            return Err(bad(format!(
                "bias `{bias}` is not supported (only \"none\")"
            )));
        }
    }
    // Fields that, when set, make the adapter differ from plain LoRA on the listed modules.
    for key in [
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layer_replication",
        "modules_to_save",
        "exclude_modules",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
    ] {
        let set = match v.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(bad(format!("`{key}` is set, which is not supported")));
        }
    }
    let names: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad("`target_modules` must list strings".into()))
            })
            .collect::<Result<_>>()?,
        Some(Value::String(s)) if s == "all-linear" => LoraTarget::ALL
            .iter()
            .map(|t| t.module_name().to_owned())
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => return Err(bad("`target_modules` is missing".into())),
    };
    let mut targets = names
        .iter()
        .map(|n| {
            LoraTarget::parse(n).ok_or_else(|| {
                bad(format!(
                    "target module `{n}` is not one of q_proj, k_proj, v_proj, o_proj, \
                     gate_proj, up_proj, down_proj"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    targets.sort();
    targets.dedup();
    if targets.is_empty() {
        return Err(bad("`target_modules` is empty".into()));
    }
    let config = LoraConfig {
        rank,
        alpha,
        dropout,
        use_rslora,
        targets,
        base_model_name_or_path: v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_owned),
        seed: 0,
    };
    config.validate().map_err(bad)?;
    Ok(config)
}

/// Writes `bytes` to `path` atomically ([`teamtune_formats::write_atomic`]).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    teamtune_formats::write_atomic(path, bytes).map_err(|e| LlamaError::io(path, e))
}
