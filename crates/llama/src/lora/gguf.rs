//! LoRA adapters in llama.cpp's GGUF form, as its `convert_lora_to_gguf.py` writes them:
//! `general.type = "adapter"`, `general.architecture = "llama"`, `adapter.type = "lora"`,
//! `adapter.lora.alpha`, and per adapted projection `blk.{i}.{attn_q|...}.weight.lora_a`
//! (`[r, in]`) and `.lora_b` (`[out, r]`).
//!
//! llama.cpp's GGUF stores the q and k projections with the two rotary halves of every head
//! interleaved (`convert_hf_to_gguf.py`'s `permute`), so a LoRA `B` of q (of k) must have its
//! rows permuted the same way (by heads, by KV heads), and un-permuted when read back: without
//! it the adapter loads and is silently wrong. llama.cpp scales by `alpha / r`; an rsLoRA
//! adapter (`alpha / sqrt(r)`) is written with the alpha that gives its scale.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};

use super::adapter::{LoraAdapter, LoraPair};
use super::config::{LoraConfig, LoraTarget};
use crate::error::{LlamaError, Result};
use crate::export::gguf_write::{write_gguf, GgufType};
use crate::load::config::LlamaConfig;
use crate::load::weights::{permute, unpermute};

/// llama.cpp's name of a projection in block `layer`.
pub fn gguf_projection(layer: usize, target: LoraTarget) -> String {
    let module = match target {
        LoraTarget::Q => "attn_q",
        LoraTarget::K => "attn_k",
        LoraTarget::V => "attn_v",
        LoraTarget::O => "attn_output",
        LoraTarget::Gate => "ffn_gate",
        LoraTarget::Up => "ffn_up",
        LoraTarget::Down => "ffn_down",
    };
    format!("blk.{layer}.{module}.weight")
}

/// The heads `B`'s rows are permuted by, for q and k.
fn rotary_heads(target: LoraTarget, model: &LlamaConfig) -> Option<usize> {
    match target {
        LoraTarget::Q => Some(model.num_attention_heads),
        LoraTarget::K => Some(model.num_key_value_heads),
        _ => None,
    }
}

