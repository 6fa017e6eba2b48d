//! `teamtune improve`: rejection-sampling self-improvement, the study's recipe (keep the
//! successful runs, fine-tune on them) closed in one process.
//!
//! Round r (in `--out/round-r/`): the current adapter plays every task at `--temperature` on
//! fresh seeds, its episodes at or above `--min-score` are kept (the scripted experts' on the
//! same seeds for a task where it kept none), the adapter is trained further on them
//! (`train --init-adapter`) and evaluated on the fixed evaluation seeds. Round 0 evaluates the
//! `--adapter` given. Every step is a plain `teamtune` command run in this process
//! (`commands::plain`), and report.md prints them.
//!
//! `improve.json` records each finished round (a round is finished once its evaluation is
//! recorded there), so running the same command again continues after the last finished
//! round; a half-done round is cleared and played again from its start.

mod round;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use teamtune_report::{ImproveLog, IMPROVE_FILE, IMPROVE_FORMAT};

use super::model_args::ModelArgs;
use super::play::registry;
use super::policy_args::{check_episodes, check_sampling, MAX_PARALLEL};

/// Seeds of round r start at `--seed + (r + 1) * SEED_STRIDE`: above every evaluation seed
/// (`--eval-episodes` is at most a million) and the demo's expert seeds (`--seed + 1000000`),
/// and apart from every other round's.
pub const SEED_STRIDE: u64 = 1_000_000;
pub const REPORT_FILE: &str = "report.md";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapter to improve (a PEFT folder, e.g. a demo's run/adapter); it is read, never
    /// written.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Folder of the run: improve.json, report.md, round-0/ (the --adapter evaluated) and
    /// round-R/ per round (model/ and expert/ episodes, run/ with the new adapter, eval/).
    #[arg(long)]
    pub out: PathBuf,
    /// Rounds to have finished; again with more rounds on the same --out continues.
    #[arg(long)]
    pub rounds: usize,
    /// Episodes scoring at least this much are kept as training data.
    #[arg(long, default_value_t = 50.0)]
    pub min_score: f64,
    /// Sampling temperature of the adapter's play (evaluations are greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Episodes per task and round that the adapter plays. Round r plays seeds from
    /// `--seed + (r + 1) * 1000000` (never an evaluation seed, never another round's); where
    /// the model keeps no episode of a task, the experts play the same seeds.
    #[arg(long, default_value_t = 4)]
    pub episodes: u64,
    /// Evaluation episodes per task, constrained and greedy, on seeds `--seed..`, the same
    /// every round.
    #[arg(long, default_value_t = 3)]
    pub eval_episodes: u64,
    /// Training steps per round.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Peak learning rate of each round's training (the demo's short-run rate).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Conversations per training step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Weight of the decision tokens (the values of `rationale` and `action_name`) in each
    /// round's training loss, as `train --decision-weight`; 1: no weighting.
    #[arg(long, default_value_t = 1.0)]
    pub decision_weight: f32,
    /// Longest training conversation in tokens, cut at a turn.
    #[arg(long, default_value_t = 1024)]
    pub max_len: usize,
    /// Seed of the evaluation episodes (`--seed + k`), the rounds' play (see --episodes) and
    /// training (`--seed + r` in round r).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `all` or a comma-separated list of task ids.
    #[arg(long, default_value = "all")]
    pub task: String,
    /// History window of the agents (system message and the last N messages), in play,
    /// training data and evaluation alike; 0 keeps whole conversations.
    #[arg(long, default_value_t = 1)]
    pub history: usize,
    /// Longest reply in tokens (a constrained reply is never cut: it may run to its schema's
    /// bound).
    #[arg(long, default_value_t = 160)]
    pub max_new_tokens: usize,
    /// Episodes in play at once (their waiting agents decode as one batch).
    #[arg(long, default_value_t = 14)]
    pub parallel: usize,
}

