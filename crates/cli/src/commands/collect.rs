//! `teamtune collect`: many episodes, their records, and the training conversations in them;
//! with `--shard K/N` only the K-th slice of those episodes, and with `--merge` the shards'
//! files combined into what the unsharded run writes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use teamtune_agents::{
    merge_shards, plan, run_episodes, RunIdentity, RunOptions, Shard, ShardEpisode, ShardManifest,
};
use teamtune_formats::SHARD_FORMAT;
use teamtune_gridworld::{append_records, write_jsonl_atomic, EpisodeRecord, TrainingConversation};

use super::play::registry;
use super::policy_args::{check_episodes, PolicyArgs};
use super::shard_args::{check_merge_output, parse_shard, select};

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
    /// Also append the records of the episodes --min-score prunes to this file: what was
    /// played and not kept (`teamtune improve` reports both).
    #[arg(long, requires = "min_score", conflicts_with = "shard")]
    pub pruned_out: Option<PathBuf>,
    /// A TOML file of extra task variants.
    #[arg(long)]
    pub tasks: Option<PathBuf>,
    /// Play only shard K of N (K counts from 0, as $SLURM_ARRAY_TASK_ID and
    /// $JOB_COMPLETION_INDEX do): episode i of the plan (tasks in order, each with its seeds)
    /// belongs to shard i mod N. --out must be a new file, and --training-out must sit in the
    /// same folder, which also gets shard.json for `--merge`: one folder per shard. Every
    /// other flag must be the same in all N shards.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Merge the folders of all N shards of one run (any order): their records appended to
    /// --out and their training lines written to --training-out, exactly as the unsharded run
    /// writes them. Refuses shards of different runs, duplicates and missing shards.
    #[arg(long, value_name = "DIR", num_args = 1..,
          conflicts_with_all = ["shard", "policy", "task", "episodes", "seed", "tasks", "adapter",
                                "temperature", "parallel", "history", "max_new_tokens",
                                "min_score", "pruned_out"])]
    pub merge: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(training) = &args.training_out {
        if teamtune_formats::same_path(training, &args.out) {
            bail!(
                "--training-out and --out are the same file ({}): the training lines would \
                 replace the episode records",
                args.out.display()
            );
        }
    }
    if let Some(pruned) = &args.pruned_out {
        let others = [Some(&args.out), args.training_out.as_ref()];
        if let Some(same) = others
            .into_iter()
            .flatten()
            .find(|p| teamtune_formats::same_path(p, pruned))
        {
            bail!(
                "--pruned-out {} is also where --out or --training-out writes; give it a file \
                 of its own",
                same.display()
            );
        }
    }
    if !args.merge.is_empty() {
        return merge(&args);
    }
    let shard = args.shard.as_deref().map(parse_shard).transpose()?;
    check_episodes(args.episodes)?;
    args.agents.check()?;
    if args.min_score.is_some_and(f64::is_nan) {
        bail!("--min-score must be a number (got NaN)");
    }
    let shard_dir = match shard {
        Some(shard) => Some(check_shard_files(
            shard,
            &args.out,
            args.training_out.as_deref(),
        )?),
        None => None,
    };
    let specs = registry(args.tasks.as_ref())?.select(&args.task)?;
    let whole = plan(&specs, args.episodes, args.seed);
    let mine = select(&whole, shard, specs.len(), args.episodes)?;
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
    let keep = |r: &EpisodeRecord| args.min_score.is_none_or(|m| r.final_score >= m);
    // Records in plan order (tasks in order, each with its seeds), as a merge of shards puts
    // them back.
    let mut records = Vec::new();
    let mut pruned_records = Vec::new();
    for p in &played {
        if keep(&p.record) {
            records.push(p.record.clone());
        } else {
            pruned_records.push(p.record.clone());
        }
    }
    let pruned = pruned_records.len();
    for spec in &specs {
        let scores: Vec<f64> = played
            .iter()
            .filter(|p| p.record.task == spec.id)
            .map(|p| p.record.final_score)
            .collect();
        let mean_score = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        tracing::info!(task = %spec.id, mean_score, "collected");
    }
    append_records(&args.out, &records)
        .with_context(|| format!("writing {}", args.out.display()))?;
    say_written(records.len(), &args.out, pruned, args.min_score);
    if let Some(path) = &args.pruned_out {
        append_records(path, &pruned_records)
            .with_context(|| format!("writing --pruned-out {}", path.display()))?;
    }
    let per_record: Vec<Vec<TrainingConversation>> = records
        .iter()
        .map(|r| training_lines(r, args.agents.history))
        .collect();
    if let Some(path) = &args.training_out {
        let lines: Vec<_> = per_record.iter().flatten().collect();
        write_training(path, &lines)?;
    }
    if let (Some(shard), Some(dir)) = (shard, shard_dir) {
        let mut lines_of = per_record.iter().map(Vec::len);
        let episodes = mine
            .iter()
            .zip(&played)
            .map(|((i, _), p)| {
                let mut e = ShardEpisode::new(*i, p);
                e.kept = keep(&p.record);
                e.training_lines = if e.kept {
                    lines_of.next().expect("one count per kept record")
                } else {
                    0
                };
                e
            })
            .collect();
        let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut run_settings = std::collections::BTreeMap::new();
        run_settings.insert("settings".to_owned(), settings);
        run_settings.insert("min_score".to_owned(), serde_json::json!(args.min_score));
        run_settings.insert("history".to_owned(), serde_json::json!(args.agents.history));
        ShardManifest {
            format: SHARD_FORMAT.into(),
            command: "collect".into(),
            shard,
            run: RunIdentity::new(
                policy.name(),
                &specs,
                args.episodes,
                args.seed,
                run_settings,
            )?,
            records: file_name(&args.out).expect("checked: a file name"),
            training: args.training_out.as_deref().and_then(file_name),
            episodes,
            wall_seconds,
        }
        .write(&dir)?;
        println!(
            "shard {shard}: {} of the run's {} episodes; when all {} shards are done: \
             teamtune collect --merge DIR... --out FILE [--training-out FILE]",
            mine.len(),
            whole.len(),
            shard.count
        );
    }
    Ok(())
}

