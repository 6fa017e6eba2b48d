//! One round of `teamtune improve` as plain commands, and what its files say afterwards.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use teamtune_gridworld::{read_records, EpisodeRecord};
use teamtune_report::{
    EvalResults, ImproveLog, ImproveRound, RoundEval, RoundTask, RunMetrics, TaskMean,
};

use super::{Args, SEED_STRIDE};
use crate::commands::plain::{run_plain, shell_line, words};

// The files of a round inside `--out/round-R/`.
const MODEL_KEPT: &str = "model/kept.jsonl";
const MODEL_PRUNED: &str = "model/pruned.jsonl";
const MODEL_CONVERSATIONS: &str = "model/conversations.jsonl";
const EXPERT_KEPT: &str = "expert/kept.jsonl";
const EXPERT_PRUNED: &str = "expert/pruned.jsonl";
const EXPERT_CONVERSATIONS: &str = "expert/conversations.jsonl";
const RUN: &str = "run";
const EVAL: &str = "eval";

/// The first play seed of round `r` (episode k of a task: this + k).
pub fn play_seed(args: &Args, r: usize) -> anyhow::Result<u64> {
    (r as u64 + 1)
        .checked_mul(SEED_STRIDE)
        .and_then(|o| args.seed.checked_add(o))
        .with_context(|| {
            format!(
                "--seed {} is too large: round {r}'s seeds would pass the largest seed",
                args.seed
            )
        })
}

