//! `teamtune improve`'s record, `improve.json`, as types, and what is written from it: the
//! per-round score table as plain text (stdout) and the folder's report.md.
//!
//! The cli plays, trains and evaluates; after each finished round it fills an [`ImproveRound`]
//! from the round's files and writes the whole [`ImproveLog`] again. A round is in the log only
//! once its evaluation is done, so the log is also where a resumed run starts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::scoreboard::MEAN_LABEL;

/// The version tag of improve.json.
pub const IMPROVE_FORMAT: &str = "teamtune-improve/1";
pub const IMPROVE_FILE: &str = "improve.json";

/// Everything a run of `teamtune improve` has finished, in its folder's improve.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImproveLog {
    pub format: String,
    /// The settings the rounds depend on, by flag name (`min_score`, `seed`, ...): a run in the
    /// same folder must have the same ones.
    pub settings: BTreeMap<String, Value>,
    /// The tasks played and evaluated, in order.
    pub tasks: Vec<String>,
    /// Round 0: the adapter the run started from, on the evaluation seeds.
    pub start: Option<RoundEval>,
    /// The finished rounds, 1 first.
    pub rounds: Vec<ImproveRound>,
}

/// One adapter evaluated on the fixed evaluation seeds (constrained, greedy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundEval {
    /// Mean final score per task, in the log's task order.
    pub scores: Vec<TaskMean>,
    /// Unweighted mean over the tasks.
    pub mean: f64,
    /// Share (0..1) of turns whose reply the world could not use.
    pub invalid_reply_rate: f64,
    pub wall_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMean {
    pub task: String,
    pub score: f64,
}

/// One finished round: where its training data came from, its training, its evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImproveRound {
    pub round: usize,
    /// Episode k of a task was played on seed `play_seed + k`, by the model and, where it fell
    /// back, by the experts.
    pub play_seed: u64,
    pub tasks: Vec<RoundTask>,
    /// Training conversations in the round's data (the model's kept ones and the experts').
    pub conversations: usize,
    /// Optimizer steps the adapter was trained further.
    pub steps: usize,
    /// Validation loss at the first and last evaluation of the round's training, if any.
    pub validation_loss: Option<(f64, f64)>,
    pub eval: RoundEval,
    pub wall_seconds: f64,
}

/// Where one task's data came from in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTask {
    pub task: String,
    /// Episodes the model played (at the round's temperature).
    pub played: usize,
    /// Of those, the ones scoring at least the threshold: their conversations were kept.
    pub model_kept: usize,
    /// Mean final score of the model's episodes.
    pub model_mean: f64,
    /// The model kept none, so the experts played this task's seeds.
    pub expert_fallback: bool,
    /// Expert episodes kept (at least the threshold) when it fell back.
    pub expert_kept: usize,
}

impl ImproveLog {
    pub fn new(settings: BTreeMap<String, Value>, tasks: Vec<String>) -> Self {
        ImproveLog {
            format: IMPROVE_FORMAT.into(),
            settings,
            tasks,
            start: None,
            rounds: Vec::new(),
        }
    }

    /// Rows of (round label, its evaluation): the start, then every finished round.
    fn rows(&self) -> Vec<(String, &RoundEval)> {
        let mut rows = Vec::new();
        if let Some(s) = &self.start {
            rows.push(("0 (start)".to_owned(), s));
        }
        for r in &self.rounds {
            rows.push((r.round.to_string(), &r.eval));
        }
        rows
    }

    fn score_of(eval: &RoundEval, task: &str) -> String {
        eval.scores
            .iter()
            .find(|s| s.task == task)
            .map_or("-".to_owned(), |s| format!("{:.1}", s.score))
    }

    /// The per-round score table as aligned plain text: a row per round (0 is the adapter the
    /// run started from), a column per task and the mean.
    pub fn table(&self) -> String {
        let mut header = vec!["round".to_owned()];
        header.extend(self.tasks.iter().cloned());
        header.push(MEAN_LABEL.to_owned());
        let mut lines = vec![header];
        for (label, eval) in self.rows() {
            let mut row = vec![label];
            row.extend(self.tasks.iter().map(|t| Self::score_of(eval, t)));
            row.push(format!("{:.1}", eval.mean));
            lines.push(row);
        }
        let widths: Vec<usize> = (0..lines[0].len())
            .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
            .collect();
        let mut s = String::new();
        for l in &lines {
            let cells: Vec<String> = l
                .iter()
                .enumerate()
                .map(|(c, cell)| match c {
                    0 => format!("{cell:<w$}", w = widths[c]),
                    _ => format!("{cell:>w$}", w = widths[c]),
                })
                .collect();
            let _ = writeln!(s, "{}", cells.join("  ").trim_end());
        }
        s
    }

    /// Where one round's data came from, task by task, in plain words.
    pub fn sources(round: &ImproveRound, min_score: f64) -> Vec<String> {
        round
            .tasks
            .iter()
            .map(|t| {
                let model = format!(
                    "{}: the model kept {} of {} episodes (mean {:.1})",
                    t.task, t.model_kept, t.played, t.model_mean
                );
                match (t.expert_fallback, t.expert_kept) {
                    (false, _) => model,
                    (true, 0) => format!(
                        "{model}; no episode at or above {min_score}, and the experts' neither: \
                         no data for this task"
                    ),
                    (true, k) => format!(
                        "{model}; no episode at or above {min_score}, so the experts' {k} \
                         episodes on the same seeds were used"
                    ),
                }
            })
            .collect()
    }

