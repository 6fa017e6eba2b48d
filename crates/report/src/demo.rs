//! The `report.md` of `teamtune demo`: scores of the base and the tuned model side by side, the
//! training recipe and losses, the data, wall time per phase, one tuned episode, the files and
//! the plain commands that ran.
//!
//! [`DemoReport`] is a plain input: the cli reads the demo folder's files (its plan, the expert
//! episodes, the training facts) and fills it; this module only writes Markdown. It knows
//! nothing of models, grid worlds or command-line parsing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::eval::EvalResults;
use crate::markdown::score_table;
use crate::metrics::RunMetrics;
use crate::reference::STUDY;

/// Everything report.md says, gathered by the demo.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    /// The model as the report names it (a path, a hub id, or a description of the default).
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub seed: u64,
    pub budget_minutes: f64,
    /// History window (system + last N messages) of collection and evaluation; `None`: whole
    /// conversations.
    pub history: Option<usize>,
    /// Constrained evaluation episodes per task (seeds `seed..seed + eval_episodes`).
    pub eval_episodes: u64,
    /// First seed of the expert episodes.
    pub collect_seed: u64,
    /// Expert episodes played per multi-agent task.
    pub collect_episodes: u64,
    /// Expert episodes played per single-agent task.
    pub collect_episodes_single: u64,
    pub base: EvalResults,
    pub tuned: EvalResults,
    /// The base model's unconstrained run, when there was one.
    pub unconstrained: Option<DemoUnconstrained>,
    pub recipe: DemoRecipe,
    pub training: DemoTraining,
    /// The training run's metrics.
    pub metrics: RunMetrics,
    /// (task, final score) of every expert episode kept, in file order.
    pub expert_episodes: Vec<(String, f64)>,
    /// (phase, wall seconds) of the phases that have a time, in phase order.
    pub phase_seconds: Vec<(String, f64)>,
    pub assumptions: DemoAssumptions,
    /// The tuned episode drawn as episode.png (its index in eval-tuned/episodes.jsonl).
    pub episode_index: usize,
    pub episode: Option<DemoEpisode>,
    /// The report folder, as `--out` names it.
    pub out: String,
    /// (phase, its plain commands as shell lines), in phase order.
    pub commands: Vec<(String, Vec<String>)>,
}

/// The base model's unconstrained evaluation (its invalid-reply rate).
#[derive(Debug, Clone, PartialEq)]
pub struct DemoUnconstrained {
    pub results: EvalResults,
    /// Episodes per task.
    pub episodes: u64,
    /// The tasks it played (`all` or a comma-separated list).
    pub task: String,
    pub max_new_tokens: usize,
}

/// The training settings the report states.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoRecipe {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<String>,
    pub lr: f64,
    pub warmup: f64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub batch_size: usize,
    pub max_len: usize,
    pub min_score: f64,
    pub validation_fraction: f64,
}

/// What the train phase found in its data and ran.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoTraining {
    pub steps: usize,
    pub train_conversations: usize,
    pub validation_conversations: usize,
    pub train_tokens: usize,
    pub train_trained_tokens: usize,
    pub validation_tokens: usize,
    pub mean_train_len: f64,
    pub cut_conversations: usize,
    pub per_task_train: BTreeMap<String, usize>,
}

/// The fixed assumptions the plan's amounts follow from.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoAssumptions {
    pub train_tokens_per_s: f64,
    /// Share of the budget for training.
    pub train_share: f64,
    /// Tokens the training may process.
    pub train_tokens: u64,
    pub seconds_per_turn: f64,
    pub turns_per_episode_set: f64,
    /// Share of the budget for each constrained evaluation.
    pub eval_share: f64,
}

/// The tuned episode the report shows.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoEpisode {
    pub task: String,
    pub seed: u64,
    pub final_score: f64,
}

