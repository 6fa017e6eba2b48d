//! A model with a LoRA adapter merged in, written as one GGUF file that llama.cpp and Ollama
//! load: the base GGUF's metadata (architecture, rope, tokenizer, chat template) kept as it
//! is, every tensor in the base's order, each adapted projection plus `scale * B @ A` with q
//! and k rows permuted as the base stores them, then cast to the chosen type.
//!
//! The base must be a GGUF (its tokenizer metadata is carried over; writing a Hugging Face
//! tokenizer as GGUF metadata is llama.cpp's `convert_hf_to_gguf.py`'s job). All tensors are
//! held until the file is written: fine for the models this machine trains, not for 70B.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};

use crate::error::{LlamaError, Result};
use crate::load::weights::{permute, GgufWeights};
use crate::lora::adapter::LoraAdapter;
use crate::lora::config::LoraTarget;
use crate::lora::gguf::gguf_projection;

/// The element type of a merged model's matrices (vectors, e.g. norms, stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelGgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

impl ModelGgufType {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::Bf16),
            "q8_0" => Some(Self::Q8_0),
            "q4_0" => Some(Self::Q4_0),
            _ => None,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Bf16 => 32,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct GgufReport {
    pub tensors: usize,
    /// Projections the adapter changed.
    pub merged: usize,
    pub bytes: u64,
}

/// Writes `base` (a GGUF) with `adapter` merged in to `out`, a new GGUF file (through a
/// temporary file and a rename). `progress(done, total)` counts tensors.
pub fn export_merged_gguf(
    base: &Path,
    adapter: Option<&LoraAdapter>,
    out: &Path,
    ty: ModelGgufType,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GgufReport> {
    let weights = GgufWeights::open(base)?;
    let config = weights.config()?;
    let content = &weights.content;
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .map(|(n, i)| (n, i.offset))
        .collect();
    names.sort_by_key(|&(_, offset)| offset);
    // Which GGUF tensor each adapted projection is.
    let mut deltas = std::collections::HashMap::new();
    if let Some(a) = adapter {
        for layer in 0..config.num_hidden_layers {
            for target in LoraTarget::ALL {
                if a.pair(layer, target).is_some() {
                    deltas.insert(gguf_projection(layer, target), (layer, target));
                }
            }
        }
        if let Some(missing) = deltas
            .keys()
            .find(|n| !content.tensor_infos.contains_key(*n))
        {
            return Err(LlamaError::Gguf {
                path: base.to_path_buf(),
                message: format!("tensor `{missing}`, which the adapter changes, is missing"),
            });
        }
    }
    let total = names.len() as u64;
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut merged = 0;
    for (i, (name, _)) in names.iter().enumerate() {
        let mut t = weights.raw(name)?;
        if let Some(&(layer, target)) = deltas.get(*name) {
            let adapter = adapter.expect("deltas come from the adapter");
            let mut delta = adapter
                .delta(layer, target)?
                .expect("the pair exists")
                .to_dtype(DType::F32)?;
            // The base stores q and k with each head's rotary halves interleaved.
            match target {
                LoraTarget::Q => delta = permute(&delta, config.num_attention_heads)?,
                LoraTarget::K => delta = permute(&delta, config.num_key_value_heads)?,
                _ => {}
            }
            t = (t + delta)?;
            merged += 1;
        }
        // Vectors (norms) stay f32, as llama.cpp keeps them; a matrix whose rows do not split
        // into the type's blocks falls back to f16.
        let ggml = if t.rank() < 2 {
            GgmlDType::F32
        } else if t.dim(t.rank() - 1)? % ty.ggml().block_size() != 0 {
            GgmlDType::F16
        } else {
            ty.ggml()
        };
        tensors.push((
            (*name).clone(),
            QTensor::quantize(&t.to_device(&Device::Cpu)?, ggml)?,
        ));
        progress(i as u64 + 1, total);
    }
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in metadata.iter_mut() {
        if k == "general.file_type" {
            *v = Value::U32(ty.file_type());
        }
    }
    if !metadata.iter().any(|(k, _)| k == "general.file_type") {
        metadata.push(("general.file_type".into(), Value::U32(ty.file_type())));
    }
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    teamtune_formats::write_atomic_with(out, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        gguf_file::write(&mut f, &meta, &refs).map_err(std::io::Error::other)?;
        f.sync_all()
    })
    .map_err(|e| LlamaError::Weights {
        path: out.to_path_buf(),
        message: format!("cannot write the merged GGUF: {e}"),
    })?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(GgufReport {
        tensors: tensors.len(),
        merged,
        bytes,
    })
}
