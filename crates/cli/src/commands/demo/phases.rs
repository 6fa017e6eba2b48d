//! Running the phases: each one's plain commands in this process, from the files the earlier
//! phases left in the report folder.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use teamtune_gridworld::read_records;

use super::argv::{path_str, phase_commands, training_files};
use super::plan::{train_steps, Plan};
use super::{write_atomic, Layout, Phase, REPORT_FILE};
use super::{CONVERSATIONS, CONVERSATIONS_SINGLE, EPISODES, EVAL_BASE, EVAL_TUNED, RUN};
use crate::commands;
use crate::commands::plain::{run_plain, shell_line, words};

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

pub(super) const TRAIN_FACTS: &str = "demo-train.json";

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
    let (_, prepared) = commands::train::prepare_data(&data, &assets, &plan.recipe, None)
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

pub(super) fn run_phase(plan: &Plan, l: &Layout, phase: Phase) -> anyhow::Result<()> {
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
            need(
                &l.p(RUN).join(teamtune_formats::METRICS_FILE),
                phase,
                Phase::Train,
                &l.out,
            )?;
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
            super::report::write(plan, l, episode)?;
            println!("report: {}", l.p(REPORT_FILE).display());
        }
    }
    Ok(())
}

/// The tuned episode to draw: the highest final score among the tasks with more than one agent
/// if any scored, else overall; ties go to the first.
pub(super) fn best_episode(path: &Path) -> anyhow::Result<usize> {
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