/// `m:ss` of a number of seconds, rounded.
pub fn mmss(s: f64) -> String {
    let s = s.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

impl DemoReport {
    /// report.md.
    pub fn render(&self) -> String {
        let mut s = String::new();
        self.write(&mut s)
            .expect("writing into a String cannot fail");
        s
    }

    fn write(&self, w: &mut String) -> std::fmt::Result {
        let (base, tuned) = (&self.base, &self.tuned);
        writeln!(w, "# teamtune demo report\n")?;
        writeln!(
            w,
            "Model {} on `{}` ({}), seed {}, budget {} minutes. Base and tuned are evaluated \
             on the same episodes (seeds {}..{} of every task), schema-constrained and greedy, \
             with {}; the expert training episodes use other seeds ({}..) and the same window.\n",
            self.model,
            self.device,
            self.dtype,
            self.seed,
            self.budget_minutes,
            self.seed,
            self.seed + self.eval_episodes - 1,
            match self.history {
                Some(1) =>
                    "the system message and the current user message as the prompt".to_owned(),
                Some(n) => format!("the system message and the last {n} messages as the prompt"),
                None => "whole conversations as the prompt".to_owned(),
            },
            self.collect_seed
        )?;

        writeln!(
            w,
            "## Scores (mean over {} episodes per task)\n",
            self.eval_episodes
        )?;
        writeln!(
            w,
            "{}",
            score_table(&[base, tuned], &["base", "tuned"], &STUDY)
        )?;
        let changed = |better: bool| -> Vec<String> {
            tuned
                .tasks
                .iter()
                .filter_map(|t| {
                    let b = base.task(&t.task)?.mean_score;
                    let kept = if better {
                        t.mean_score > b
                    } else {
                        t.mean_score < b
                    };
                    kept.then(|| format!("{} ({:.1} -> {:.1})", t.task, b, t.mean_score))
                })
                .collect()
        };
        let (improved, worse) = (changed(true), changed(false));
        let (bm, tm) = (base.mean_over_tasks(), tuned.mean_over_tasks());
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        writeln!(
            w,
            "Mean over tasks: base {bm:.1}, tuned {tm:.1} ({:+.1}). Improved: {}. Worse: {}.\n",
            tm - bm,
            list(improved),
            list(worse),
        )?;
        if let Some(u) = &self.unconstrained {
            let r = &u.results;
            let inv = r.invalid_reply_rate.unwrap_or_else(|| {
                let v: Vec<f64> = r.tasks.iter().map(|t| t.invalid_reply_rate).collect();
                v.iter().sum::<f64>() / v.len().max(1) as f64
            });
            writeln!(
                w,
                "Unconstrained, the base model's replies are unusable {:.1}% of the time ({} \
                 episode(s) of {}, at most {} new tokens; mean score {:.1}): the constrained \
                 comparison above measures the policy, not the JSON format.\n",
                100.0 * inv,
                u.episodes,
                u.task,
                u.max_new_tokens,
                r.mean_over_tasks()
            )?;
        }
        writeln!(w, "![scores](scores.png)\n")?;

        self.write_training(w)?;
        self.write_data(w)?;
        self.write_times(w)?;

        writeln!(w, "## One tuned episode\n")?;
        if let Some(e) = &self.episode {
            writeln!(
                w,
                "Episode {} of eval-tuned/episodes.jsonl: {} seed {}, final score {}.\n",
                self.episode_index, e.task, e.seed, e.final_score
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
            self.out
        )?;
        writeln!(w, "```sh")?;
        for (phase, lines) in &self.commands {
            writeln!(w, "# {phase}")?;
            for line in lines {
                writeln!(w, "{line}")?;
            }
        }
        writeln!(w, "```")?;
        Ok(())
    }

    fn write_training(&self, w: &mut String) -> std::fmt::Result {
        writeln!(w, "## Training\n")?;
        let r = &self.recipe;
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
            self.training.steps,
            r.max_len
        )?;
        let metrics = &self.metrics;
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
        writeln!(w, "![loss](loss.png)\n")
    }

    fn write_data(&self, w: &mut String) -> std::fmt::Result {
        writeln!(w, "## Data\n")?;
        let (r, t) = (&self.recipe, &self.training);
        let mut per_task: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
        for (task, score) in &self.expert_episodes {
            let e = per_task.entry(task.as_str()).or_default();
            e.0 += 1;
            e.1 += score;
        }
        writeln!(
            w,
            "{} expert episodes kept (score >= {}; {} per multi-agent task and {} per single-agent \
             task played, seeds from {}), {} training \
             conversations and {} validation conversations (split by conversation, {}), {} training \
             tokens ({} of them trained assistant tokens), {} validation tokens, mean training \
             conversation {:.0} tokens ({} cut at {}).\n",
            self.expert_episodes.len(),
            r.min_score,
            self.collect_episodes,
            self.collect_episodes_single,
            self.collect_seed,
            t.train_conversations,
            t.validation_conversations,
            r.validation_fraction,
            t.train_tokens,
            t.train_trained_tokens,
            t.validation_tokens,
            t.mean_train_len,
            t.cut_conversations,
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
                t.per_task_train.get(*task).copied().unwrap_or(0)
            )?;
        }
        writeln!(w)
    }

    fn write_times(&self, w: &mut String) -> std::fmt::Result {
        writeln!(w, "## Time per phase\n")?;
        writeln!(w, "| phase | wall time (m:s) |\n|---|---:|")?;
        let mut total = 0.0;
        for (phase, t) in &self.phase_seconds {
            total += t;
            writeln!(w, "| {phase} | {} |", mmss(*t))?;
        }
        writeln!(w, "| total | {} |\n", mmss(total))?;
        let a = &self.assumptions;
        writeln!(
            w,
            "Wall times are reported, never used to decide what runs: the amounts above follow from \
             the budget by fixed formulas (plan.json) that assume an idle 2-core CPU: {} training \
             tokens/s ({}% of the budget, {} tokens), {} s per batched agent turn and {} turns per \
             set of seven episodes ({}% of the budget per evaluation). On a busy or faster machine \
             the same plan runs, in more or less time.\n",
            a.train_tokens_per_s,
            100.0 * a.train_share,
            a.train_tokens,
            a.seconds_per_turn,
            a.turns_per_episode_set,
            100.0 * a.eval_share
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::eval::TaskScore;
    use crate::metrics::{EvalPoint, TrainPoint};

    fn eval(name: &str, scores: &[(&str, f64)]) -> EvalResults {
        EvalResults {
            name: name.into(),
            path: PathBuf::from(format!("{name}/eval.json")),
            policy: "model".into(),
            settings: serde_json::Value::Null,
            tasks: scores
                .iter()
                .map(|&(task, mean_score)| TaskScore {
                    task: task.into(),
                    episodes: 1,
                    mean_score,
                    std_score: 0.0,
                    success_rate: 0.0,
                    invalid_reply_rate: 0.25,
                    min_score: None,
                    max_score: None,
                    turns: None,
                    avg_turns: None,
                    generated_tokens: None,
                    seconds: None,
                })
                .collect(),
            mean_score: None,
            invalid_reply_rate: None,
            wall_seconds: None,
        }
    }

    fn report() -> DemoReport {
        let train = |step, loss| TrainPoint {
            step,
            epoch: None,
            loss,
            lr: None,
            grad_norm: None,
            trained_tokens: None,
            tokens_per_s: None,
            peak_memory_mb: None,
        };
        let point = |step, eval_loss| EvalPoint {
            step,
            epoch: None,
            eval_loss,
        };
        DemoReport {
            model: "tiny".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            seed: 5,
            budget_minutes: 1.0,
            history: Some(1),
            eval_episodes: 2,
            collect_seed: 1_000_005,
            collect_episodes: 4,
            collect_episodes_single: 12,
            base: eval("base", &[("single_nav", 10.0), ("corners", 50.0)]),
            tuned: eval("tuned", &[("single_nav", 40.0), ("corners", 20.0)]),
            unconstrained: Some(DemoUnconstrained {
                results: eval("unconstrained", &[("single_nav", 0.0)]),
                episodes: 1,
                task: "single_nav".into(),
                max_new_tokens: 80,
            }),
            recipe: DemoRecipe {
                rank: 8,
                alpha: 16.0,
                dropout: 0.2,
                targets: vec!["q_proj".into(), "v_proj".into()],
                lr: 1e-3,
                warmup: 0.15,
                min_lr_ratio: 0.05,
                weight_decay: 0.03,
                clip: 0.3,
                batch_size: 2,
                max_len: 1024,
                min_score: 50.0,
                validation_fraction: 0.1,
            },
            training: DemoTraining {
                steps: 3,
                train_conversations: 9,
                validation_conversations: 1,
                train_tokens: 900,
                train_trained_tokens: 300,
                validation_tokens: 100,
                mean_train_len: 100.0,
                cut_conversations: 0,
                per_task_train: [("single_nav".to_owned(), 9)].into_iter().collect(),
            },
            metrics: RunMetrics {
                name: "run".into(),
                path: PathBuf::from("run/metrics.jsonl"),
                train: vec![train(1, 2.5), train(3, 1.25)],
                eval: vec![point(0, 3.0), point(3, 2.0)],
                continued: false,
            },
            expert_episodes: vec![("single_nav".into(), 100.0), ("single_nav".into(), 60.0)],
            phase_seconds: vec![("collect".into(), 1.2), ("train".into(), 61.0)],
            assumptions: DemoAssumptions {
                train_tokens_per_s: 70.0,
                train_share: 0.45,
                train_tokens: 1890,
                seconds_per_turn: 1.7,
                turns_per_episode_set: 250.0,
                eval_share: 0.24,
            },
            episode_index: 1,
            episode: Some(DemoEpisode {
                task: "corners".into(),
                seed: 6,
                final_score: 75.0,
            }),
            out: "demo".into(),
            commands: vec![
                (
                    "collect".into(),
                    vec!["teamtune collect --task single_nav".into()],
                ),
                ("train".into(), vec!["teamtune train --lr 0.001".into()]),
            ],
        }
    }

    #[test]
    fn the_report_states_its_inputs() {
        let md = report().render();
        assert!(
            md.starts_with(
                "# teamtune demo report\n\nModel tiny on `cpu` (f32), seed 5, budget 1 minutes."
            ),
            "{md}"
        );
        assert!(md.contains("(seeds 5..6 of every task)"), "{md}");
        assert!(md.contains("the system message and the current user message as the prompt"));
        assert!(
            md.contains("## Scores (mean over 2 episodes per task)"),
            "{md}"
        );
        assert!(
            md.contains("Mean over tasks: base 30.0, tuned 30.0 (+0.0). Improved: single_nav (10.0 -> 40.0). Worse: corners (50.0 -> 20.0)."),
            "{md}"
        );
        assert!(
            md.contains(
                "unusable 25.0% of the time (1 episode(s) of single_nav, at most 80 new tokens"
            ),
            "{md}"
        );
        assert!(md.contains("LoRA r 8 alpha 16 dropout 0.2 on q_proj, v_proj (the study's adapter); peak lr 0.001 with 15% warm-up"), "{md}");
        assert!(
            md.contains("| validation, step 0 (base model) | 3.0000 |"),
            "{md}"
        );
        assert!(
            md.contains("| validation, step 3 (tuned) | 2.0000 |"),
            "{md}"
        );
        assert!(md.contains("| train, last step | 1.2500 |"), "{md}");
        assert!(md.contains("2 expert episodes kept (score >= 50; 4 per multi-agent task and 12 per single-agent"), "{md}");
        assert!(md.contains("| single_nav | 2 | 80.0 | 9 |"), "{md}");
        assert!(
            md.contains("| collect | 0:01 |\n| train | 1:01 |\n| total | 1:02 |"),
            "{md}"
        );
        assert!(
            md.contains("Episode 1 of eval-tuned/episodes.jsonl: corners seed 6, final score 75."),
            "{md}"
        );
        assert!(
            md.contains("`teamtune demo --out demo --only <phase>`"),
            "{md}"
        );
        assert!(md.ends_with("```sh\n# collect\nteamtune collect --task single_nav\n# train\nteamtune train --lr 0.001\n```\n"), "{md}");
        assert_eq!(mmss(59.6), "1:00");
    }
}
