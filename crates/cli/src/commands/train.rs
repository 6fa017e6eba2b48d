//! `teamtune train`: a LoRA adapter on conversation files, with the study's recipe as defaults.

use std::path::PathBuf;

use anyhow::{bail, Context};
use teamtune_data::{
    choose_pad_id, make_batches, prepare, BatchOptions, EncodeOptions, Encoder, PrepareOptions,
    PruneOptions, SplitOptions,
};
use teamtune_llama::{LoraConfig, LoraTarget};
use teamtune_train::{TrainConfig, Trainer};

use super::model_args::{chat_template, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Conversation files or folders (JSON Lines, `{"messages": [...], "task", "score"}`).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Run folder: metrics.jsonl, checkpoints/, adapter/.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.2)]
    pub dropout: f32,
    #[arg(long)]
    pub rslora: bool,
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Sequences per optimizer step (reached by gradient accumulation).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Sequences per micro-batch (one forward/backward).
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Token budget per micro-batch, padding included.
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// Longest conversation kept, in tokens (longer ones are cut at a turn boundary).
    #[arg(long, default_value_t = 4096)]
    pub max_len: usize,
    #[arg(long, default_value_t = 0.15)]
    pub warmup: f64,
    #[arg(long, default_value_t = 0.05)]
    pub min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.03)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables it.
    #[arg(long, default_value_t = 0.3)]
    pub clip: f64,
    /// Conversations scoring below this are pruned.
    #[arg(long, default_value_t = 50.0)]
    pub min_score: f64,
    /// Fraction of conversations held out for the evaluation loss.
    #[arg(long, default_value_t = 0.1)]
    pub validation_fraction: f64,
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Continue from a checkpoint (or a run folder's latest one).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.micro_batch == 0 || args.batch_size < args.micro_batch {
        bail!(
            "--batch-size ({}) must be at least --micro-batch ({}) > 0",
            args.batch_size,
            args.micro_batch
        );
    }
    if args.model.quantize.is_some() {
        bail!("--quantize is an inference path; training needs the dense weights");
    }
    let mut loaded = args.model.load()?;
    let template = chat_template(&loaded.assets)?;
    let encoder = Encoder::new(
        loaded.assets.tokenizer.clone(),
        template,
        EncodeOptions {
            max_len: Some(args.max_len),
            overlong: teamtune_data::Overlong::CutAtTurn,
            ..Default::default()
        },
    )?;
    let options = PrepareOptions {
        prune: PruneOptions {
            min_score: Some(args.min_score),
            ..Default::default()
        },
        split: SplitOptions {
            validation_fraction: args.validation_fraction,
            seed: args.seed,
            ..Default::default()
        },
        ..Default::default()
    };
    let prepared =
        prepare(&args.data, &encoder, &options).context("preparing the training data")?;
    if prepared.train.is_empty() {
        bail!(
            "no training conversations left after pruning below {}",
            args.min_score
        );
    }
    let eos = encoder.end_of_turn_ids().to_vec();
    let pad = choose_pad_id(
        encoder.tokenizer(),
        loaded.model.config().pad_token_id,
        &eos,
    )?;
    let batch_options = BatchOptions {
        max_rows: Some(args.micro_batch),
        seed: args.seed,
        ..BatchOptions::new(args.max_tokens, pad)
    };
    tracing::info!(
        train = prepared.train.len(),
        validation = prepared.validation.len(),
        "conversations"
    );
    let eval = make_batches(
        &prepared.validation,
        &BatchOptions {
            shuffle: false,
            ..batch_options.clone()
        },
        &eos,
        0,
    )?;

    let lora = LoraConfig {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        use_rslora: args.rslora,
        targets: LoraTarget::ALL.to_vec(),
        base_model_name_or_path: Some(loaded.files.describe()),
        seed: args.seed,
    };
    loaded.model.add_adapter("train", &lora)?;
    let mut config = TrainConfig::study("train", pad);
    config.epochs = args.epochs;
    config.max_steps = args.max_steps;
    config.accumulation = args.batch_size.div_ceil(args.micro_batch);
    config.lr = args.lr;
    config.warmup_ratio = args.warmup;
    config.min_lr_ratio = args.min_lr_ratio;
    config.optimizer.weight_decay = args.weight_decay;
    config.max_grad_norm = (args.clip > 0.0).then_some(args.clip);
    config.eval_every = args.eval_every;
    config.checkpoint_every = args.checkpoint_every;
    config.seed = args.seed;
    config.progress = true;
    let trainer = Trainer::new(config, &args.out)?;
    let train = &prepared.train;
    let mut source = |epoch: usize| -> teamtune_train::Result<Vec<teamtune_data::Batch>> {
        Ok(make_batches(train, &batch_options, &eos, epoch as u64)?)
    };
    let summary = trainer.run(
        &mut loaded.model,
        &mut source,
        &eval,
        args.resume.as_deref(),
    )?;
    let adapter_dir = args.out.join("adapter");
    loaded.model.save_adapter("train", &adapter_dir)?;
    println!(
        "{} steps, last loss {:?}, eval losses {:?}; adapter in {}",
        summary.steps,
        summary.last_loss,
        summary.eval_losses,
        adapter_dir.display()
    );
    Ok(())
}
