//! What a training run is asked to do.

use serde::{Deserialize, Serialize};
use teamtune_llama::{LoraConfig, LoraTarget};

use crate::optim::AdamWParams;

/// The study's adapter: rank 8, alpha 16 (scale alpha / r), dropout 0.2 on the adapter input,
/// on all seven projections (q, k, v, o, gate, up, down). The one definition of the study's
/// LoRA shape: `teamtune train`'s defaults (and `configs/study.toml`) derive from it.
pub fn study_lora() -> LoraConfig {
    LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.2,
        use_rslora: false,
        targets: LoraTarget::ALL.to_vec(),
        base_model_name_or_path: None,
        seed: 0,
    }
}

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
    /// The training loss's weight of decision tokens (`teamtune_data::DECISION` in the loss
    /// mask) against 1 for the other trained tokens; the loss is the weighted mean. The
    /// evaluation loss stays unweighted, comparable across weights.
    #[serde(default = "one")]
    pub decision_weight: f32,
    /// Positions per LM-head chunk in the loss.
    pub loss_chunk: usize,
    /// Safe target id for untrained positions.
    pub pad_id: u32,
    /// Seed of the data order and of the dropout masks (recorded in checkpoints).
    pub seed: u64,
    pub progress: bool,
    /// The adapter was loaded to continue training, not made fresh: the step-0 evaluation
    /// measures it, where the run starts. A fresh adapter's B is zero, so its step 0 is the
    /// base model's loss, measured with the adapter off (the plots' base line).
    #[serde(default)]
    pub continues_adapter: bool,
}

fn one() -> f32 {
    1.0
}

impl TrainConfig {
    /// The study's recipe (lr 5e-5, warm-up 0.15, cosine to a min ratio of 0.05, weight decay
    /// 0.03, clip 0.3, 6 epochs). The one definition of the study's optimisation settings:
    /// `teamtune train`'s defaults (and `configs/study.toml`) derive from it; the adapter's are
    /// [`study_lora`].
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
            decision_weight: 1.0,
            loss_chunk: 1024,
            pad_id,
            seed: 0,
            progress: true,
            continues_adapter: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_study_recipe_is_the_papers() {
        let lora = study_lora();
        assert_eq!((lora.rank, lora.alpha, lora.dropout), (8, 16.0, 0.2));
        assert!(!lora.use_rslora);
        assert_eq!(lora.targets, LoraTarget::ALL.to_vec());
        assert_eq!(lora.targets.len(), 7);
        let c = TrainConfig::study("a", 7);
        assert_eq!((c.adapter.as_str(), c.pad_id), ("a", 7));
        assert_eq!((c.lr, c.epochs), (5e-5, 6));
        assert_eq!((c.warmup_ratio, c.min_lr_ratio), (0.15, 0.05));
        assert_eq!(c.optimizer.weight_decay, 0.03);
        assert_eq!(c.max_grad_norm, Some(0.3));
    }
}
