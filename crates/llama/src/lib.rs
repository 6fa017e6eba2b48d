//! LLaMA-3.x for teamtune: config, weights from HF folders, the hub or GGUF files, a forward
//! pass with KV cache and padded or packed batches that is differentiable end to end in
//! training mode, the tokenizer and chat template that belong to the model, and sampling.

pub mod assets;
pub mod bf16_matmul;
pub mod cache;
pub mod config;
mod decode_attention;
pub mod device;
pub mod dropout;
pub mod error;
pub mod export;
pub mod generate;
mod gguf;
mod hub;
pub mod layout;
pub mod lora;
pub mod model;
pub mod ops;
pub mod sampling;
pub mod session;
mod skinny;
pub mod source;
pub mod stream;
pub mod weights;

pub use assets::{load_chat_assets, ChatAssets};
pub use cache::KvCache;
pub use config::{LlamaConfig, RopeScaling};
pub use device::{parse_device, parse_dtype, parse_quantization};
pub use dropout::mix_seed;
pub use error::{LlamaError, Result};
pub use export::{export_merged, parse_size, ExportOptions, ExportReport};
pub use generate::{generate, Generated, StopReason};
pub use layout::TokenLayout;
pub use lora::{LoraAdapter, LoraConfig, LoraPair, LoraTarget};
pub use model::{LayerContext, Linear, Llama, Mode, RaggedRow};
pub use sampling::{Sampler, SamplingParams};
pub use session::{decode_batch, Decoded, NoFilter, Session, TokenFilter};
pub use source::{default_model_path, teamtune_home, ModelFiles};
pub use stream::TextStream;
pub use weights::{GgufWeights, WeightSource};

use candle_core::{DType, Device};

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
