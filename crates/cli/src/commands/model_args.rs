//! Flags every model-running command shares, and turning them into a loaded model.

use anyhow::Context;
use teamtune_data::ChatTemplate;
use teamtune_llama::{parse_device, parse_dtype, parse_quantization, ChatAssets, LoadedModel};

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A HF folder, a .gguf file, or a hub id (meta-llama/Llama-3.1-8B-Instruct). Default:
    /// SmolLM2-135M-Instruct from $TEAMTUNE_HOME (scripts/fetch-default-model.sh).
    #[arg(long, default_value = "")]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// auto (bf16 on GPU, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Keep the weights quantised for inference: q8_0 or q4_0 (several times faster decoding
    /// on a CPU), gguf (a GGUF file's own Q8_0, Q4_0, Q4_1 and Q4_K blocks as stored: the
    /// default model decodes with its file's weights), or bf16 (CPUs with AVX512-BF16: bf16
    /// products with f32 sums for prefill and decode alike, the precision of bf16 GPU
    /// inference); logits slightly off the dense model's.
    #[arg(long)]
    pub quantize: Option<String>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let device = parse_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype, &device)?;
        let name = if self.model.is_empty() {
            "(default)"
        } else {
            &self.model
        };
        // A bad --quantize is refused before the weights are read.
        let quantize = self
            .quantize
            .as_deref()
            .map(parse_quantization)
            .transpose()?;
        LoadedModel::load_quantized(&self.model, dtype, &device, quantize)
            .with_context(|| format!("loading model {name}"))
    }
}

/// The model's own chat template, or a built-in one chosen from its special tokens.
pub fn chat_template(assets: &ChatAssets) -> anyhow::Result<ChatTemplate> {
    teamtune_guide::model_template(assets).context("choosing a chat template (or use --raw)")
}
