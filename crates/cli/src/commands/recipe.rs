//! The settings of a training run: the study's recipe by default, a TOML file (`--config`)
//! over that, and command-line flags over both. The effective recipe is written into the run
//! folder as `train.toml`, so a run can be repeated or resumed with exactly its settings.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use teamtune_llama::LoraConfig;
use teamtune_train::TrainConfig;

/// Every setting of `teamtune train` that is not an input or output path. Field names are
/// the flags' names with `_` for `-`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    /// Projections to adapt: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
    pub lr: f64,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    /// Sequences per optimizer step (reached by gradient accumulation).
    pub batch_size: usize,
    /// Sequences per micro-batch (one forward/backward).
    pub micro_batch: usize,
    /// Token budget per micro-batch, padding included.
    pub max_tokens: usize,
    /// Longest conversation kept, in tokens (longer ones are cut at a turn boundary); none:
    /// the model's context length.
    pub max_len: Option<usize>,
    pub warmup: f64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub clip: f64,
    /// Conversations scoring below this are pruned.
    pub min_score: f64,
    /// Fraction of conversations held out for the evaluation loss.
    pub validation_fraction: f64,
    pub eval_every: Option<usize>,
    pub checkpoint_every: Option<usize>,
    pub gradient_checkpointing: bool,
    /// Weight in the training loss of decision tokens (the values of a reply's
    /// [`DECISION_FIELDS`]) against 1 for the other trained tokens; 1: no weighting.
    pub decision_weight: f32,
    /// The frozen projections' arithmetic on the CPU: `f32`, or `bf16` (bf16 products with
    /// f32 sums, AVX512-BF16; the adapter stays f32).
    pub base_dtype: String,
    pub seed: u64,
}

/// The JSON fields of a grid-world reply whose values are the decision: the stated facts and
/// way (`rationale`) and the action. The reflection, message and memory are free text.
pub const DECISION_FIELDS: [&str; 2] = ["rationale", "action_name"];

impl Default for Recipe {
    /// The study's recipe: the adapter of [`teamtune_train::study_lora`] (r 8, alpha 16,
    /// dropout 0.2 on all seven projections) and the optimisation of
    /// [`TrainConfig::study`] (lr 5e-5, 6 epochs, warm-up 0.15, min-LR ratio 0.05, weight decay
    /// 0.03, clip 0.3), with the study's data settings: 32 sequences per step in micro-batches
    /// of 4 (fewer when the batch is smaller), conversations up to the model's context length,
    /// pruned below 50, a tenth held out.
    fn default() -> Self {
        let lora = teamtune_train::study_lora();
        let train = TrainConfig::study("train", 0);
        Recipe {
            rank: lora.rank,
            alpha: lora.alpha,
            dropout: lora.dropout,
            rslora: lora.use_rslora,
            targets: lora
                .targets
                .iter()
                .map(|t| t.module_name().to_owned())
                .collect(),
            lr: train.lr,
            epochs: train.epochs,
            max_steps: train.max_steps,
            batch_size: 32,
            micro_batch: 4,
            max_tokens: 8192,
            max_len: None,
            warmup: train.warmup_ratio,
            min_lr_ratio: train.min_lr_ratio,
            weight_decay: train.optimizer.weight_decay,
            clip: train.max_grad_norm.unwrap_or(0.0),
            min_score: teamtune_data::DEFAULT_MIN_SCORE,
            validation_fraction: teamtune_data::SplitOptions::default().validation_fraction,
            eval_every: train.eval_every,
            checkpoint_every: train.checkpoint_every,
            gradient_checkpointing: train.gradient_checkpointing,
            decision_weight: train.decision_weight,
            base_dtype: "f32".into(),
            seed: train.seed,
        }
    }
}

