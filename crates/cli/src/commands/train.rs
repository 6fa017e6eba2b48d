//! `teamtune train`: a LoRA adapter on conversation files, with the study's recipe as defaults.

use std::path::PathBuf;

use anyhow::{bail, Context};
use teamtune_data::{
    choose_pad_id, make_batches, prepare, BatchOptions, EncodeOptions, Encoder, PrepareOptions,
    Prepared, PruneOptions, SplitOptions,
};
use teamtune_llama::ChatAssets;
use teamtune_train::{
    adapter_fits_in_memory, keep_freed_memory, DataFingerprint, OpenMode, RunFolder, Trainer,
};

use super::model_args::{chat_template, ModelArgs};
use super::recipe::{Recipe, RecipeFlags};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Conversation files or folders (JSON Lines, `{"messages": [...], "task", "score"}`).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Run folder: train.toml, metrics.jsonl, checkpoints/, adapter/.
    #[arg(long)]
    pub out: PathBuf,
    /// A TOML file with any of the settings below (flags override it); see configs/study.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub recipe: RecipeFlags,
    /// Continue from a checkpoint (or a run folder's latest one), with that run's train.toml
    /// unless --config is given.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start over in an --out that holds a run (its metrics and checkpoints are removed), or
    /// resume on other data than the run was made with.
    #[arg(long)]
    pub force: bool,
}

/// The recipe a run uses: defaults, then the config file (or the resumed run's), then flags.
pub fn effective_recipe(args: &Args) -> anyhow::Result<Recipe> {
    let base = match (&args.config, &args.resume) {
        (Some(path), _) => Recipe::from_file(path)?,
        (None, Some(resume)) => {
            // A run folder, or a checkpoint folder inside one (RUN/checkpoints/step-N).
            let candidates = [resume.join("train.toml"), resume.join("../../train.toml")];
            match candidates.iter().find(|p| p.is_file()) {
                Some(p) => Recipe::from_file(p)?,
                None => Recipe::default(),
            }
        }
        (None, None) => Recipe::default(),
    };
    let recipe = base.with_flags(&args.recipe);
    recipe.validate()?;
    Ok(recipe)
}

/// The conversations a run trains and validates on, encoded the way the trainer sees them:
/// pruned below `recipe.min_score`, split by `recipe.validation_fraction` and `recipe.seed`,
/// longer ones cut at a turn to `recipe.max_len` (or `default_max_len` when the recipe has none).
pub fn prepare_data(
    data: &[PathBuf],
    assets: &ChatAssets,
    recipe: &Recipe,
    default_max_len: Option<usize>,
) -> anyhow::Result<(Encoder, Prepared)> {
    let r = recipe;
    let template = chat_template(assets)?;
    let encoder = Encoder::new(
        assets.tokenizer.clone(),
        template,
        EncodeOptions {
            max_len: r.max_len.or(default_max_len),
            overlong: teamtune_data::Overlong::CutAtTurn,
            ..Default::default()
        },
    )?;
    let options = PrepareOptions {
        prune: PruneOptions {
            min_score: Some(r.min_score),
            ..Default::default()
        },
        split: SplitOptions {
            validation_fraction: r.validation_fraction,
            seed: r.seed,
            ..Default::default()
        },
        ..Default::default()
    };
    let prepared = prepare(data, &encoder, &options).context("preparing the training data")?;
    Ok((encoder, prepared))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let recipe = effective_recipe(&args)?;
    if args.model.quantize.is_some() {
        bail!("--quantize is an inference path; training needs the dense weights");
    }
    // The run folder is checked and locked before any work: one process at a time, a finished
    // run only replaced with --force, a resume only on the data the run was made with.
    let files = teamtune_data::discover(&args.data).context("reading --data")?;
    if files
        .iter()
        .all(|f| std::fs::metadata(f).is_ok_and(|m| m.len() == 0))
    {
        bail!(
            "--data: {} holds no conversations (empty)",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let data = DataFingerprint::of(&files)?;
    let mode = match (args.resume.is_some(), args.force) {
        (false, false) => OpenMode::Fresh,
        (true, false) => OpenMode::Resume,
        (resume, true) => OpenMode::Force { resume },
    };
    let _run = RunFolder::open(&args.out, mode, &data)
        .with_context(|| format!("the run folder --out {}", args.out.display()))?;
    recipe.save(&args.out.join("train.toml"))?;
    let r = &recipe;
    keep_freed_memory();
    let mut loaded = args.model.load()?;
    // Unless given, conversations are cut at the model's context, or at a micro-batch's token
    // budget when that is smaller (a longer one could not be trained).
    let max_len = r.max_len.unwrap_or(
        loaded
            .model
            .config()
            .max_position_embeddings
            .min(r.max_tokens),
    );
    let (encoder, prepared) = prepare_data(&args.data, &loaded.assets, r, Some(max_len))?;
    let totals = prepared.report.totals();
    if totals.dropped_overlong + totals.cut > 0 {
        tracing::warn!(
            "{} conversations were longer than {max_len} tokens: {} were cut at a turn and {} \
             dropped (their first turn alone was longer); --max-len (and --max-tokens, a \
             micro-batch's budget) change the limit",
            totals.dropped_overlong + totals.cut,
            totals.cut,
            totals.dropped_overlong
        );
    }
    if totals.special_text > 0 {
        tracing::warn!(
            "{} conversations quote special-token text (such as <|im_start|>) in a message; it \
             is trained as plain text, not as control tokens",
            totals.special_text
        );
    }
    if prepared.train.is_empty() {
        if totals.read == 0 {
            bail!("--data holds no conversations");
        }
        bail!(
            "no training conversations left: {} read, {} scored below --min-score {}, {} had no \
             score, {} were longer than {max_len} tokens",
            totals.read,
            totals.pruned_low_score,
            r.min_score,
            totals.pruned_missing_score,
            totals.dropped_overlong
        );
    }
    let eos = encoder.end_of_turn_ids().to_vec();
    let pad = choose_pad_id(
        encoder.tokenizer(),
        loaded.model.config().pad_token_id,
        &eos,
    )?;
    let batch_options = BatchOptions {
        max_rows: Some(r.micro_batch),
        seed: r.seed,
        ..BatchOptions::new(r.max_tokens, pad)
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

    let lora = r.lora_config(Some(loaded.files.describe()));
    adapter_fits_in_memory(loaded.model.config(), &lora)?;
    loaded.model.add_adapter("train", &lora)?;
    let config = r.train_config("train", pad);
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
    println!("{summary}; adapter in {}", adapter_dir.display());
    Ok(())
}
