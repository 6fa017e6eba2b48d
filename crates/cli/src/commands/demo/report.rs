//! report.md: the demo folder's files read into `teamtune_report`'s plain [`DemoReport`],
//! which writes the Markdown.

use anyhow::Context;
use teamtune_gridworld::read_records;
use teamtune_report::{
    DemoAssumptions, DemoEpisode, DemoRecipe, DemoReport, DemoTraining, DemoUnconstrained,
    EvalResults, RunMetrics,
};

use super::argv::{path_str, phase_commands, shell_line, words};
use super::phases::{TrainFacts, TRAIN_FACTS};
use super::plan::{
    Plan, ASSUMED_SECONDS_PER_TURN, ASSUMED_TRAIN_TOKENS_PER_S, ASSUMED_TURNS_PER_EPISODE_SET,
    EVAL_SHARE, TRAIN_SHARE,
};
use super::{read_timings, write_atomic, Layout, Phase, REPORT_FILE, TIMINGS_FILE};
use super::{EPISODES, EVAL_BASE, EVAL_TUNED, EVAL_UNCONSTRAINED, RUN};

/// Writes report.md for the plan's finished phases; `episode` is the tuned episode drawn.
pub(super) fn write(plan: &Plan, l: &Layout, episode: usize) -> anyhow::Result<()> {
    let text = gather(plan, l, episode)?.render();
    write_atomic(&l.p(REPORT_FILE), text.as_bytes())
}

/// What report.md says, read from the report folder.
fn gather(plan: &Plan, l: &Layout, episode: usize) -> anyhow::Result<DemoReport> {
    let base = EvalResults::read(&l.p(EVAL_BASE))?;
    let tuned = EvalResults::read(&l.p(EVAL_TUNED))?;
    let unconstrained = if l.p(EVAL_UNCONSTRAINED).join("eval.json").is_file() {
        Some(DemoUnconstrained {
            results: EvalResults::read(&l.p(EVAL_UNCONSTRAINED))?,
            episodes: plan.unconstrained_episodes,
            task: plan.unconstrained_task.clone(),
            max_new_tokens: plan.unconstrained_max_new_tokens,
        })
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
    let tuned_records = read_records(&l.p(EVAL_TUNED).join("episodes.jsonl"))?;
    let r = &plan.recipe;
    let commands = Phase::ALL
        .iter()
        .map(|&p| {
            let mut commands = if p == Phase::Train {
                vec![facts.command.clone()]
            } else {
                phase_commands(plan, l, p, None)
            };
            if p == Phase::Report {
                commands.push(words(&[
                    "replay",
                    &path_str(&l.p(EVAL_TUNED).join("episodes.jsonl")),
                    "--index",
                    &episode.to_string(),
                    "--png",
                    &path_str(&l.p("episode.png")),
                ]));
            }
            let lines = commands.iter().map(|c| shell_line(c)).collect();
            (p.name().to_owned(), lines)
        })
        .collect();
    Ok(DemoReport {
        model: if plan.model.is_empty() {
            "SmolLM2-135M-Instruct (the default model)".to_owned()
        } else {
            plan.model.clone()
        },
        device: plan.device.clone(),
        dtype: plan.dtype.clone(),
        seed: plan.seed,
        budget_minutes: plan.budget_minutes,
        history: plan.history,
        eval_episodes: plan.eval_episodes,
        collect_seed: plan.collect_seed,
        collect_episodes: plan.collect_episodes,
        collect_episodes_single: plan.collect_episodes_single,
        base,
        tuned,
        unconstrained,
        recipe: DemoRecipe {
            rank: r.rank,
            alpha: r.alpha,
            dropout: r.dropout,
            targets: r.targets.clone(),
            lr: r.lr,
            warmup: r.warmup,
            min_lr_ratio: r.min_lr_ratio,
            weight_decay: r.weight_decay,
            clip: r.clip,
            batch_size: r.batch_size,
            max_len: r.max_len.unwrap_or(super::plan::DEMO_MAX_LEN),
            min_score: r.min_score,
            validation_fraction: r.validation_fraction,
        },
        training: DemoTraining {
            steps: facts.steps,
            train_conversations: facts.train_conversations,
            validation_conversations: facts.validation_conversations,
            train_tokens: facts.train_tokens,
            train_trained_tokens: facts.train_trained_tokens,
            validation_tokens: facts.validation_tokens,
            mean_train_len: facts.mean_train_len,
            cut_conversations: facts.cut_conversations,
            per_task_train: facts.per_task_train,
        },
        metrics,
        expert_episodes: records
            .iter()
            .map(|rec| (rec.task.clone(), rec.final_score))
            .collect(),
        phase_seconds: Phase::ALL
            .iter()
            .filter_map(|p| Some((p.name().to_owned(), *timings.get(p.name())?)))
            .collect(),
        assumptions: DemoAssumptions {
            train_tokens_per_s: ASSUMED_TRAIN_TOKENS_PER_S,
            train_share: TRAIN_SHARE,
            train_tokens: plan.train_tokens,
            seconds_per_turn: ASSUMED_SECONDS_PER_TURN,
            turns_per_episode_set: ASSUMED_TURNS_PER_EPISODE_SET,
            eval_share: EVAL_SHARE,
        },
        episode_index: episode,
        episode: tuned_records.get(episode).map(|rec| DemoEpisode {
            task: rec.task.clone(),
            seed: rec.seed,
            final_score: rec.final_score,
        }),
        out: l.out.display().to_string(),
        commands,
    })
}
