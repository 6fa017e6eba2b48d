//! Per-task results of a set of played episodes: what `teamtune eval` writes and prints, and
//! what `teamtune compare` reads back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::runner::PlayedEpisode;

/// Version tag of [`EvalReport`] files.
pub use teamtune_formats::EVAL_FORMAT;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub episodes: usize,
    pub mean_score: f64,
    /// Sample standard deviation of the scores (0 for one episode).
    pub std_score: f64,
    pub min_score: f64,
    pub max_score: f64,
    /// Share of episodes that reached 100.
    pub success_rate: f64,
    /// Share of turns whose reply the world could not use.
    pub invalid_reply_rate: f64,
    pub turns: usize,
    pub avg_turns: f64,
    pub generated_tokens: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub format: String,
    /// Who played (`expert`, `model:<name>[+adapter]`, `openai:<model>`).
    pub policy: String,
    /// Free-form run settings (model, adapter, seed, decoding) for the record.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    pub tasks: Vec<TaskResult>,
    /// Mean over tasks of the per-task mean score (each task weighs the same).
    pub mean_score: f64,
    pub invalid_reply_rate: f64,
    pub wall_seconds: f64,
}

impl EvalReport {
    /// Aggregates `played` per task, tasks in first-seen order.
    pub fn new(policy: &str, played: &[PlayedEpisode], wall_seconds: f64) -> Self {
        let mut order: Vec<String> = Vec::new();
        let mut by_task: BTreeMap<String, Vec<&PlayedEpisode>> = BTreeMap::new();
        for p in played {
            if !by_task.contains_key(&p.record.task) {
                order.push(p.record.task.clone());
            }
            by_task.entry(p.record.task.clone()).or_default().push(p);
        }
        let tasks: Vec<TaskResult> = order.iter().map(|t| task_result(t, &by_task[t])).collect();
        let turns: usize = tasks.iter().map(|t| t.turns).sum();
        let invalid: f64 = tasks
            .iter()
            .map(|t| t.invalid_reply_rate * t.turns as f64)
            .sum();
        EvalReport {
            format: EVAL_FORMAT.into(),
            policy: policy.into(),
            settings: BTreeMap::new(),
            mean_score: mean(&tasks.iter().map(|t| t.mean_score).collect::<Vec<_>>()),
            invalid_reply_rate: if turns == 0 {
                0.0
            } else {
                invalid / turns as f64
            },
            tasks,
            wall_seconds,
        }
    }

    /// A fixed-width table: one row per task and a mean row.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<22} {:>3} {:>7} {:>6} {:>8} {:>8} {:>7} {:>9} {:>8}\n",
            "task", "n", "score", "std", "success", "invalid", "turns", "tokens", "seconds"
        );
        for t in &self.tasks {
            s += &format!(
                "{:<22} {:>3} {:>7.1} {:>6.1} {:>7.0}% {:>7.1}% {:>7.1} {:>9} {:>8.1}\n",
                t.task,
                t.episodes,
                t.mean_score,
                t.std_score,
                100.0 * t.success_rate,
                100.0 * t.invalid_reply_rate,
                t.avg_turns,
                t.generated_tokens,
                t.seconds
            );
        }
        s += &format!(
            "{:<22} {:>3} {:>7.1} {:>6} {:>8} {:>7.1}% {:>7} {:>9} {:>8.1}\n",
            "mean",
            "",
            self.mean_score,
            "",
            "",
            100.0 * self.invalid_reply_rate,
            "",
            self.tasks.iter().map(|t| t.generated_tokens).sum::<usize>(),
            self.wall_seconds
        );
        s
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn task_result(task: &str, eps: &[&PlayedEpisode]) -> TaskResult {
    let scores: Vec<f64> = eps.iter().map(|p| p.record.final_score).collect();
    let m = mean(&scores);
    let var = if scores.len() > 1 {
        scores.iter().map(|s| (s - m).powi(2)).sum::<f64>() / (scores.len() - 1) as f64
    } else {
        0.0
    };
    let turns: usize = eps.iter().map(|p| p.record.turns.len()).sum();
    let invalid: usize = eps.iter().map(|p| p.record.invalid_replies()).sum();
    TaskResult {
        task: task.into(),
        episodes: eps.len(),
        mean_score: m,
        std_score: var.sqrt(),
        min_score: scores.iter().cloned().fold(f64::INFINITY, f64::min),
        max_score: scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        success_rate: scores.iter().filter(|&&s| s >= 100.0).count() as f64 / eps.len() as f64,
        invalid_reply_rate: if turns == 0 {
            0.0
        } else {
            invalid as f64 / turns as f64
        },
        turns,
        avg_turns: turns as f64 / eps.len() as f64,
        generated_tokens: eps.iter().map(|p| p.generated_tokens).sum(),
        seconds: eps.iter().map(|p| p.seconds).sum(),
    }
}
