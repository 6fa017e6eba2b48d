//! teamtune-train: the LoRA training loop.
//!
//! [`Trainer::run`] trains the active adapter of a [`teamtune_llama::Llama`] with our own
//! [`AdamW`] (state saved), a warm-up + cosine [`Schedule`], global gradient-norm clipping and
//! gradient accumulation in which every micro-batch's summed token loss is divided by the
//! trained tokens of the whole accumulation window (so accumulated gradients equal one big
//! batch's), optionally with gradient checkpointing per decoder layer. It evaluates at step 0
//! (the base model, or a continued adapter's own loss) and every N steps, logs metrics as JSON Lines (with each step's peak
//! memory), writes checkpoints atomically and resumes from them exactly. The study's recipe is
//! defined here once ([`study_lora`], [`TrainConfig::study`]).
//!
//! It must not own model internals beyond the small surface it trains through (`Llama`'s
//! forward, adapter variables and save/load), data files or their encoding (`teamtune-data`
//! hands it batches), nor command-line flags.

mod checkpoint;
mod config;
mod error;
mod loss;
mod memory;
mod metrics;
mod optim;
mod run_folder;
mod schedule;
mod step;
mod trainer;

pub use checkpoint::TrainerState;
pub use config::{study_lora, TrainConfig};
pub use error::{Result, TrainError};
pub use loss::{batch_inputs, masked_nll_sum};
pub use memory::{adapter_fits_in_memory, keep_freed_memory, peak_rss_mib, reset_peak};
pub use optim::{clip_grad_norm, grad_norm, AdamW, AdamWParams};
pub use run_folder::{DataFingerprint, OpenMode, RunFolder};
pub use schedule::Schedule;
pub use step::{accumulate, evaluate};
pub use trainer::{BatchSource, TrainSummary, Trainer};
