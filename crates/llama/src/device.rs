//! `--device` and `--dtype` as users write them, and how candle's CPU threads should wait.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use crate::error::{LlamaError, Result};

/// candle's elementwise ops run on its own barrier pool, whose idle workers spin for 25 000
/// pauses before parking; our kernels (projections, attention, SwiGLU) and the matmuls run on
/// rayon's pool over the same cores, so on a small machine those spinning workers take a core
/// from them between every pair of ops. Parking after a short spin costs a wake-up
/// (microseconds) per candle op instead: on 2 cores a bf16 evaluation ran 17% faster, an f32
/// one 3% (docs/BENCHMARKS.md).
const CANDLE_SPIN_LIMIT: &str = "100";

/// Up to this many cores, candle's elementwise ops run on the calling thread alone (no pool
/// worker): the two pools then never take turns on a core. On 2 cores this made a LoRA
/// training step 13% faster and an f32 prefill 11%, decode unchanged (docs/BENCHMARKS.md);
/// larger machines are unmeasured and keep candle's pool.
const SMALL_MACHINE_CORES: usize = 4;

/// Makes candle's CPU pool share the cores with rayon's: its idle workers park after a short
/// spin (`CANDLE_BARRIER_POOL_SPIN_LIMIT`), and on machines of at most
/// [`SMALL_MACHINE_CORES`] cores it has no worker besides the caller (`CANDLE_NUM_THREADS=1`);
/// a variable the user set is kept. Call it first in `main`, before anything starts a thread:
/// candle reads the variables when its pool first starts.
pub fn share_cores_with_candle() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() && cores <= SMALL_MACHINE_CORES {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs `work` on one of rayon's worker threads and waits for it there, asleep.
///
/// Our kernels split their work with rayon. Called from a thread outside rayon's pool (a
/// program's main thread, a server's model thread), every parallel section hands its pieces to
/// the pool's workers, and between sections those workers keep looking for work, yielding the
/// core in a loop, while the calling thread runs the ops in between: one more busy thread than
/// there are cores. On 2 cores the yields were a quarter of a decode step's time (the
/// scheduler, `sched_yield`). Run from inside the pool, the thread that runs the ops is one
/// of the workers, and the caller's thread sleeps until the result is ready.
pub fn on_compute_threads<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return work();
    }
    rayon::scope(|_| work())
}

/// `cpu`, `cuda` or `cuda:N`.
/// Whether this CPU has AVX512-BF16's dot products, which `--quantize bf16` and `train
/// --base-dtype bf16` are built on (without them a portable loop gives the same products,
/// many times slower than f32).
pub fn cpu_has_bf16_dot_products() -> bool {
    crate::kernels::bf16_matmul::PackedBf16::has_fast_kernel()
}

pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| LlamaError::Config {
                    path: "--device".into(),
                    message: format!("`{s}`: expected cuda:N"),
                })?,
                None => 0,
            };
            cuda_device(ordinal)
        }
        other => Err(LlamaError::Config {
            path: "--device".into(),
            message: format!("`{other}` is not a device (cpu, cuda, cuda:N)"),
        }),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(LlamaError::Config {
        path: "--device".into(),
        message: "this teamtune was built without CUDA; rebuild with `--features cuda`".into(),
    })
}

/// `f32`, `bf16` or `f16`; `auto` is bf16 on a GPU and f32 on the CPU (where bf16 is no faster).
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "auto" => Ok(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        }),
        other => Err(LlamaError::Config {
            path: "--dtype".into(),
            message: format!("`{other}` is not a dtype (auto, f32, bf16, f16)"),
        }),
    }
}

/// How the inference path keeps the weights (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// The dense weights rounded to Q8_0 or Q4_0 blocks, or packed in bf16.
    Requantize(GgmlDType),
    /// A GGUF file's own Q8_0, Q4_0, Q4_1 and Q4_K blocks, as stored (`gguf`).
    GgufAsStored,
}

/// `--quantize` for the inference path: `q8_0` (about 1 byte per weight) or `q4_0` (about
/// 0.56), the block-32 formats every Llama width divides; `bf16`; or `gguf`, a GGUF file's
/// own blocks.
pub fn parse_quantization(spec: &str) -> Result<Quantization> {
    match spec {
        "q8_0" => Ok(Quantization::Requantize(GgmlDType::Q8_0)),
        "q4_0" => Ok(Quantization::Requantize(GgmlDType::Q4_0)),
        "bf16" => Ok(Quantization::Requantize(GgmlDType::BF16)),
        "gguf" => Ok(Quantization::GgufAsStored),
        other => Err(LlamaError::Config {
            path: "--quantize".into(),
            message: format!("`{other}` is not supported (q8_0, q4_0, bf16, gguf)"),
        }),
    }
}

/// A KV cache's storage by name, for [`crate::Llama::set_kv_cache_storage`]: `f16`, or `f32`
/// (as the model computes; `None`). `what` names the setting in the error (a flag or a
/// variable).
pub fn parse_kv_cache(spec: &str, what: &str) -> Result<Option<DType>> {
    match spec {
        "f16" => Ok(Some(DType::F16)),
        "f32" => Ok(None),
        other => Err(LlamaError::Config {
            path: what.into(),
            message: format!("`{other}` is not a KV cache type (f16, f32)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kv_cache_types_and_names_the_setting_it_refuses() {
        assert_eq!(
            parse_kv_cache("f16", "--kv-cache").unwrap(),
            Some(DType::F16)
        );
        assert_eq!(parse_kv_cache("f32", "--kv-cache").unwrap(), None);
        let err = parse_kv_cache("q8_0", "TEAMTUNE_BENCH_KV")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TEAMTUNE_BENCH_KV") && err.contains("q8_0"),
            "{err}"
        );
    }

    #[test]
    fn parses_devices_and_dtypes() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu").unwrap_err().to_string().contains("tpu"));
        assert!(parse_device("cuda:x").is_err());
        assert_eq!(parse_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype("bf16", &Device::Cpu).unwrap(), DType::BF16);
        assert!(parse_dtype("f8", &Device::Cpu).is_err());
        assert_eq!(
            parse_quantization("q8_0").unwrap(),
            Quantization::Requantize(GgmlDType::Q8_0)
        );
        assert_eq!(
            parse_quantization("bf16").unwrap(),
            Quantization::Requantize(GgmlDType::BF16)
        );
        assert_eq!(
            parse_quantization("gguf").unwrap(),
            Quantization::GgufAsStored
        );
        assert!(parse_quantization("q4_1")
            .unwrap_err()
            .to_string()
            .contains("q4_1"));
    }
}
