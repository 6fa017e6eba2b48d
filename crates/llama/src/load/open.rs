//! A model opened from its files: config and weights, and with [`LoadedModel`] the chat
//! assets beside them.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use super::assets::ChatAssets;
use super::config::LlamaConfig;
use super::gguf_blocks::Stored;
use super::source::ModelFiles;
use super::weights::{ggml_type_name, GgufWeights, WeightSource};
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
    let WeightSource::Gguf(g) = weights else {
        return Llama::load(config, weights, dtype, device);
    };
    let types = g.quantised_types();
    if quantize != Some(Quantization::GgufAsStored) {
        if !types.is_empty() {
            // Said, not silent: the memory and the decoding speed differ from the file's.
            tracing::info!(
                "the file's {} weights are dequantised to {} as they load (--quantize gguf \
                 keeps them as stored)",
                types.join(" and "),
                format!("{dtype:?}").to_lowercase()
            );
        }
        return Llama::load(config, weights, dtype, device);
    }
    if !device.is_cpu() {
        return Err(LlamaError::Config {
            path: "--quantize".into(),
            message: "gguf keeps a file's blocks for the CPU's kernels; on a GPU use --dtype \
                      bf16"
                .into(),
        });
    }
    let mut no_kernel = std::collections::BTreeSet::new();
    let mut widened = 0;
    let model = Llama::load_stored(config, weights, dtype, &mut |name| {
        Ok(match g.stored(name)? {
            Stored::Rows(rows) => Some(rows),
            Stored::NoKernel(t) => {
                if !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    no_kernel.insert(ggml_type_name(t));
                    widened += 1;
                }
                None
            }
        })
    })?;
    if widened > 0 {
        tracing::info!(
            "{widened} of the file's tensors are {} (no kernel here): they are dequantised to {}",
            no_kernel.into_iter().collect::<Vec<_>>().join(" and "),
            format!("{dtype:?}").to_lowercase()
        );
    }
    if !types.is_empty() {
        tracing::info!(
            "the file's {} weights are kept as stored (--quantize gguf)",
            types.join(" and ")
        );
    }
    Ok(model)
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

    /// [`Self::load`] with the inference path on `quantize`'s weights (as [`Self::quantize`]
    /// puts it), checked against the files before any weight is read. A GGUF's blocks kept
    /// as stored are read as such, never as a dense copy first.
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
        let mut model = read_weights(&files, &config, &weights, dtype, device, quantize)?;
        if let Some(Quantization::Requantize(q)) = quantize {
            model.quantize_for_inference(q)?;
        }
        Ok(LoadedModel {
            model,
            assets,
            files,
        })
    }

    /// Puts the inference path on quantised weights (`--quantize`). `GgufAsStored` reads the
    /// GGUF file's weights again, as stored: Q8_0, Q4_0, Q4_1 and Q4_K blocks are all the
    /// model keeps of them (a prompt widens a tile of rows at a time for gemm); a tensor of
    /// another type is dequantised, said in one line. [`Self::load_quantized`] reads them so
    /// in the first place.
    pub fn quantize(&mut self, q: Quantization) -> Result<()> {
        if let Quantization::Requantize(dtype) = q {
            return self.model.quantize_for_inference(dtype);
        }
        only_gguf(&self.files)?;
        let (config, weights) = open(&self.files)?;
        let (dtype, device) = (self.model.dtype(), self.model.device().clone());
        self.model = read_weights(&self.files, &config, &weights, dtype, &device, Some(q))?;
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
