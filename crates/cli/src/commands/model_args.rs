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
    /// auto (bf16 on GPU, f32 on CPU), f32, bf16 or f16. For eval, collect, serve and the
    /// demo, auto on a CPU with AVX512-BF16 also means --quantize bf16 (bf16 products with
    /// f32 sums: the same scores at 10 episodes per task, in less time); f32 keeps the f32
    /// path there.
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
    /// The weight path of an inference command (eval, collect, serve, the demo's evaluations):
    /// `--quantize` as given; without it, `bf16` when `--dtype` is auto on a CPU with AVX512-BF16
    /// (`cpu_has_bf16`); otherwise none (the dtype's dense weights).
    pub fn inference_quantize(&self, cpu_has_bf16: bool) -> anyhow::Result<Option<String>> {
        if self.quantize.is_some() {
            return Ok(self.quantize.clone());
        }
        let device = parse_device(&self.device)?;
        Ok((self.dtype == "auto" && device.is_cpu() && cpu_has_bf16).then(|| "bf16".to_owned()))
    }

    /// [`Self::load`] on the weight path of [`Self::inference_quantize`] for this CPU, and that
    /// path (for the run's records); says so when bf16 was chosen for the user.
    pub fn load_for_inference(&self) -> anyhow::Result<(LoadedModel, Option<String>)> {
        let quantize = self.inference_quantize(teamtune_llama::cpu_has_bf16_dot_products())?;
        if self.quantize.is_none() && quantize.is_some() {
            tracing::info!(
                "this CPU has bf16 dot products (AVX512-BF16): the weights run as bf16 products \
                 with f32 sums (--dtype f32 keeps the f32 path)"
            );
        }
        let loaded = ModelArgs {
            quantize: quantize.clone(),
            ..self.clone()
        }
        .load()?;
        Ok((loaded, quantize))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dtype: &str, device: &str, quantize: Option<&str>) -> ModelArgs {
        ModelArgs {
            model: String::new(),
            device: device.into(),
            dtype: dtype.into(),
            quantize: quantize.map(str::to_owned),
        }
    }

    /// bf16 products by default only where the CPU has them, with --dtype auto, on the CPU and
    /// without a --quantize of the user's; --dtype f32 keeps the f32 path.
    #[test]
    fn inference_runs_bf16_products_by_default_only_on_cpus_that_have_them() {
        let q = |a: ModelArgs, has: bool| a.inference_quantize(has).unwrap();
        assert_eq!(q(args("auto", "cpu", None), true).as_deref(), Some("bf16"));
        assert_eq!(q(args("auto", "cpu", None), false), None);
        assert_eq!(q(args("f32", "cpu", None), true), None);
        assert_eq!(
            q(args("auto", "cpu", Some("q8_0")), true).as_deref(),
            Some("q8_0")
        );
        assert_eq!(
            q(args("auto", "cpu", Some("gguf")), false).as_deref(),
            Some("gguf")
        );
        assert!(args("auto", "tpu", None).inference_quantize(true).is_err());
    }
}
