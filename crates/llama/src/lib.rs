//! LLaMA-3.x for teamtune: the model side of fine-tuning, from files on disk to sampled tokens.
//!
//! This crate owns model loading in every format (config.json in every Llama-3.x form,
//! safetensors folders, the hub, GGUF files, the tokenizer and chat template that belong to the
//! model), the decoder (a forward with KV cache and padded or packed batches that is
//! differentiable end to end in training mode), the CPU kernels with their backward, LoRA
//! layers and PEFT adapter files, merging and the Hugging Face export, and decoding sessions
//! with sampling.
//!
//! It must not own trajectory files, training loops, HTTP or any knowledge of tasks: those
//! belong to the crates that use it, which import only from this root.
//!
//! - `load`: where a model comes from and how its files are read.
//! - `model`: the decoder, its projections, token layouts and the KV cache.
//! - [`kernels`]: hand-written CPU ops (training ops with their backward, decode kernels).
//! - `lora`: adapters, PEFT files and merging.
//! - `export`: a merged model written as a Hugging Face folder.
//! - `decode`: sessions, batched decoding, sampling, generation and text streaming.

mod decode;
mod device;
mod error;
mod export;
pub mod kernels;
mod load;
mod lora;
mod model;

pub use decode::batch::decode_batch;
pub use decode::continuous::{ContinuousBatch, Finished};
pub use decode::generate::{generate, Generated, StopReason};
pub use decode::sampling::{Sampler, SamplingParams};
pub use decode::session::{Decoded, NoFilter, Session, TokenFilter};
pub use decode::stream::TextStream;
pub use device::{
    cpu_has_bf16_dot_products, on_compute_threads, parse_device, parse_dtype, parse_kv_cache,
    parse_quantization, share_cores_with_candle, Quantization,
};
pub use error::{LlamaError, Result};
pub use export::gguf_model::{export_merged_gguf, GgufReport};
pub use export::gguf_write::GgufType;
pub use export::modelfile::{ChatFormat, Modelfile};
pub use export::{export_merged, parse_size, ExportOptions, ExportReport};
pub use kernels::mix_seed;
pub use load::assets::{load_chat_assets, ChatAssets};
pub use load::config::{LlamaConfig, RopeScaling};
pub use load::open::{load_config, load_model, LoadedModel};
pub use load::source::{default_model_path, teamtune_home, ModelFiles};
pub use load::text_file::{read_text_file, MAX_TEXT_FILE_BYTES};
pub use load::weights::{GgufWeights, WeightSource};
pub use lora::adapter::{LoraAdapter, LoraPair};
pub use lora::config::{LoraConfig, LoraTarget};
pub use lora::gguf::gguf_projection;
// PEFT's file layout, for code that reads or writes adapter folders itself.
pub use lora::peft::{peft_tensor_name, read_peft_config, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
pub use model::cache::KvCache;
pub use model::layout::TokenLayout;
pub use model::linear::Linear;
pub use model::llama::{LayerContext, Llama, Mode, RaggedRow};
