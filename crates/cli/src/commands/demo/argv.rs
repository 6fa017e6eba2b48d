//! The plain `teamtune` commands of each phase, as argument lists: what runs and what report.md
//! prints.

use std::path::{Path, PathBuf};

use super::plan::{split_by_agents, Plan};
use super::{Layout, Phase};
use super::{
    CONVERSATIONS, CONVERSATIONS_SINGLE, EPISODES, EVAL_BASE, EVAL_TUNED, EVAL_UNCONSTRAINED, RUN,
};

pub(super) use crate::commands::plain::{shell_line, words};

pub(super) fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// The commands of each phase, in order (the train phase's step count comes from its data, so
/// `train_steps` is needed to write its command).
pub(super) fn phase_commands(
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
            if r.decision_weight != 1.0 {
                c.extend(["--decision-weight".into(), format!("{}", r.decision_weight)]);
            }
            if let Some(max_len) = r.max_len {
                c.extend(["--max-len".into(), max_len.to_string()]);
            }
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

/// The training conversation files the collect phase wrote (multi-agent tasks first).
pub(super) fn training_files(l: &Layout) -> Vec<PathBuf> {
    [CONVERSATIONS, CONVERSATIONS_SINGLE]
        .iter()
        .map(|f| l.p(f))
        .filter(|p| p.is_file())
        .collect()
}