impl LoraAdapter {
    /// Reads an adapter in either form: a llama.cpp LoRA GGUF (a `.gguf` file) or a PEFT folder.
    pub fn open(model: &LlamaConfig, path: &Path, device: &Device) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            Self::load_gguf(model, path, device)
        } else {
            Self::load(model, path, device)
        }
    }

    /// Writes the adapter as a llama.cpp LoRA GGUF for a base model with `model` (through a
    /// temporary file and a rename).
    pub fn save_gguf(&self, model: &LlamaConfig, path: &Path, ty: GgufType) -> Result<()> {
        let c = &self.config;
        // llama.cpp applies alpha / r.
        let alpha = (c.scale() * c.rank as f64) as f32;
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for (layer, pairs) in self.layers.iter().enumerate() {
            for (&target, pair) in pairs {
                let name = gguf_projection(layer, target);
                let a = pair.a.as_tensor().to_dtype(DType::F32)?.contiguous()?;
                let mut b = pair.b.as_tensor().to_dtype(DType::F32)?.contiguous()?;
                if let Some(heads) = rotary_heads(target, model) {
                    b = permute(&b, heads)?;
                }
                for (suffix, t) in [("lora_a", a), ("lora_b", b)] {
                    tensors.push((format!("{name}.{suffix}"), ty.quantize(&t)?));
                }
            }
        }
        let name = c
            .base_model_name_or_path
            .clone()
            .unwrap_or_else(|| "teamtune LoRA adapter".into());
        let metadata: Vec<(String, Value)> = vec![
            ("general.type".into(), Value::String("adapter".into())),
            ("general.architecture".into(), Value::String("llama".into())),
            ("general.name".into(), Value::String(name)),
            ("adapter.type".into(), Value::String("lora".into())),
            ("adapter.lora.alpha".into(), Value::F32(alpha)),
        ];
        write_gguf(path, &metadata, &tensors, "the GGUF adapter")?;
        Ok(())
    }

    /// Reads a llama.cpp LoRA GGUF for a base model with `model`: the adapted projections are
    /// those with tensors, the rank is A's, the scale llama.cpp's `alpha / r`.
    pub fn load_gguf(model: &LlamaConfig, path: &Path, device: &Device) -> Result<Self> {
        let err = |message: String| LlamaError::Gguf {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|e| LlamaError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| err(format!("not a readable GGUF file: {e}")))?;
        let meta_str = |key: &str| -> Option<String> {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_string().ok().cloned())
        };
        match meta_str("general.type").as_deref() {
            Some("adapter") => {}
            other => {
                return Err(err(format!(
                    "general.type is {}, not \"adapter\": a model file, not a LoRA adapter",
                    other.map_or("missing".into(), |t| format!("\"{t}\""))
                )))
            }
        }
        match meta_str("general.architecture").as_deref() {
            Some("llama") => {}
            other => {
                return Err(err(format!(
                    "the adapter is for architecture {}, this model is llama",
                    other.unwrap_or("(missing)")
                )))
            }
        }
        if meta_str("adapter.type").as_deref() != Some("lora") {
            return Err(err("adapter.type is not \"lora\"".into()));
        }
        let alpha = content
            .metadata
            .get("adapter.lora.alpha")
            .and_then(|v| v.to_f32().ok())
            .ok_or_else(|| err("metadata `adapter.lora.alpha` (f32) is missing".into()))?;
        let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut take = |name: &str, shape: [usize; 2]| -> Result<Tensor> {
            names.retain(|n| n != name);
            let q = content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| err(format!("tensor `{name}` is missing or unreadable: {e}")))?;
            let t = q.dequantize(&Device::Cpu)?;
            if !super::peft::all_finite(&t)? {
                return Err(err(format!(
                    "tensor `{name}` holds values that are not finite (NaN or infinity)"
                )));
            }
            if t.dims() != shape {
                return Err(err(format!(
                    "tensor `{name}` has shape {:?}, the base model implies {:?} (adapter made for another base model?)",
                    t.dims(),
                    shape
                )));
            }
            Ok(t)
        };
        // The rank and targets from the first block's tensors.
        let targets: Vec<LoraTarget> = LoraTarget::ALL
            .into_iter()
            .filter(|&t| {
                content
                    .tensor_infos
                    .contains_key(&format!("{}.lora_a", gguf_projection(0, t)))
            })
            .collect();
        let first = targets.first().ok_or_else(|| {
            err("no `blk.0.*.lora_a` tensor: not a LoRA adapter of a llama model".into())
        })?;
        let first_a = format!("{}.lora_a", gguf_projection(0, *first));
        let info = &content.tensor_infos[&first_a];
        // GGUF dims are innermost first: lora_a is [in, r] there.
        let rank = *info.shape.dims().first().unwrap_or(&0);
        if rank == 0 {
            return Err(err(format!("tensor `{first_a}` has no rank")));
        }
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for layer in 0..model.num_hidden_layers {
            let mut map = std::collections::BTreeMap::new();
            for &t in &targets {
                let (out, inp) = t.shape(model);
                let name = gguf_projection(layer, t);
                let a = take(&format!("{name}.lora_a"), [rank, inp])?;
                let mut b = take(&format!("{name}.lora_b"), [out, rank])?;
                if let Some(heads) = rotary_heads(t, model) {
                    b = unpermute(&b, heads)?;
                }
                map.insert(
                    t,
                    LoraPair {
                        a: Var::from_tensor(&a.to_device(device)?)?,
                        b: Var::from_tensor(&b.to_device(device)?)?,
                    },
                );
            }
            layers.push(map);
        }
        if let Some(extra) = names.first() {
            return Err(err(format!(
                "tensor `{extra}` does not belong to any adapted projection of the base model ({} layers; adapter made for another base model?)",
                model.num_hidden_layers
            )));
        }
        let config = LoraConfig {
            rank,
            alpha: alpha as f64,
            dropout: 0.0,
            use_rslora: false,
            targets,
            base_model_name_or_path: None,
            ..LoraConfig::default()
        };
        Ok(LoraAdapter { config, layers })
    }
}
