//! `teamtune train`: a LoRA adapter on conversation files, with the study's recipe as defaults.

use std::path::{Path, PathBuf};

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
    /// Train further an existing adapter (a PEFT folder such as RUN/adapter) instead of a
    /// fresh one. Its rank, alpha, rsLoRA and targets are the run's (a different --rank,
    /// --alpha, --rslora or --targets is refused); dropout and the rest come from the recipe.
    /// The step-0 validation loss is then the adapter's own, not the base model's.
    #[arg(long, value_name = "DIR")]
    pub init_adapter: Option<PathBuf>,
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
    let mut recipe = base.with_flags(&args.recipe);
    if let Some(dir) = &args.init_adapter {
        adopt_adapter(&mut recipe, &args.recipe, dir)?;
    }
    recipe.validate()?;
    Ok(recipe)
}

/// The adapter's shape (rank, alpha, rsLoRA, targets) replaces the recipe's: the weights
/// cannot be trained as another shape. A flag that asks for a different one is refused, naming
/// the flag and the adapter's value; a config file's value is replaced, with a note.
fn adopt_adapter(recipe: &mut Recipe, flags: &RecipeFlags, dir: &Path) -> anyhow::Result<()> {
    let config_path = dir.join(teamtune_llama::ADAPTER_CONFIG);
    if !config_path.is_file() {
        bail!(
            "--init-adapter {}: not a LoRA adapter folder (no {} in it; give a PEFT folder such as RUN/adapter)",
            dir.display(),
            teamtune_llama::ADAPTER_CONFIG
        );
    }
    let lora = teamtune_llama::read_peft_config(&config_path)
        .with_context(|| format!("--init-adapter {}", dir.display()))?;
    let names = |targets: &[teamtune_llama::LoraTarget]| -> Vec<&'static str> {
        let mut v: Vec<_> = targets.iter().map(|t| t.module_name()).collect();
        v.sort();
        v.dedup();
        v
    };
    let adapter_targets = names(&lora.targets);
    let conflict = |flag: &str, given: String, adapter: String| -> anyhow::Error {
        anyhow::anyhow!(
            "{flag} {given} differs from the adapter's {adapter} (--init-adapter {}): a trained adapter keeps its shape; leave {flag} out",
            dir.display()
        )
    };
    if let Some(r) = flags.rank.filter(|&r| r != lora.rank) {
        return Err(conflict("--rank", r.to_string(), lora.rank.to_string()));
    }
    if let Some(a) = flags.alpha.filter(|&a| a != lora.alpha) {
        return Err(conflict("--alpha", a.to_string(), lora.alpha.to_string()));
    }
    if let Some(rs) = flags.rslora.filter(|&rs| rs != lora.use_rslora) {
        return Err(conflict(
            "--rslora",
            rs.to_string(),
            lora.use_rslora.to_string(),
        ));
    }
    if let Some(given) = &flags.targets {
        let parsed: Option<Vec<_>> = given
            .iter()
            .map(|t| teamtune_llama::LoraTarget::parse(t))
            .collect();
        if parsed.is_none_or(|p| names(&p) != adapter_targets) {
            return Err(conflict(
                "--targets",
                given.join(","),
                adapter_targets.join(","),
            ));
        }
    }
    let file_targets: Vec<_> = recipe
        .lora_targets()
        .iter()
        .map(|t| t.module_name())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if (recipe.rank, recipe.alpha, recipe.rslora, &file_targets)
        != (lora.rank, lora.alpha, lora.use_rslora, &adapter_targets)
    {
        tracing::info!(
            "training the adapter's shape (rank {}, alpha {}, rsLoRA {}, targets {}) in place of the recipe's",
            lora.rank,
            lora.alpha,
            lora.use_rslora,
            adapter_targets.join(",")
        );
    }
    recipe.rank = lora.rank;
    recipe.alpha = lora.alpha;
    recipe.rslora = lora.use_rslora;
    recipe.targets = adapter_targets.iter().map(|t| t.to_string()).collect();
    Ok(())
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
            decision_fields: r.decision_fields(),
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
    if args.model.kv_cache != "auto" {
        bail!("--kv-cache is an inference setting; training keeps no KV cache");
    }
    if recipe.base_dtype == "bf16" && !args.model.device.eq_ignore_ascii_case("cpu") {
        bail!(
            "--base-dtype bf16 is the CPU's bf16 path; on --device {} load the model in bf16 \
             with --dtype bf16 instead",
            args.model.device
        );
    }
    if recipe.base_dtype == "bf16" && !teamtune_llama::cpu_has_bf16_dot_products() {
        bail!(
            "--base-dtype bf16 needs a CPU with AVX512-BF16 (bf16 dot products), which this one \
             lacks: without them it would run many times slower than the default f32"
        );
    }
    if let Some(init) = &args.init_adapter {
        // The run writes --out/adapter: never over the adapter it starts from.
        if teamtune_formats::same_path(init, &args.out.join("adapter")) {
            bail!(
                "--init-adapter {} is the adapter this run writes (--out {}/adapter); give another --out",
                init.display(),
                args.out.display()
            );
        }
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
    if r.base_dtype == "bf16" {
        loaded
            .model
            .freeze_base_in_bf16()
            .context("--base-dtype bf16")?;
    }
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
    let mut config = r.train_config("train", pad);
    match &args.init_adapter {
        Some(dir) => {
            loaded
                .model
                .load_adapter("train", dir)
                .with_context(|| format!("--init-adapter {}", dir.display()))?;
            loaded.model.set_adapter_dropout("train", r.dropout)?;
            config.continues_adapter = true;
        }
        None => {
            loaded.model.add_adapter("train", &lora)?;
        }
    }
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