/// The flags that override a recipe field; `None` keeps the file's (or default) value.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct RecipeFlags {
    /// LoRA rank [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha [default: 16].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the adapter input [default: 0.2].
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub rslora: Option<bool>,
    /// Projections to adapt, comma-separated (q_proj,...,down_proj) [default: all seven].
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Peak learning rate [default: 5e-5].
    #[arg(long)]
    pub lr: Option<f64>,
    /// [default: 6]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps (the schedule spans them).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Sequences per optimizer step, reached by gradient accumulation [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Sequences per micro-batch (one forward/backward) [default: 4, or --batch-size when
    /// smaller].
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Token budget per micro-batch, padding included [default: 8192].
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Longest conversation kept in tokens; longer ones are cut at a turn [default: the
    /// model's context length, or --max-tokens when smaller].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Warm-up fraction of the steps [default: 0.15].
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Final LR as a fraction of the peak [default: 0.05].
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    /// Decoupled weight decay [default: 0.03].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip; 0 disables it [default: 0.3].
    #[arg(long)]
    pub clip: Option<f64>,
    /// Conversations scoring below this are pruned [default: 50].
    #[arg(long)]
    pub min_score: Option<f64>,
    /// Fraction of conversations held out for the evaluation loss [default: 0.1].
    #[arg(long)]
    pub validation_fraction: Option<f64>,
    /// Evaluate every N steps (always at step 0 and at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Checkpoint every N steps (always at the end).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Recompute each decoder layer in the backward instead of keeping its activations.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Weight in the training loss of the tokens of a reply's rationale and action_name values
    /// (the decision) against 1 for its other tokens; the validation loss is unweighted
    /// [default: 1].
    #[arg(long)]
    pub decision_weight: Option<f32>,
    /// The frozen projections on the CPU in f32, or in bf16 (bf16 products with f32 sums on
    /// CPUs with AVX512-BF16; the adapter, its gradients and the optimizer stay f32; on a GPU
    /// load the model with --dtype bf16 instead) [default: f32].
    #[arg(long)]
    pub base_dtype: Option<String>,
    /// Seed of the split, data order, adapter init and dropout masks [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Recipe {
    /// Reads a recipe file; fields it leaves out keep the study's values.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = teamtune_llama::read_text_file(path)
            .with_context(|| format!("reading the training config {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Writes this recipe as TOML (temporary file and rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self)?;
        teamtune_formats::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// This recipe with every given flag applied.
    pub fn with_flags(mut self, f: &RecipeFlags) -> Self {
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = &f.$field { self.$field = v.clone(); }
            )*};
        }
        set!(
            rank,
            alpha,
            dropout,
            rslora,
            targets,
            lr,
            epochs,
            batch_size,
            micro_batch,
            max_tokens,
            warmup,
            min_lr_ratio,
            weight_decay,
            clip,
            min_score,
            validation_fraction,
            gradient_checkpointing,
            decision_weight,
            base_dtype,
            seed
        );
        // The micro-batch follows a smaller batch size unless it is given too.
        if f.batch_size.is_some() && f.micro_batch.is_none() {
            self.micro_batch = self.micro_batch.min(self.batch_size);
        }
        for (field, flag) in [
            (&mut self.max_len, f.max_len),
            (&mut self.max_steps, f.max_steps),
            (&mut self.eval_every, f.eval_every),
            (&mut self.checkpoint_every, f.checkpoint_every),
        ] {
            if flag.is_some() {
                *field = flag;
            }
        }
        self
    }

    /// Refuses settings that cannot train, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let checks = [
            (
                self.rank > 0,
                format!("--rank must be positive (got {})", self.rank),
            ),
            (
                self.alpha > 0.0 && self.alpha.is_finite(),
                format!("--alpha must be a positive number (got {})", self.alpha),
            ),
            (
                (0.0..1.0).contains(&self.dropout),
                format!(
                    "--dropout must be at least 0 and below 1 (got {})",
                    self.dropout
                ),
            ),
            (
                self.lr > 0.0 && self.lr.is_finite(),
                format!("--lr must be positive (got {})", self.lr),
            ),
            (
                self.epochs > 0,
                format!("--epochs must be positive (got {})", self.epochs),
            ),
            (
                self.batch_size > 0,
                format!("--batch-size must be positive (got {})", self.batch_size),
            ),
            (
                self.micro_batch > 0,
                format!("--micro-batch must be positive (got {})", self.micro_batch),
            ),
            (
                self.batch_size >= self.micro_batch,
                format!(
                    "--micro-batch ({}) cannot be larger than --batch-size ({})",
                    self.micro_batch, self.batch_size
                ),
            ),
            (
                ["f32", "bf16"].contains(&self.base_dtype.as_str()),
                format!(
                    "--base-dtype must be f32 or bf16 (got `{}`)",
                    self.base_dtype
                ),
            ),
            (
                self.max_len != Some(0),
                "--max-len must be positive".to_owned(),
            ),
            (
                self.max_len.is_none_or(|m| m <= self.max_tokens),
                format!(
                    "--max-len ({}) cannot be larger than --max-tokens ({}), the token budget of \
                     a micro-batch that one conversation must fit in",
                    self.max_len.unwrap_or(0),
                    self.max_tokens
                ),
            ),
            (
                (0.0..1.0).contains(&self.warmup),
                format!(
                    "--warmup must be at least 0 and below 1 (got {})",
                    self.warmup
                ),
            ),
            (
                (0.0..=1.0).contains(&self.min_lr_ratio),
                format!(
                    "--min-lr-ratio must be between 0 and 1 (got {})",
                    self.min_lr_ratio
                ),
            ),
            (
                self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
                format!(
                    "--weight-decay must be a number of at least 0 (got {})",
                    self.weight_decay
                ),
            ),
            (
                self.clip >= 0.0 && self.clip.is_finite(),
                format!("--clip must be a number of at least 0 (got {})", self.clip),
            ),
            (
                self.decision_weight > 0.0 && self.decision_weight.is_finite(),
                format!(
                    "--decision-weight must be a number above 0 (got {})",
                    self.decision_weight
                ),
            ),
            (
                !self.min_score.is_nan(),
                "--min-score must be a number (got NaN)".to_owned(),
            ),
            (
                (0.0..1.0).contains(&self.validation_fraction),
                format!(
                    "--validation-fraction must be at least 0 and below 1 (got {})",
                    self.validation_fraction
                ),
            ),
        ];
        for (ok, message) in checks {
            if !ok {
                bail!("invalid training setting: {message}");
            }
        }
        if self.targets.is_empty() {
            bail!("invalid training setting: --targets is empty");
        }
        for t in &self.targets {
            if teamtune_llama::LoraTarget::parse(t).is_none() {
                bail!(
                    "invalid training setting: unknown target `{t}` (use q_proj, k_proj, v_proj, \
                     o_proj, gate_proj, up_proj, down_proj)"
                );
            }
        }
        Ok(())
    }

    /// The reply fields whose tokens the data marks as decisions: none unless they are
    /// weighted.
    pub fn decision_fields(&self) -> Vec<String> {
        if self.decision_weight == 1.0 {
            Vec::new()
        } else {
            DECISION_FIELDS.iter().map(|f| f.to_string()).collect()
        }
    }

    pub fn lora_targets(&self) -> Vec<teamtune_llama::LoraTarget> {
        self.targets
            .iter()
            .filter_map(|t| teamtune_llama::LoraTarget::parse(t))
            .collect()
    }

    /// The adapter this recipe trains (`base_model`: written into its adapter_config.json).
    pub fn lora_config(&self, base_model: Option<String>) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            use_rslora: self.rslora,
            targets: self.lora_targets(),
            base_model_name_or_path: base_model,
            seed: self.seed,
        }
    }

    /// The trainer's settings for adapter `adapter`: the study's, with this recipe's values.
    pub fn train_config(&self, adapter: &str, pad_id: u32) -> TrainConfig {
        let mut config = TrainConfig::study(adapter, pad_id);
        config.epochs = self.epochs;
        config.max_steps = self.max_steps;
        config.accumulation = self.batch_size.div_ceil(self.micro_batch);
        config.lr = self.lr;
        config.warmup_ratio = self.warmup;
        config.min_lr_ratio = self.min_lr_ratio;
        config.optimizer.weight_decay = self.weight_decay;
        config.max_grad_norm = (self.clip > 0.0).then_some(self.clip);
        config.eval_every = self.eval_every;
        config.checkpoint_every = self.checkpoint_every;
        config.seed = self.seed;
        config.gradient_checkpointing = self.gradient_checkpointing;
        config.decision_weight = self.decision_weight;
        config.progress = true;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sets_what_it_names_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.toml");
        std::fs::write(
            &path,
            "lr = 1e-4\nrank = 16\ntargets = [\"q_proj\", \"v_proj\"]\n",
        )
        .unwrap();
        let file = Recipe::from_file(&path).unwrap();
        assert_eq!(file.lr, 1e-4);
        assert_eq!(file.rank, 16);
        assert_eq!(file.alpha, 16.0, "unnamed fields keep the study's value");
        let flags = RecipeFlags {
            rank: Some(4),
            max_steps: Some(3),
            ..Default::default()
        };
        let r = file.with_flags(&flags);
        assert_eq!((r.rank, r.lr, r.max_steps), (4, 1e-4, Some(3)));
        r.validate().unwrap();
        assert_eq!(r.lora_targets().len(), 2);
        // What a run saves reads back equal.
        let saved = dir.path().join("saved.toml");
        r.save(&saved).unwrap();
        assert_eq!(Recipe::from_file(&saved).unwrap(), r);
    }

    #[test]
    fn the_shipped_study_config_is_the_default_recipe() {
        let path = teamtune_testkit::repo_root().join("configs/study.toml");
        assert_eq!(Recipe::from_file(&path).unwrap(), Recipe::default());
    }

    #[test]
    fn bad_files_and_values_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "lr = 1e-4\nlearning_rate = 3\n").unwrap();
        let e = Recipe::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("learning_rate"), "{e}");
        std::fs::write(&path, "rank = \"eight\"\n").unwrap();
        let e = Recipe::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("rank"), "{e}");
        let e = Recipe::from_file(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
        let bad = Recipe {
            targets: vec!["qkv".into()],
            ..Recipe::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("qkv"));
        let bad = Recipe {
            dropout: 1.5,
            ..Recipe::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("dropout"));
        // Errors name the flag and the value, never the whole recipe.
        let bad = Recipe {
            batch_size: 2,
            micro_batch: 4,
            ..Recipe::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.contains("--micro-batch (4)") && e.contains("--batch-size (2)"),
            "{e}"
        );
        assert!(!e.contains("Recipe") && !e.contains("rank"), "{e}");
        // Numbers that are not numbers are refused by name, before any step turns them into a
        // non-finite loss or a shape error.
        for (bad, flag) in [
            (
                Recipe {
                    alpha: f64::INFINITY,
                    ..Recipe::default()
                },
                "--alpha",
            ),
            (
                Recipe {
                    weight_decay: f64::NAN,
                    ..Recipe::default()
                },
                "--weight-decay",
            ),
            (
                Recipe {
                    clip: -1.0,
                    ..Recipe::default()
                },
                "--clip",
            ),
            (
                Recipe {
                    min_score: f64::NAN,
                    ..Recipe::default()
                },
                "--min-score",
            ),
            (
                Recipe {
                    decision_weight: 0.0,
                    ..Recipe::default()
                },
                "--decision-weight",
            ),
            (
                Recipe {
                    decision_weight: f32::INFINITY,
                    ..Recipe::default()
                },
                "--decision-weight",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn decision_fields_are_marked_only_when_weighted() {
        assert!(Recipe::default().decision_fields().is_empty());
        let weighted = Recipe {
            decision_weight: 3.0,
            ..Recipe::default()
        };
        assert_eq!(weighted.decision_fields(), ["rationale", "action_name"]);
        assert_eq!(weighted.train_config("a", 0).decision_weight, 3.0);
    }

    #[test]
    fn the_micro_batch_follows_a_smaller_batch_size_unless_given() {
        let small = RecipeFlags {
            batch_size: Some(1),
            ..Default::default()
        };
        let r = Recipe::default().with_flags(&small);
        assert_eq!((r.batch_size, r.micro_batch), (1, 1));
        r.validate().unwrap();
        // A larger batch leaves the micro-batch alone.
        let large = RecipeFlags {
            batch_size: Some(64),
            ..Default::default()
        };
        assert_eq!(Recipe::default().with_flags(&large).micro_batch, 4);
        // Both given and contradictory: refused, naming both flags.
        let both = RecipeFlags {
            batch_size: Some(1),
            micro_batch: Some(2),
            ..Default::default()
        };
        let e = Recipe::default().with_flags(&both).validate().unwrap_err();
        assert!(e.to_string().contains("--micro-batch (2)"), "{e}");
        // No length limit unless one is given: the model's context length applies.
        assert_eq!(Recipe::default().max_len, None);
        let cut = RecipeFlags {
            max_len: Some(2048),
            ..Default::default()
        };
        assert_eq!(Recipe::default().with_flags(&cut).max_len, Some(2048));
        // A conversation must fit in a micro-batch's token budget.
        let too_long = RecipeFlags {
            max_len: Some(9000),
            ..Default::default()
        };
        let e = Recipe::default()
            .with_flags(&too_long)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("--max-tokens (8192)"), "{e}");
    }
}