fn round_dir(args: &Args, r: usize) -> PathBuf {
    args.out.join(format!("round-{r}"))
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// The adapter round `r` starts from: the --adapter given, then each round's new one.
fn adapter_of(args: &Args, r: usize) -> PathBuf {
    match r {
        1 => args.adapter.clone(),
        _ => round_dir(args, r - 1).join(RUN).join("adapter"),
    }
}

/// --model, --device, --dtype (and --quantize where the command only decodes).
fn model_flags(args: &Args, decoding: bool) -> Vec<String> {
    let m = &args.model;
    let mut c = words(&["--device", &m.device, "--dtype", &m.dtype]);
    if !m.model.is_empty() {
        c.extend(words(&["--model", &m.model]));
    }
    if let (true, Some(q)) = (decoding, &m.quantize) {
        c.extend(words(&["--quantize", q]));
    }
    c
}

/// `--history N`, or nothing for 0: whole conversations (the commands' default).
fn history_flags(args: &Args) -> Vec<String> {
    match args.history {
        0 => Vec::new(),
        n => words(&["--history", &n.to_string()]),
    }
}

fn tasks(log: &ImproveLog) -> String {
    log.tasks.join(",")
}

/// `eval` of `adapter` on the fixed evaluation seeds, constrained and greedy.
fn eval_command(args: &Args, log: &ImproveLog, adapter: &Path, out: &Path) -> Vec<String> {
    let mut c = words(&["eval", "--policy", "model", "--adapter", &p(adapter)]);
    c.extend(model_flags(args, true));
    c.extend(history_flags(args));
    c.extend(words(&[
        "--task",
        &tasks(log),
        "--episodes",
        &args.eval_episodes.to_string(),
        "--seed",
        &args.seed.to_string(),
        "--max-new-tokens",
        &args.max_new_tokens.to_string(),
        "--parallel",
        &args.parallel.to_string(),
        "--out",
        &p(out),
    ]));
    c
}

/// `collect` by the model (with `adapter`, at the temperature) or, for `fallback` tasks, by
/// the experts, on round `r`'s seeds: kept and pruned records and the kept conversations.
fn collect_command(
    args: &Args,
    r: usize,
    task: &str,
    who: Who,
    seed: u64,
    adapter: &Path,
) -> Vec<String> {
    let dir = round_dir(args, r);
    let (kept, pruned, conversations) = match who {
        Who::Model => (MODEL_KEPT, MODEL_PRUNED, MODEL_CONVERSATIONS),
        Who::Experts => (EXPERT_KEPT, EXPERT_PRUNED, EXPERT_CONVERSATIONS),
    };
    let mut c = match who {
        Who::Model => {
            let mut c = words(&["collect", "--policy", "model", "--adapter", &p(adapter)]);
            c.extend(model_flags(args, true));
            c.extend(words(&[
                "--temperature",
                &args.temperature.to_string(),
                "--max-new-tokens",
                &args.max_new_tokens.to_string(),
                "--parallel",
                &args.parallel.to_string(),
            ]));
            c
        }
        Who::Experts => words(&["collect", "--policy", "expert"]),
    };
    c.extend(history_flags(args));
    c.extend(words(&[
        "--task",
        task,
        "--episodes",
        &args.episodes.to_string(),
        "--seed",
        &seed.to_string(),
        "--min-score",
        &args.min_score.to_string(),
        "--out",
        &p(&dir.join(kept)),
        "--pruned-out",
        &p(&dir.join(pruned)),
        "--training-out",
        &p(&dir.join(conversations)),
    ]));
    c
}

#[derive(Clone, Copy)]
enum Who {
    Model,
    Experts,
}

/// `train --init-adapter` of round `r` on `data`.
fn train_command(args: &Args, r: usize, adapter: &Path, data: &[PathBuf]) -> Vec<String> {
    let mut c = words(&["train"]);
    c.extend(model_flags(args, false));
    c.extend(words(&["--init-adapter", &p(adapter)]));
    for d in data {
        c.extend(words(&["--data", &p(d)]));
    }
    c.extend(words(&[
        "--out",
        &p(&round_dir(args, r).join(RUN)),
        "--max-steps",
        &args.steps.to_string(),
        "--lr",
        &args.lr.to_string(),
        "--batch-size",
        &args.batch_size.to_string(),
        "--max-len",
        &args.max_len.to_string(),
        "--min-score",
        &args.min_score.to_string(),
        "--eval-every",
        &(args.steps / 3).max(1).to_string(),
        "--seed",
        &(args.seed + r as u64).to_string(),
    ]));
    if args.decision_weight != 1.0 {
        c.extend(words(&[
            "--decision-weight",
            &args.decision_weight.to_string(),
        ]));
    }
    c
}

/// The training files of round `r`: the model's kept conversations and the experts', where
/// they kept any.
fn training_data(args: &Args, r: usize, round: &[RoundTask]) -> Vec<PathBuf> {
    let dir = round_dir(args, r);
    let mut data = Vec::new();
    if round.iter().any(|t| t.model_kept > 0) {
        data.push(dir.join(MODEL_CONVERSATIONS));
    }
    if round.iter().any(|t| t.expert_kept > 0) {
        data.push(dir.join(EXPERT_CONVERSATIONS));
    }
    data
}

fn run(c: &[String], what: &str) -> anyhow::Result<()> {
    run_plain(c).with_context(|| format!("{what}: `{}`", shell_line(c)))
}

/// Records of a file a collect wrote; a file it had nothing to write to may be absent.
fn records(path: &Path) -> anyhow::Result<Vec<EpisodeRecord>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    read_records(path).with_context(|| format!("reading {}", path.display()))
}

