//! What the demo runs, decided from the budget by fixed formulas before anything runs, and
//! saved as `plan.json`.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::{write_atomic, Args};
use crate::commands::recipe::Recipe;

/// The version tag of plan.json.
/// The demo's longest training conversation in tokens, unless `--max-len` says otherwise.
pub const DEMO_MAX_LEN: usize = 1024;

pub const PLAN_FORMAT: &str = "teamtune-demo-plan/2";

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
            max_len: Some(args.max_len.unwrap_or(DEMO_MAX_LEN)),
            max_tokens: args.max_len.unwrap_or(DEMO_MAX_LEN),
            // The step count decides; epochs only cap it.
            epochs: 3,
            decision_weight: args.decision_weight.unwrap_or(1.0),
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
    pub(super) fn history_flags(&self) -> Vec<String> {
        match self.history {
            Some(n) => vec!["--history".into(), n.to_string()],
            None => Vec::new(),
        }
    }

    /// `--model M --device D --dtype T` as plain flags (the model left out when default).
    pub(super) fn model_flags(&self) -> Vec<String> {
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
pub(super) fn split_by_agents(task: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let specs = crate::commands::play::registry(None)?.select(task)?;
    let (single, multi): (Vec<_>, Vec<_>) =
        specs.iter().partition(|s| s.agents.iter().all(|&n| n == 1));
    let ids = |v: Vec<&teamtune_gridworld::TaskSpec>| v.iter().map(|s| s.id.clone()).collect();
    Ok((ids(single), ids(multi)))
}