    /// report.md: the per-round table, then per round where its data came from and how it
    /// trained; `commands` are (round label, its plain commands as shell lines).
    pub fn markdown(&self, min_score: f64, commands: &[(String, Vec<String>)]) -> String {
        let mut s = String::from("# teamtune improve\n\n");
        let _ = writeln!(
            s,
            "Each round the adapter plays every task at a temperature on fresh seeds, the \
             episodes scoring at least {min_score} are kept (the experts' for a task where the \
             model kept none), the adapter is trained further on them and evaluated on the \
             same seeds as round 0 (constrained, greedy).\n"
        );
        let _ = writeln!(s, "## Scores per round\n");
        let mut header = vec!["round".to_owned()];
        header.extend(self.tasks.iter().cloned());
        header.push(MEAN_LABEL.to_owned());
        let _ = writeln!(s, "| {} |", header.join(" | "));
        let _ = writeln!(
            s,
            "|{}",
            std::iter::once("---|")
                .chain(std::iter::repeat_n("---:|", header.len() - 1))
                .collect::<String>()
        );
        for (label, eval) in self.rows() {
            let mut row = vec![label];
            row.extend(self.tasks.iter().map(|t| Self::score_of(eval, t)));
            row.push(format!("**{:.1}**", eval.mean));
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        let _ = writeln!(s, "\n## Where each round's data came from\n");
        for r in &self.rounds {
            let _ = writeln!(
                s,
                "Round {} (seeds from {}): {} training conversations, {} steps{}.\n",
                r.round,
                r.play_seed,
                r.conversations,
                r.steps,
                r.validation_loss.map_or(String::new(), |(a, b)| format!(
                    ", validation loss {a:.4} -> {b:.4}"
                ))
            );
            for line in Self::sources(r, min_score) {
                let _ = writeln!(s, "- {line}");
            }
            s.push('\n');
        }
        if !commands.is_empty() {
            let _ = writeln!(s, "## Commands\n");
            for (label, lines) in commands {
                let _ = writeln!(s, "{label}:\n\n```sh");
                for l in lines {
                    let _ = writeln!(s, "{l}");
                }
                let _ = writeln!(s, "```\n");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(scores: &[(&str, f64)]) -> RoundEval {
        RoundEval {
            scores: scores
                .iter()
                .map(|(t, s)| TaskMean {
                    task: t.to_string(),
                    score: *s,
                })
                .collect(),
            mean: scores.iter().map(|(_, s)| s).sum::<f64>() / scores.len() as f64,
            invalid_reply_rate: 0.0,
            wall_seconds: 1.0,
        }
    }

    fn log() -> ImproveLog {
        let mut log = ImproveLog::new(BTreeMap::new(), vec!["corners".into(), "multi_pick".into()]);
        log.start = Some(eval(&[("corners", 25.0), ("multi_pick", 0.0)]));
        log.rounds.push(ImproveRound {
            round: 1,
            play_seed: 2_000_000,
            tasks: vec![
                RoundTask {
                    task: "corners".into(),
                    played: 4,
                    model_kept: 3,
                    model_mean: 62.5,
                    expert_fallback: false,
                    expert_kept: 0,
                },
                RoundTask {
                    task: "multi_pick".into(),
                    played: 4,
                    model_kept: 0,
                    model_mean: 10.0,
                    expert_fallback: true,
                    expert_kept: 4,
                },
            ],
            conversations: 40,
            steps: 8,
            validation_loss: Some((0.5, 0.25)),
            eval: eval(&[("corners", 75.0), ("multi_pick", 33.3)]),
            wall_seconds: 10.0,
        });
        log
    }

    #[test]
    fn the_table_has_a_row_per_round_and_a_column_per_task() {
        let t = log().table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[0].starts_with("round") && lines[0].ends_with("mean"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("0 (start)") && lines[1].ends_with("12.5"),
            "{t}"
        );
        assert!(
            lines[2].contains("75.0") && lines[2].contains("33.3"),
            "{t}"
        );
        assert!(!t.contains('{') && !t.contains("Some("), "{t}");
    }

    #[test]
    fn the_report_says_where_each_task_s_data_came_from() {
        let md = log().markdown(50.0, &[("round 1".into(), vec!["teamtune train".into()])]);
        assert!(
            md.contains("| round | corners | multi_pick | mean |"),
            "{md}"
        );
        assert!(md.contains("| 1 | 75.0 | 33.3 | **54.1** |"), "{md}");
        assert!(
            md.contains("corners: the model kept 3 of 4 episodes (mean 62.5)\n"),
            "{md}"
        );
        assert!(
            md.contains("multi_pick: the model kept 0 of 4 episodes (mean 10.0); no episode at or above 50, so the experts' 4 episodes"),
            "{md}"
        );
        assert!(md.contains("validation loss 0.5000 -> 0.2500"), "{md}");
        assert!(md.contains("```sh\nteamtune train\n```"), "{md}");
    }

    #[test]
    fn the_log_reads_back_as_written() {
        let l = log();
        let text = serde_json::to_string_pretty(&l).unwrap();
        assert_eq!(serde_json::from_str::<ImproveLog>(&text).unwrap(), l);
    }
}
