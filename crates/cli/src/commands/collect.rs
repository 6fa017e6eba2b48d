//! `teamtune collect`: many episodes, their records, and the training conversations in them.

use std::path::PathBuf;

use anyhow::{bail, Context};
use teamtune_agents::{plan, run_episodes, RunOptions};
use teamtune_gridworld::{append_records, training_lines, write_jsonl_atomic};

use super::play::registry;
use super::policy_args::{check_episodes, PolicyArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Who plays: expert (scripted), model (in-process, with --adapter) or openai (any
    /// OpenAI-compatible endpoint, e.g. a 70B served by vLLM).
    #[arg(long, default_value = "expert")]
    pub policy: String,
    #[command(flatten)]
    pub agents: PolicyArgs,
    /// `all` or a comma-separated list of task ids.
    #[arg(long, default_value = "all")]
    pub task: String,
    /// Episodes per task.
    #[arg(long, default_value_t = 10)]
    pub episodes: u64,
    /// Episode k of a task has seed `seed + k`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Episode records (JSON Lines, appended atomically): replayable with `teamtune replay`.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write one training conversation per agent (`{"messages", "task", "score", ...}`,
    /// the data loader's input) to this JSON Lines file; with `--history N`, one per turn
    /// instead, holding the system message, the last N messages and the reply (what a policy
    /// with that window sees).
    #[arg(long)]
    pub training_out: Option<PathBuf>,
    /// Keep only episodes scoring at least this much (the study pruned below 50).
    #[arg(long)]
    pub min_score: Option<f64>,
    /// A TOML file of extra task variants.
    #[arg(long)]
    pub tasks: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_episodes(args.episodes)?;
    args.agents.check()?;
    if args.min_score.is_some_and(f64::is_nan) {
        bail!("--min-score must be a number (got NaN)");
    }
    if let Some(training) = &args.training_out {
        if teamtune_formats::same_path(training, &args.out) {
            bail!(
                "--training-out and --out are the same file ({}): the training lines would \
                 replace the episode records",
                args.out.display()
            );
        }
    }
    let specs = registry(args.tasks.as_ref())?.select(&args.task)?;
    let (mut policy, _) = args.agents.build(&args.policy, args.seed)?;
    let plans = plan(&specs, args.episodes, args.seed);
    let played = run_episodes(
        policy.as_mut(),
        &plans,
        &RunOptions {
            parallel: args.agents.parallel,
            progress: true,
        },
    )?;
    let mut records = Vec::new();
    let mut pruned = 0usize;
    for spec in &specs {
        let mine: Vec<_> = played.iter().filter(|p| p.record.task == spec.id).collect();
        let total: f64 = mine.iter().map(|p| p.record.final_score).sum();
        for p in mine.iter() {
            if args.min_score.is_some_and(|m| p.record.final_score < m) {
                pruned += 1;
            } else {
                records.push(p.record.clone());
            }
        }
        tracing::info!(task = %spec.id, mean_score = total / mine.len().max(1) as f64, "collected");
    }
    append_records(&args.out, &records)
        .with_context(|| format!("writing {}", args.out.display()))?;
    match args.min_score {
        Some(min) => println!(
            "{} episodes written to {} ({pruned} pruned below {min})",
            records.len(),
            args.out.display()
        ),
        None => println!(
            "{} episodes written to {}",
            records.len(),
            args.out.display()
        ),
    }
    if let Some(path) = &args.training_out {
        let mut lines = training_lines(&records, None);
        // With a history window, train on what the windowed policy sees: one line per turn.
        if let Some(keep) = args.agents.history {
            lines = lines.iter().flat_map(|c| c.windows(keep)).collect();
        }
        write_jsonl_atomic(path, &lines, false)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{} training conversations written to {}",
            lines.len(),
            path.display()
        );
    }
    Ok(())
}