fn read_eval(dir: &Path, log: &ImproveLog) -> anyhow::Result<RoundEval> {
    let e = EvalResults::read(dir).with_context(|| format!("reading {}", dir.display()))?;
    let scores = log
        .tasks
        .iter()
        .map(|t| {
            e.task(t)
                .map(|s| TaskMean {
                    task: t.clone(),
                    score: s.mean_score,
                })
                .with_context(|| format!("{}: no result for task {t}", dir.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RoundEval {
        mean: e.mean_over_tasks(),
        scores,
        invalid_reply_rate: e.invalid_reply_rate.unwrap_or(0.0),
        wall_seconds: e.wall_seconds.unwrap_or(0.0),
    })
}

/// Empties `dir` (a round's own folder, inside --out): what a stopped run left there is
/// played again from the start.
fn clear(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        tracing::info!(
            "clearing {}, left by a run that stopped in it",
            dir.display()
        );
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Round 0: the --adapter given, on the evaluation seeds.
pub fn evaluate_start(args: &Args, log: &ImproveLog) -> anyhow::Result<RoundEval> {
    let dir = round_dir(args, 0);
    clear(&dir)?;
    run(
        &eval_command(args, log, &args.adapter, &dir.join(EVAL)),
        "round 0",
    )?;
    read_eval(&dir.join(EVAL), log)
}

/// Plays, keeps, trains and evaluates round `r` in `--out/round-r/` (cleared first).
pub fn run_round(args: &Args, log: &ImproveLog, r: usize) -> anyhow::Result<ImproveRound> {
    let n = args.rounds;
    let dir = round_dir(args, r);
    clear(&dir)?;
    let seed = play_seed(args, r)?;
    let adapter = adapter_of(args, r);
    let what = format!("round {r}");
    tracing::info!(
        "round {r}/{n}: {} plays {} episodes per task from seed {seed} at temperature {}",
        adapter.display(),
        args.episodes,
        args.temperature
    );
    run(
        &collect_command(args, r, &tasks(log), Who::Model, seed, &adapter),
        &what,
    )?;
    let kept = records(&dir.join(MODEL_KEPT))?;
    let pruned = records(&dir.join(MODEL_PRUNED))?;
    let mut round: Vec<RoundTask> = log
        .tasks
        .iter()
        .map(|t| {
            let of = |v: &[EpisodeRecord]| -> Vec<f64> {
                v.iter()
                    .filter(|e| &e.task == t)
                    .map(|e| e.final_score)
                    .collect()
            };
            let (k, all) = (of(&kept), [of(&kept), of(&pruned)].concat());
            RoundTask {
                task: t.clone(),
                played: all.len(),
                model_kept: k.len(),
                model_mean: all.iter().sum::<f64>() / all.len().max(1) as f64,
                expert_fallback: k.is_empty(),
                expert_kept: 0,
            }
        })
        .collect();
    let fallback: Vec<String> = round
        .iter()
        .filter(|t| t.expert_fallback)
        .map(|t| t.task.clone())
        .collect();
    if !fallback.is_empty() {
        tracing::info!(
            "round {r}/{n}: no episode of {} at or above {}: the experts play their seeds",
            fallback.join(", "),
            args.min_score
        );
        run(
            &collect_command(args, r, &fallback.join(","), Who::Experts, seed, &adapter),
            &what,
        )?;
        let expert = records(&dir.join(EXPERT_KEPT))?;
        for t in round.iter_mut().filter(|t| t.expert_fallback) {
            t.expert_kept = expert.iter().filter(|e| e.task == t.task).count();
        }
    }
    let data = training_data(args, r, &round);
    if data.is_empty() {
        bail!(
            "round {r}: no episode scored at least --min-score {}, neither the model's nor the \
             experts' (in {}); lower --min-score or raise --episodes",
            args.min_score,
            dir.display()
        );
    }
    let conversations = data
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
                .with_context(|| format!("reading {}", f.display()))
        })
        .sum::<anyhow::Result<usize>>()?;
    tracing::info!(
        "round {r}/{n}: training {} further on {conversations} conversations",
        adapter.display()
    );
    run(&train_command(args, r, &adapter, &data), &what)?;
    let metrics = RunMetrics::read(&dir.join(RUN))
        .with_context(|| format!("reading {}", dir.join(RUN).display()))?;
    let steps = metrics.train.last().map_or(0, |t| t.step as usize);
    let validation_loss = match (metrics.eval.first(), metrics.eval.last()) {
        (Some(a), Some(b)) => Some((a.eval_loss, b.eval_loss)),
        _ => None,
    };
    tracing::info!("round {r}/{n}: evaluating the new adapter");
    let new_adapter = dir.join(RUN).join("adapter");
    run(
        &eval_command(args, log, &new_adapter, &dir.join(EVAL)),
        &what,
    )?;
    Ok(ImproveRound {
        round: r,
        play_seed: seed,
        tasks: round,
        conversations,
        steps,
        validation_loss,
        eval: read_eval(&dir.join(EVAL), log)?,
        wall_seconds: 0.0,
    })
}

/// This run's own command line (every setting spelled out, --rounds as far as it has run).
fn improve_command(args: &Args, log: &ImproveLog) -> Vec<String> {
    let mut c = words(&[
        "improve",
        "--adapter",
        &p(&args.adapter),
        "--out",
        &p(&args.out),
    ]);
    c.extend(model_flags(args, true));
    c.extend(words(&[
        "--rounds",
        &log.rounds.len().max(1).to_string(),
        "--min-score",
        &args.min_score.to_string(),
        "--temperature",
        &args.temperature.to_string(),
        "--episodes",
        &args.episodes.to_string(),
        "--eval-episodes",
        &args.eval_episodes.to_string(),
        "--steps",
        &args.steps.to_string(),
        "--lr",
        &args.lr.to_string(),
        "--batch-size",
        &args.batch_size.to_string(),
        "--max-len",
        &args.max_len.to_string(),
        "--seed",
        &args.seed.to_string(),
        "--task",
        &tasks(log),
        "--history",
        &args.history.to_string(),
        "--max-new-tokens",
        &args.max_new_tokens.to_string(),
        "--parallel",
        &args.parallel.to_string(),
    ]));
    c
}

/// (label, commands as shell lines): this run's own, then the plain commands of round 0 and
/// of every finished round, as they ran.
pub fn all_commands(args: &Args, log: &ImproveLog) -> Vec<(String, Vec<String>)> {
    let mut v = vec![(
        "This run".to_owned(),
        vec![shell_line(&improve_command(args, log))],
    )];
    v.push((
        "Round 0 (the adapter given)".to_owned(),
        vec![shell_line(&eval_command(
            args,
            log,
            &args.adapter,
            &round_dir(args, 0).join(EVAL),
        ))],
    ));
    for round in &log.rounds {
        let r = round.round;
        let adapter = adapter_of(args, r);
        let mut c = vec![collect_command(
            args,
            r,
            &tasks(log),
            Who::Model,
            round.play_seed,
            &adapter,
        )];
        let fallback: Vec<&str> = round
            .tasks
            .iter()
            .filter(|t| t.expert_fallback)
            .map(|t| t.task.as_str())
            .collect();
        if !fallback.is_empty() {
            c.push(collect_command(
                args,
                r,
                &fallback.join(","),
                Who::Experts,
                round.play_seed,
                &adapter,
            ));
        }
        c.push(train_command(
            args,
            r,
            &adapter,
            &training_data(args, r, &round.tasks),
        ));
        c.push(eval_command(
            args,
            log,
            &round_dir(args, r).join(RUN).join("adapter"),
            &round_dir(args, r).join(EVAL),
        ));
        v.push((
            format!("Round {r}"),
            c.iter().map(|c| shell_line(c)).collect(),
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn args(extra: &[&str]) -> Args {
        let base = ["improve", "--adapter", "a", "--out", "o", "--rounds", "1"];
        Command::parse_from(base.iter().chain(extra)).args
    }

    /// Each round trains with the run's decision weight; at 1 the flag is left out, as `train`
    /// defaults to it.
    #[test]
    fn rounds_train_with_the_runs_decision_weight() {
        let data = [PathBuf::from("d.jsonl")];
        let weighted = train_command(&args(&["--decision-weight", "3"]), 1, Path::new("a"), &data);
        let at = weighted
            .iter()
            .position(|w| w == "--decision-weight")
            .expect("the flag");
        assert_eq!(weighted[at + 1], "3");
        let plain = train_command(&args(&[]), 1, Path::new("a"), &data);
        assert!(!plain.iter().any(|w| w == "--decision-weight"), "{plain:?}");
    }
}
