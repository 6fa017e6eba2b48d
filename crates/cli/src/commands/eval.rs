//! `teamtune eval`: play every task N times with a policy and report per-task results; with
//! `--shard K/N` only the K-th slice of those episodes, and with `--merge` the shards' folders
//! combined into the unsharded run's files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use teamtune_agents::{
    merge_shards, plan, run_episodes, EvalReport, RunIdentity, RunOptions, ShardEpisode,
    ShardManifest,
};
use teamtune_formats::SHARD_FORMAT;
use teamtune_gridworld::write_jsonl_atomic;

use super::play::registry;
use super::policy_args::{check_episodes, PolicyArgs};
use super::shard_args::{check_merge_output, parse_shard, select};

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
    /// Play only shard K of N (K counts from 0, as $SLURM_ARRAY_TASK_ID and
    /// $JOB_COMPLETION_INDEX do): episode i of the plan (tasks in order, each with its seeds)
    /// belongs to shard i mod N. --out then also gets shard.json, which `--merge` reads. Every
    /// other flag must be the same in all N shards.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Merge the output folders of all N shards of one run (any order) into --out: the
    /// eval.json and episodes.jsonl the unsharded run writes, except that wall times are the
    /// shards' added up. Refuses shards of different runs, duplicates and missing shards.
    #[arg(long, value_name = "DIR", num_args = 1..,
          conflicts_with_all = ["shard", "policy", "task", "episodes", "seed", "tasks", "adapter",
                                "temperature", "parallel", "history", "max_new_tokens"])]
    pub merge: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.merge.is_empty() {
        return merge(&args.merge, &args.out);
    }
    let shard = args.shard.as_deref().map(parse_shard).transpose()?;
    check_episodes(args.episodes)?;
    args.agents.check()?;
    // The output folder is made before the episodes are played, so that a path that cannot
    // hold it fails now and not after the work.
    check_out_folder(&args.out)?;
    let specs = registry(args.tasks.as_ref())?.select(&args.task)?;
    let whole = plan(&specs, args.episodes, args.seed);
    let mine = select(&whole, shard, specs.len(), args.episodes)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (mut policy, settings) = args.agents.build(&args.policy, args.seed)?;
    let plans: Vec<_> = mine.iter().map(|(_, p)| p.clone()).collect();
    let started = Instant::now();
    let played = run_episodes(
        policy.as_mut(),
        &plans,
        &RunOptions {
            parallel: args.agents.parallel,
            progress: true,
        },
    )?;
    let wall_seconds = started.elapsed().as_secs_f64();
    let mut report = EvalReport::new(&policy.name(), &played, wall_seconds);
    report.settings.insert("settings".into(), settings);
    report
        .settings
        .insert("seed".into(), serde_json::json!(args.seed));
    report
        .settings
        .insert("episodes".into(), serde_json::json!(args.episodes));
    // What a merge needs to recognise the run: exactly the unsharded run's settings.
    let run_settings = report.settings.clone();
    if let Some(shard) = shard {
        // A shard's own eval.json covers its slice only; say so where tables read it.
        report
            .settings
            .insert("shard".into(), serde_json::json!(shard.to_string()));
    }
    let records: Vec<_> = played.iter().map(|p| p.record.clone()).collect();
    let episodes = args.out.join("episodes.jsonl");
    write_jsonl_atomic(&episodes, &records, false)
        .with_context(|| format!("writing {}", episodes.display()))?;
    let json = args.out.join("eval.json");
    teamtune_formats::write_atomic(&json, &serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let manifest_path = ShardManifest::path(&args.out);
    match shard {
        Some(shard) => {
            let manifest = ShardManifest {
                format: SHARD_FORMAT.into(),
                command: "eval".into(),
                shard,
                run: RunIdentity::new(
                    policy.name(),
                    &specs,
                    args.episodes,
                    args.seed,
                    run_settings,
                )?,
                records: "episodes.jsonl".into(),
                training: None,
                episodes: mine
                    .iter()
                    .zip(&played)
                    .map(|((i, _), p)| ShardEpisode::new(*i, p))
                    .collect(),
                wall_seconds,
            };
            manifest.write(&args.out)?;
        }
        // A whole run in a folder that held a shard: the old shard.json no longer describes it.
        None if manifest_path.exists() => std::fs::remove_file(&manifest_path)
            .with_context(|| format!("removing the stale {}", manifest_path.display()))?,
        None => {}
    }
    print!("{}", report.table());
    println!(
        "results in {}, episodes in {}",
        json.display(),
        episodes.display()
    );
    if let Some(shard) = shard {
        println!(
            "shard {shard}: {} of the run's {} episodes; when all {} shards are done: \
             teamtune eval --merge DIR... --out DIR",
            mine.len(),
            whole.len(),
            shard.count
        );
    }
    Ok(())
}

fn check_out_folder(out: &Path) -> anyhow::Result<()> {
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {} is a file, not a folder for eval.json and episodes.jsonl",
            out.display()
        );
    }
    Ok(())
}

/// `--merge DIR... --out OUT`: the shards' folders as one run.
fn merge(dirs: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    check_merge_output("--out", out, dirs)?;
    check_out_folder(out)?;
    if ShardManifest::path(out).exists() {
        bail!(
            "--out {} holds a shard (shard.json) of another run; merge into another folder",
            out.display()
        );
    }
    let merged = merge_shards("eval", dirs).map_err(|e| anyhow!("--merge: {e}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut report = EvalReport::new(&merged.run.policy, &merged.played, merged.wall_seconds);
    report.settings = merged.run.settings.clone();
    let episodes = out.join("episodes.jsonl");
    write_jsonl_atomic(&episodes, &merged.record_lines, false)
        .with_context(|| format!("writing {}", episodes.display()))?;
    let json = out.join("eval.json");
    teamtune_formats::write_atomic(&json, &serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    print!("{}", report.table());
    println!(
        "{} shards merged ({} episodes; seconds are the shards' added up): results in {}, \
         episodes in {}",
        merged.shards,
        merged.played.len(),
        json.display(),
        episodes.display()
    );
    Ok(())
}
