//! Flags every model-running command shares, and turning them into a loaded model.

use anyhow::{bail, Context};
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
    /// How the keys and values of earlier tokens are stored: f16 (half the memory, each value
    /// rounded once as stored, llama.cpp's default), f32 (as computed), or auto: f16 on the CPU
    /// where the weights run quantised or as bf16 products (--quantize, or the bf16 that eval,
    /// collect, serve and the demo choose on AVX512-BF16 CPUs), f32 otherwise (--dtype f32 stays
    /// the reference path). Training keeps no cache.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f16", "f32"])]
    pub kv_cache: String,
}

/// The arithmetic an inference command runs, as its records give it.
#[derive(Debug, Clone, PartialEq)]
pub struct InferencePath {
    /// `--quantize` as chosen (given, or auto's bf16); none for dense weights.
    pub quantize: Option<String>,
    /// The KV cache's storage: "f16", or the model's dtype ("f32", "bf16", "f16").
    pub kv_cache: String,
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

    /// Whether the model stores its KV cache as f16: `--kv-cache` as given (refused off the
    /// CPU or for a model that does not compute in f32); auto means f16 on the CPU for an f32
    /// model whose weights run quantised or as bf16 products (`quantize`: the path
    /// [`Self::inference_quantize`] chose), which already leave the f32 reference.
    pub fn inference_kv_f16(&self, quantize: Option<&str>) -> anyhow::Result<bool> {
        let device = parse_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype, &device)?;
        let f32_on_cpu = device.is_cpu() && dtype == candle_core::DType::F32;
        match self.kv_cache.as_str() {
            "f16" if !device.is_cpu() => bail!(
                "--kv-cache f16 is the CPU's path; on --device {} use --dtype f16 or bf16, which \
                 keeps the cache in 16 bits too",
                self.device
            ),
            "f16" if !f32_on_cpu => bail!(
                "--kv-cache f16 needs a model that computes in f32; --dtype {} keeps the cache in \
                 the model's own type",
                self.dtype
            ),
            "f16" => Ok(true),
            "f32" => Ok(false),
            _ => Ok(f32_on_cpu && quantize.is_some()),
        }
    }

    /// [`Self::load`] on the weight path of [`Self::inference_quantize`] for this CPU, and that
    /// path with its KV cache (for the run's records); says so when bf16 was chosen for the
    /// user.
    pub fn load_for_inference(&self) -> anyhow::Result<(LoadedModel, InferencePath)> {
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
        let kv_cache = match loaded.model.kv_cache_storage() {
            Some(d) => d.as_str().to_owned(),
            None => loaded.model.dtype().as_str().to_owned(),
        };
        Ok((loaded, InferencePath { quantize, kv_cache }))
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
        let kv_f16 = self.inference_kv_f16(self.quantize.as_deref())?;
        let mut loaded = LoadedModel::load_quantized(&self.model, dtype, &device, quantize)
            .with_context(|| format!("loading model {name}"))?;
        if kv_f16 {
            if self.kv_cache == "auto" {
                tracing::info!(
                    "keys and values of earlier tokens are kept as f16, half the memory \
                     (--kv-cache f32 keeps them as computed)"
                );
            }
            loaded
                .model
                .set_kv_cache_storage(Some(candle_core::DType::F16))
                .context("--kv-cache f16")?;
        }
        Ok(loaded)
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
            kv_cache: "auto".into(),
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

    /// auto stores the cache as f16 only for f32 models on the CPU's quantised or bf16-product
    /// paths (a GPU cannot be tried without a CUDA build: a device that does not parse is an
    /// error); the flag overrides it where the model can take it.
    #[test]
    fn the_kv_cache_is_f16_by_default_only_off_the_f32_reference_path() {
        let f16 = |a: &ModelArgs, q: Option<&str>| a.inference_kv_f16(q).unwrap();
        assert!(f16(&args("auto", "cpu", None), Some("bf16")));
        assert!(f16(&args("auto", "cpu", Some("q4_0")), Some("q4_0")));
        assert!(!f16(&args("f32", "cpu", None), None));
        assert!(args("auto", "tpu", None)
            .inference_kv_f16(Some("bf16"))
            .is_err());
        assert!(!f16(&args("bf16", "cpu", None), Some("q8_0")));
        let mut a = args("f32", "cpu", None);
        a.kv_cache = "f16".into();
        assert!(f16(&a, None));
        a.kv_cache = "f32".into();
        assert!(!f16(&a, Some("bf16")));
        // An explicit f16 the model cannot take is refused before anything loads, naming the
        // flags.
        let mut a = args("bf16", "cpu", None);
        a.kv_cache = "f16".into();
        let err = a.inference_kv_f16(None).unwrap_err().to_string();
        assert!(
            err.contains("--kv-cache f16") && err.contains("--dtype bf16"),
            "{err}"
        );
    }
}
