//! `teamtune collect`: many episodes, their records, and the training conversations in them.

use std::path::PathBuf;

use anyhow::{bail, Context};
use teamtune_gridworld::{append_records, play_expert, training_lines, write_jsonl_atomic};

use super::play::registry;

#[derive(clap::Args)]
pub struct Args {
    /// Who plays. `expert` (scripted); model-driven policies come with the agent runtime.
    #[arg(long, default_value = "expert")]
    pub policy: String,
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
    /// the data loader's input) to this JSON Lines file.
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
    if args.policy != "expert" {
        bail!(
            "unknown policy `{}` (this build collects with: expert)",
            args.policy
        );
    }
    let specs = registry(args.tasks.as_ref())?.select(&args.task)?;
    let mut records = Vec::new();
    let mut pruned = 0usize;
    for spec in &specs {
        let mut total = 0.0;
        for k in 0..args.episodes {
            let ep = play_expert(spec, args.seed + k)
                .with_context(|| format!("task {} seed {}", spec.id, args.seed + k))?;
            let mut record = ep.record();
            record.policy = Some(args.policy.clone());
            total += record.final_score;
            if args.min_score.is_some_and(|m| record.final_score < m) {
                pruned += 1;
            } else {
                records.push(record);
            }
        }
        tracing::info!(task = %spec.id, mean_score = total / args.episodes.max(1) as f64, "collected");
    }
    append_records(&args.out, &records)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{} episodes written to {} ({pruned} pruned below {:?})",
        records.len(),
        args.out.display(),
        args.min_score
    );
    if let Some(path) = &args.training_out {
        let lines = training_lines(&records, None);
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
