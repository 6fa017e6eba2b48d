//! `teamtune eval`: play every task N times with a policy and report per-task results.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use teamtune_agents::{plan, run_episodes, EvalReport, RunOptions};
use teamtune_gridworld::write_jsonl_atomic;

use super::play::registry;
use super::policy_args::{check_episodes, PolicyArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Who plays: model (in-process, with --adapter), expert, or openai.
    #[arg(long, default_value = "model")]
    pub policy: String,
    #[command(flatten)]
    pub agents: PolicyArgs,
    /// `all` or a comma-separated list of task ids.
    #[arg(long, default_value = "all")]
    pub task: String,
    /// Episodes per task.
    #[arg(long, default_value_t = 5)]
    pub episodes: u64,
    /// Episode k of a task has seed `seed + k` (the same seeds for every policy).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: eval.json (per-task results) and episodes.jsonl (every episode's record).
    #[arg(long, default_value = "eval")]
    pub out: PathBuf,
    /// A TOML file of extra task variants.
    #[arg(long)]
    pub tasks: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_episodes(args.episodes)?;
    args.agents.check()?;
    // The output folder is made before the episodes are played, so that a path that cannot
    // hold it fails now and not after the work.
    if args.out.exists() && !args.out.is_dir() {
        bail!(
            "--out {} is a file, not a folder for eval.json and episodes.jsonl",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let specs = registry(args.tasks.as_ref())?.select(&args.task)?;
    let (mut policy, settings) = args.agents.build(&args.policy, args.seed)?;
    let plans = plan(&specs, args.episodes, args.seed);
    let started = Instant::now();
    let played = run_episodes(
        policy.as_mut(),
        &plans,
        &RunOptions {
            parallel: args.agents.parallel,
            progress: true,
        },
    )?;
    let mut report = EvalReport::new(&policy.name(), &played, started.elapsed().as_secs_f64());
    report.settings.insert("settings".into(), settings);
    report
        .settings
        .insert("seed".into(), serde_json::json!(args.seed));
    report
        .settings
        .insert("episodes".into(), serde_json::json!(args.episodes));
    let records: Vec<_> = played.iter().map(|p| p.record.clone()).collect();
    let episodes = args.out.join("episodes.jsonl");
    write_jsonl_atomic(&episodes, &records, false)
        .with_context(|| format!("writing {}", episodes.display()))?;
    let json = args.out.join("eval.json");
    teamtune_formats::write_atomic(&json, &serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    print!("{}", report.table());
    println!(
        "results in {}, episodes in {}",
        json.display(),
        episodes.display()
    );
    Ok(())
}
