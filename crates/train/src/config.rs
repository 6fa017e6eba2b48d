//! What a training run is asked to do.

use serde::{Deserialize, Serialize};

use crate::optim::AdamWParams;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The adapter to train (must already be added to the model).
    pub adapter: String,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub optimizer: AdamWParams,
    /// Global gradient-norm limit; `None`: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Evaluate every this many steps (and at step 0); `None`: at step 0 and at the end only.
    pub eval_every: Option<usize>,
    /// Checkpoint every this many steps (and at the end); `None`: at the end only.
    pub checkpoint_every: Option<usize>,
    /// Keep only each decoder layer's input in the forward and recompute the layer in the
    /// backward: activation memory of one layer instead of all, for about one more forward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Positions per LM-head chunk in the loss.
    pub loss_chunk: usize,
    /// Safe target id for untrained positions.
    pub pad_id: u32,
    /// Seed of the data order and of the dropout masks (recorded in checkpoints).
    pub seed: u64,
    pub progress: bool,
}

impl TrainConfig {
    /// The study's recipe (lr 5e-5, warm-up 0.15, min ratio 0.05, wd 0.03, clip 0.3, 6 epochs).
    pub fn study(adapter: &str, pad_id: u32) -> Self {
        TrainConfig {
            adapter: adapter.to_owned(),
            epochs: 6,
            max_steps: None,
            accumulation: 1,
            lr: 5e-5,
            warmup_ratio: 0.15,
            min_lr_ratio: 0.05,
            optimizer: AdamWParams::default(),
            max_grad_norm: Some(0.3),
            eval_every: None,
            checkpoint_every: None,
            gradient_checkpointing: false,
            loss_chunk: 1024,
            pad_id,
            seed: 0,
            progress: true,
        }
    }
}
