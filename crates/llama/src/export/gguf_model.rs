//! A model with a LoRA adapter merged in, written as one GGUF file that llama.cpp and Ollama
//! load. From a GGUF base: its metadata (architecture, rope, tokenizer, chat template) kept as
//! it is, every tensor in the base's order, each adapted projection plus `scale * B @ A` with q
//! and k rows permuted as the base stores them, then cast to the chosen type.
//!
//! From a Hugging Face folder the metadata and tokenizer are written as `convert_hf_to_gguf.py`
//! writes them ([`super::gguf_from_hf`]). All tensors are held until the file is written: fine
//! for the models this machine trains, not for 70B.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};

use super::gguf_from_hf;
use super::gguf_write::{write_gguf, GgufType};
use crate::error::{LlamaError, Result};
use crate::load::assets::ChatAssets;
use crate::load::config::LlamaConfig;
use crate::load::source::ModelFiles;
use crate::load::weights::{permute, GgufWeights, WeightSource};
use crate::lora::adapter::LoraAdapter;
use crate::lora::config::LoraTarget;
use crate::lora::gguf::gguf_projection;

/// What was written.
#[derive(Debug, Clone)]
pub struct GgufReport {
    pub tensors: usize,
    /// Projections the adapter changed.
    pub merged: usize,
    pub bytes: u64,
}

/// Writes the model of `files` with `adapter` merged in to `out`, a new GGUF file (through a
/// temporary file and a rename). `progress(done, total)` counts tensors.
pub fn export_merged_gguf(
    files: &ModelFiles,
    adapter: Option<&LoraAdapter>,
    out: &Path,
    ty: GgufType,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GgufReport> {
    match files {
        ModelFiles::Gguf { path } => from_gguf(path, adapter, out, ty, progress),
        ModelFiles::HfFolder { dir, weights } => {
            from_hf(files, dir, weights, adapter, out, ty, progress)
        }
    }
}

/// The HF shape of a weight of `config`.
fn hf_shape(c: &LlamaConfig, hf: &str) -> Result<Vec<usize>> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (nq, nkv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    Ok(match hf.rsplit('.').nth(1).unwrap_or("") {
        "embed_tokens" | "lm_head" => vec![c.vocab_size, h],
        "input_layernorm" | "post_attention_layernorm" | "norm" => vec![h],
        "q_proj" => vec![nq, h],
        "k_proj" | "v_proj" => vec![nkv, h],
        "o_proj" => vec![h, nq],
        "gate_proj" | "up_proj" => vec![i, h],
        "down_proj" => vec![h, i],
        _ => return Err(LlamaError::Shape(format!("no shape for `{hf}`"))),
    })
}

/// The layer and projection of an HF weight name, if it is one.
fn projection(hf: &str) -> Option<(usize, LoraTarget)> {
    let (layer, path) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    Some((
        layer.parse().ok()?,
        LoraTarget::parse(path.strip_suffix(".weight")?)?,
    ))
}

/// A Hugging Face folder (config.json, safetensors, tokenizer.json) as convert_hf_to_gguf.py
/// writes it, with the adapter merged in.
fn from_hf(
    files: &ModelFiles,
    dir: &Path,
    weights: &[std::path::PathBuf],
    adapter: Option<&LoraAdapter>,
    out: &Path,
    ty: GgufType,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GgufReport> {
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    if !dir.join("tokenizer.json").exists() {
        return Err(LlamaError::NotFound(format!(
            "{}: a GGUF model carries its tokenizer, and this folder has none",
            dir.join("tokenizer.json").display()
        )));
    }
    let assets = ChatAssets::load(files, &config.eos_token_ids)?;
    assets.check_fits(config.vocab_size)?;
    let source = WeightSource::safetensors(weights.to_vec())?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let metadata = gguf_from_hf::metadata(&config, &assets, &name, ty.file_type())?;
    let names = gguf_from_hf::tensor_names(&config);
    let total = names.len() as u64;
    let mut tensors = Vec::with_capacity(names.len() + 1);
    if let Some(div) = gguf_from_hf::rope_freqs(&config) {
        let t = gguf_from_hf::rope_freqs_tensor(div)?;
        tensors.push((
            "rope_freqs.weight".to_string(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let mut merged = 0;
    for (k, (hf, gguf)) in names.iter().enumerate() {
        let mut t = source.get(hf, &hf_shape(&config, hf)?, DType::F32, &Device::Cpu)?;
        let proj = projection(hf);
        if let (Some(a), Some((layer, target))) = (adapter, proj) {
            if let Some(delta) = a.delta(layer, target)? {
                t = (t + delta.to_dtype(DType::F32)?)?;
                merged += 1;
            }
        }
        // llama.cpp stores q and k with each head's rotary halves interleaved.
        match proj.map(|(_, target)| target) {
            Some(LoraTarget::Q) => t = permute(&t, config.num_attention_heads)?,
            Some(LoraTarget::K) => t = permute(&t, config.num_key_value_heads)?,
            _ => {}
        }
        tensors.push((gguf.clone(), ty.quantize(&t)?));
        progress(k as u64 + 1, total);
    }
    let bytes = write_gguf(out, &metadata, &tensors, "the merged GGUF")?;
    Ok(GgufReport {
        tensors: tensors.len(),
        merged,
        bytes,
    })
}

fn from_gguf(
    base: &Path,
    adapter: Option<&LoraAdapter>,
    out: &Path,
    ty: GgufType,
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
        tensors.push(((*name).clone(), ty.quantize(&t)?));
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
    let bytes = write_gguf(out, &metadata, &tensors, "the merged GGUF")?;
    Ok(GgufReport {
        tensors: tensors.len(),
        merged,
        bytes,
    })
}