/// Refuses settings that cannot run, naming the flag, before any work.
fn check(args: &Args) -> anyhow::Result<()> {
    let adapter = &args.adapter;
    if !adapter.exists() {
        bail!("--adapter {}: no such folder", adapter.display());
    }
    if !adapter.join(teamtune_llama::ADAPTER_CONFIG).is_file() {
        bail!(
            "--adapter {}: not a LoRA adapter folder (no {} in it; give a PEFT folder such as \
             RUN/adapter)",
            adapter.display(),
            teamtune_llama::ADAPTER_CONFIG
        );
    }
    // Rounds clear their folders: the adapter must not live in one.
    let out = teamtune_formats::resolved(&args.out);
    if teamtune_formats::resolved(adapter).starts_with(&out) {
        bail!(
            "--adapter {} lies inside --out {}, whose round folders a run clears; copy it out \
             first",
            adapter.display(),
            args.out.display()
        );
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.min_score.is_nan() {
        bail!("--min-score must be a number (got NaN)");
    }
    check_sampling(args.temperature, None, None, None)?;
    check_episodes(args.episodes)?;
    check_episodes(args.eval_episodes).map_err(|e| {
        anyhow::anyhow!("{}", e.to_string().replace("--episodes", "--eval-episodes"))
    })?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--lr must be a positive number (got {})", args.lr);
    }
    if !(args.decision_weight > 0.0 && args.decision_weight.is_finite()) {
        bail!(
            "--decision-weight must be a number above 0 (got {})",
            args.decision_weight
        );
    }
    for (flag, value) in [
        ("--batch-size", args.batch_size),
        ("--max-len", args.max_len),
        ("--max-new-tokens", args.max_new_tokens),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    // Each round's training cuts conversations to --max-len inside a micro-batch's token
    // budget; found out here rather than after a round's play.
    let budget = super::recipe::Recipe::default().max_tokens;
    if args.max_len > budget {
        bail!(
            "--max-len {} is larger than a training micro-batch's {budget} tokens",
            args.max_len
        );
    }
    if !(1..=MAX_PARALLEL).contains(&args.parallel) {
        bail!(
            "--parallel must be between 1 and {MAX_PARALLEL} episodes at once (got {})",
            args.parallel
        );
    }
    round::play_seed(args, args.rounds)?;
    Ok(())
}

/// The settings the rounds depend on, by flag name: a run continued in the same --out must
/// have the same ones (--rounds is not among them: more rounds continue a run).
fn settings(args: &Args, tasks: &[String]) -> BTreeMap<String, Value> {
    let adapter = teamtune_formats::resolved(&args.adapter);
    let m = &args.model;
    let mut settings = BTreeMap::from([
        ("adapter".into(), json!(adapter.display().to_string())),
        ("model".into(), json!(m.model)),
        ("device".into(), json!(m.device)),
        ("dtype".into(), json!(m.dtype)),
        ("quantize".into(), json!(m.quantize)),
        ("task".into(), json!(tasks.join(","))),
        ("min-score".into(), json!(args.min_score)),
        ("temperature".into(), json!(args.temperature)),
        ("episodes".into(), json!(args.episodes)),
        ("eval-episodes".into(), json!(args.eval_episodes)),
        ("steps".into(), json!(args.steps)),
        ("lr".into(), json!(args.lr)),
        ("batch-size".into(), json!(args.batch_size)),
        ("max-len".into(), json!(args.max_len)),
        ("seed".into(), json!(args.seed)),
        ("history".into(), json!(args.history)),
        ("max-new-tokens".into(), json!(args.max_new_tokens)),
        ("parallel".into(), json!(args.parallel)),
    ]);
    // Recorded only when weighted, so that runs made before the flag still continue.
    if args.decision_weight != 1.0 {
        settings.insert("decision-weight".into(), json!(args.decision_weight));
    }
    settings
}

/// The run's log: the one in --out when it was made with the same settings, else a new one
/// for an --out that holds nothing else.
fn open_log(
    out: &Path,
    settings: BTreeMap<String, Value>,
    tasks: Vec<String>,
) -> anyhow::Result<ImproveLog> {
    let path = out.join(IMPROVE_FILE);
    if !path.exists() {
        let other = std::fs::read_dir(out)
            .with_context(|| format!("reading --out {}", out.display()))?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name() != ".lock");
        if let Some(e) = other {
            bail!(
                "--out {} holds files but no {IMPROVE_FILE} (e.g. {}): not a run of teamtune \
                 improve; choose a new or empty folder",
                out.display(),
                e.file_name().to_string_lossy()
            );
        }
        return Ok(ImproveLog::new(settings, tasks));
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let log: ImproveLog = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a teamtune improve record", path.display()))?;
    if log.format != IMPROVE_FORMAT {
        bail!(
            "{}: format `{}`, this teamtune reads `{IMPROVE_FORMAT}`",
            path.display(),
            log.format
        );
    }
    let keys: std::collections::BTreeSet<&String> =
        log.settings.keys().chain(settings.keys()).collect();
    for key in keys {
        let (old, new) = (log.settings.get(key), settings.get(key));
        if old != new {
            let show = |v: Option<&Value>| v.map_or("(none)".to_owned(), |v| v.to_string());
            bail!(
                "--out {} holds a run made with --{key} {}, not {}: continue it with the same \
                 settings, or choose another --out",
                out.display(),
                show(old),
                show(new)
            );
        }
    }
    Ok(log)
}

fn write_log(out: &Path, log: &ImproveLog) -> anyhow::Result<()> {
    let path = out.join(IMPROVE_FILE);
    teamtune_formats::write_atomic(&path, &serde_json::to_vec_pretty(log)?)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check(&args)?;
    let specs = registry(None)?.select(&args.task).context("--task")?;
    let tasks: Vec<String> = specs.iter().map(|s| s.id.clone()).collect();
    let _lock = teamtune_train::RunFolder::lock_only(&args.out)
        .with_context(|| format!("--out {}", args.out.display()))?;
    let mut log = open_log(&args.out, settings(&args, &tasks), tasks)?;
    write_log(&args.out, &log)?;
    if log.start.is_none() {
        tracing::info!("round 0: evaluating {}", args.adapter.display());
        log.start = Some(round::evaluate_start(&args, &log)?);
        write_log(&args.out, &log)?;
    }
    let done = log.rounds.len();
    if done >= args.rounds {
        tracing::info!(
            "rounds 1 to {done} are already finished in {}; nothing to do (--rounds {} \
             continues)",
            args.out.display(),
            done + 1
        );
    } else if done > 0 {
        tracing::info!(
            "rounds 1 to {done} are finished in {}: continuing from round {}",
            args.out.display(),
            done + 1
        );
    }
    for r in done + 1..=args.rounds {
        let started = Instant::now();
        let mut finished = round::run_round(&args, &log, r)?;
        finished.wall_seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            "round {r}/{}: mean {:.1} (start {:.1})",
            args.rounds,
            finished.eval.mean,
            log.start.as_ref().map_or(f64::NAN, |s| s.mean)
        );
        log.rounds.push(finished);
        write_log(&args.out, &log)?;
        write_report(&args, &log)?;
    }
    write_report(&args, &log)?;
    print!("{}", log.table());
    println!(
        "record in {}, report in {}",
        args.out.join(IMPROVE_FILE).display(),
        args.out.join(REPORT_FILE).display()
    );
    Ok(())
}

fn write_report(args: &Args, log: &ImproveLog) -> anyhow::Result<()> {
    let commands = round::all_commands(args, log);
    let text = log.markdown(args.min_score, &commands);
    let path = args.out.join(REPORT_FILE);
    teamtune_formats::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