/// The training conversations of one record: one per agent, or with a history window one per
/// turn cut to what the windowed policy sees.
fn training_lines(record: &EpisodeRecord, history: Option<usize>) -> Vec<TrainingConversation> {
    let lines = record.training_lines();
    match history {
        Some(keep) => lines.iter().flat_map(|c| c.windows(keep)).collect(),
        None => lines,
    }
}

fn say_written(count: usize, out: &Path, pruned: usize, min_score: Option<f64>) {
    match min_score {
        Some(min) => println!(
            "{count} episodes written to {} ({pruned} pruned below {min})",
            out.display()
        ),
        None => println!("{count} episodes written to {}", out.display()),
    }
}

/// A shard's files sit in one folder of their own, with its shard.json, so that the folder is
/// the shard: `--out` is a new file (appending to older records would mix them into the
/// shard), `--training-out` lies beside it, and no other shard is there. Returns the folder.
fn check_shard_files(shard: Shard, out: &Path, training: Option<&Path>) -> anyhow::Result<PathBuf> {
    if out.file_name().is_none() {
        bail!(
            "--out {} must name a file for the shard's records",
            out.display()
        );
    }
    if out.exists() {
        bail!(
            "--out {} exists; with --shard {shard} the records go to a new file (remove it to \
             play the shard again)",
            out.display()
        );
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let Some(training) = training {
        let beside = training.parent().map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        });
        if !beside.is_some_and(|p| teamtune_formats::same_path(p, &dir)) {
            bail!(
                "--training-out {} must be in the folder of --out ({}) with --shard: a shard's \
                 files stay together",
                training.display(),
                dir.display()
            );
        }
    }
    if ShardManifest::path(&dir).exists() {
        bail!(
            "{} already holds a shard (shard.json); give each shard a folder of its own",
            dir.display()
        );
    }
    Ok(dir)
}

/// `--merge DIR... --out FILE [--training-out FILE]`: the shards as one collection.
fn merge(args: &Args) -> anyhow::Result<()> {
    check_merge_output("--out", &args.out, &args.merge)?;
    if let Some(training) = &args.training_out {
        check_merge_output("--training-out", training, &args.merge)?;
    }
    let merged = merge_shards("collect", &args.merge).map_err(|e| anyhow!("--merge: {e}"))?;
    let training = match (&args.training_out, merged.training_lines) {
        (Some(path), Ok(lines)) => Some((path, lines)),
        (Some(_), Err(dir)) => bail!(
            "--training-out: the shard in {} was collected without --training-out, so there \
             are no training lines to merge (merge the records alone, or collect that shard \
             again with --training-out)",
            dir.display()
        ),
        (None, _) => None,
    };
    append_records_raw(&args.out, &merged.record_lines)?;
    let min_score = merged
        .run
        .settings
        .get("min_score")
        .and_then(|v| v.as_f64());
    say_written(
        merged.record_lines.len(),
        &args.out,
        merged.pruned,
        min_score,
    );
    if let Some((path, lines)) = training {
        write_training(path, &lines)?;
    }
    println!("{} shards merged", merged.shards);
    Ok(())
}

fn append_records_raw(
    out: &Path,
    lines: &[Box<serde_json::value::RawValue>],
) -> anyhow::Result<()> {
    write_jsonl_atomic(out, lines, true).with_context(|| format!("writing {}", out.display()))
}

/// Writes the training conversations (one JSON line each) and says how many.
fn write_training<T: serde::Serialize>(path: &std::path::Path, lines: &[T]) -> anyhow::Result<()> {
    write_jsonl_atomic(path, lines, false)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "{} training conversations written to {}",
        lines.len(),
        path.display()
    );
    Ok(())
}
