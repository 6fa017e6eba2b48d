//! A model opened from its files: config and weights, and with [`LoadedModel`] the chat
//! assets beside them.

use candle_core::{DType, Device};

use super::assets::ChatAssets;
use super::config::LlamaConfig;
use super::gguf_blocks::Stored;
use super::source::ModelFiles;
use super::weights::{GgufWeights, WeightSource};
use crate::device::Quantization;
use crate::error::{LlamaError, Result};
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
    quantize: Option<Quantization>,
) -> Result<Llama> {
    tracing::info!(model = %files.describe(), layers = config.num_hidden_layers, hidden = config.hidden_size, ?dtype, "loading model");
    if let WeightSource::Gguf(g) = weights {
        let types = g.quantised_types();
        if !types.is_empty() && quantize == Some(Quantization::GgufAsStored) {
            tracing::info!(
                "the file's {} weights are kept as stored for decoding, and dequantised to {} \
                 for prompts",
                types.join(" and "),
                format!("{dtype:?}").to_lowercase()
            );
        } else if !types.is_empty() {
            // Said, not silent: the memory and the decoding speed differ from the file's.
            tracing::info!(
                "the file's {} weights are dequantised to {} as they load (--quantize gguf \
                 decodes with them as stored)",
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
    read_weights(files, &config, &weights, dtype, device, None)
}

impl LoadedModel {
    /// Loads `spec` ("" = default model, folder, .gguf, hub id) in `dtype` on `device`, with
    /// its tokenizer and chat template; errors if the tokenizer does not fit the model. A
    /// GGUF file is opened once for all three.
    pub fn load(spec: &str, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(spec, dtype, device, None)
    }

    /// [`Self::load`], then [`Self::quantize`] with `quantize`, which is checked against the
    /// files before any weight is read.
    pub fn load_quantized(
        spec: &str,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let files = ModelFiles::resolve(spec)?;
        if quantize == Some(Quantization::GgufAsStored) {
            only_gguf(&files)?;
        }
        let (config, weights) = open(&files)?;
        let assets = match &weights {
            WeightSource::Gguf(g) => ChatAssets::from_gguf(g, &config.eos_token_ids)?,
            WeightSource::Safetensors { .. } => ChatAssets::load(&files, &config.eos_token_ids)?,
        };
        assets.check_fits(config.vocab_size)?;
        let model = read_weights(&files, &config, &weights, dtype, device, quantize)?;
        let mut loaded = LoadedModel {
            model,
            assets,
            files,
        };
        if let Some(q) = quantize {
            loaded.quantize(q)?;
        }
        Ok(loaded)
    }

    /// Puts the inference path on quantised weights (`--quantize`). `GgufAsStored` keeps a
    /// GGUF file's own Q8_0, Q4_0, Q4_1 and Q4_K blocks for the decode steps (the dense
    /// weights they dequantise to stay for prefills); a tensor of another type stays dense,
    /// said in one line.
    pub fn quantize(&mut self, q: Quantization) -> Result<()> {
        if let Quantization::Requantize(dtype) = q {
            return self.model.quantize_for_inference(dtype);
        }
        let file = GgufWeights::open(only_gguf(&self.files)?)?;
        let mut no_kernel = std::collections::BTreeSet::new();
        let dense = self.model.keep_stored_rows(|name| {
            Ok(match file.stored(name)? {
                Stored::Rows(rows) => Some(rows),
                Stored::NoKernel(t) => {
                    no_kernel.insert(format!("{t:?}"));
                    None
                }
            })
        })?;
        if !dense.is_empty() {
            tracing::info!(
                "{} of the file's projections are {} (no decode kernel here): they decode \
                 dequantised to {}",
                dense.len(),
                no_kernel.into_iter().collect::<Vec<_>>().join(" and "),
                format!("{:?}", self.model.dtype()).to_lowercase()
            );
        }
        Ok(())
    }
}

/// The GGUF file of `files`, or the error `--quantize gguf` gives for any other model.
fn only_gguf(files: &ModelFiles) -> Result<&std::path::Path> {
    match files {
        ModelFiles::Gguf { path } => Ok(path),
        other => Err(LlamaError::Config {
            path: "--quantize".into(),
            message: format!(
                "gguf keeps a GGUF file's own blocks, and {} is not a GGUF file (q8_0 or q4_0 \
                 quantise any model)",
                other.describe()
            ),
        }),
    }
}
