//! A model opened from its files: config and weights, and with [`LoadedModel`] the chat
//! assets beside them.

use candle_core::{DType, Device};

use super::assets::ChatAssets;
use super::config::LlamaConfig;
use super::source::ModelFiles;
use super::weights::{GgufWeights, WeightSource};
use crate::error::Result;
use crate::model::llama::Llama;

/// A model ready to run: weights, config and its chat assets.
pub struct LoadedModel {
    pub model: Llama,
    pub assets: ChatAssets,
    pub files: ModelFiles,
}

/// Reads the config of `files`.
pub fn load_config(files: &ModelFiles) -> Result<LlamaConfig> {
    match files {
        ModelFiles::HfFolder { dir, .. } => LlamaConfig::from_file(&dir.join("config.json")),
        ModelFiles::Gguf { path } => GgufWeights::open(path)?.config(),
    }
}

/// The config and the opened (not yet read) weights of `files`.
fn open(files: &ModelFiles) -> Result<(LlamaConfig, WeightSource)> {
    Ok(match files {
        ModelFiles::HfFolder { dir, weights } => (
            LlamaConfig::from_file(&dir.join("config.json"))?,
            WeightSource::safetensors(weights.clone())?,
        ),
        ModelFiles::Gguf { path } => {
            let g = GgufWeights::open(path)?;
            (g.config()?, WeightSource::Gguf(g))
        }
    })
}

fn read_weights(
    files: &ModelFiles,
    config: &LlamaConfig,
    weights: &WeightSource,
    dtype: DType,
    device: &Device,
) -> Result<Llama> {
    tracing::info!(model = %files.describe(), layers = config.num_hidden_layers, hidden = config.hidden_size, ?dtype, "loading model");
    if let WeightSource::Gguf(g) = weights {
        let types = g.quantised_types();
        if !types.is_empty() {
            // Said, not silent: the memory and the decoding speed differ from the file's.
            tracing::info!(
                "the file's {} weights are dequantised to {} as they load (--quantize q8_0 or \
                 q4_0 keeps decoding in 8 or 4 bits)",
                types.join(" and "),
                format!("{dtype:?}").to_lowercase()
            );
        }
    }
    Llama::load(config, weights, dtype, device)
}

/// Loads the weights of `files` as a model (no tokenizer needed).
pub fn load_model(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Llama> {
    let (config, weights) = open(files)?;
    read_weights(files, &config, &weights, dtype, device)
}

impl LoadedModel {
    /// Loads `spec` ("" = default model, folder, .gguf, hub id) in `dtype` on `device`, with
    /// its tokenizer and chat template; errors if the tokenizer does not fit the model. A
    /// GGUF file is opened once for all three.
    pub fn load(spec: &str, dtype: DType, device: &Device) -> Result<Self> {
        let files = ModelFiles::resolve(spec)?;
        let (config, weights) = open(&files)?;
        let assets = match &weights {
            WeightSource::Gguf(g) => ChatAssets::from_gguf(g, &config.eos_token_ids)?,
            WeightSource::Safetensors { .. } => ChatAssets::load(&files, &config.eos_token_ids)?,
        };
        assets.check_fits(config.vocab_size)?;
        let model = read_weights(&files, &config, &weights, dtype, device)?;
        Ok(LoadedModel {
            model,
            assets,
            files,
        })
    }
}
