//! Plays many episodes with one policy: up to `parallel` episodes are in play at once, and the
//! turns they wait on are handed to the policy together (the model policy decodes them as one
//! batch). Episode order and seeds are fixed, so a run is reproducible whatever `parallel` is,
//! for policies that answer each turn independently of the others in its batch.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use teamtune_gridworld::{Episode, EpisodeRecord, TaskSpec};

use crate::error::Result;
use crate::policy::{Policy, TurnRequest};

/// One episode to play.
#[derive(Debug, Clone)]
pub struct EpisodePlan {
    pub task: TaskSpec,
    pub seed: u64,
}

/// `episodes` per task, episode k of a task with seed `seed + k`.
pub fn plan(tasks: &[TaskSpec], episodes: u64, seed: u64) -> Vec<EpisodePlan> {
    tasks
        .iter()
        .flat_map(|t| {
            (0..episodes).map(move |k| EpisodePlan {
                task: t.clone(),
                seed: seed + k,
            })
        })
        .collect()
}

/// A finished episode with what it cost.
#[derive(Debug, Clone)]
pub struct PlayedEpisode {
    pub record: EpisodeRecord,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Wall time of the policy calls, each call's time shared equally among its turns.
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Episodes in play at once (the batch size of a model policy).
    pub parallel: usize,
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            parallel: 8,
            progress: true,
        }
    }
}

struct Live {
    plan_index: usize,
    episode: Episode,
    prompt_tokens: usize,
    generated_tokens: usize,
    seconds: f64,
}

/// Plays every planned episode; results come back in plan order.
pub fn run_episodes(
    policy: &mut dyn Policy,
    plans: &[EpisodePlan],
    options: &RunOptions,
) -> Result<Vec<PlayedEpisode>> {
    let bar = ProgressBar::new(plans.len() as u64);
    if !options.progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} episodes {msg} eta {eta}")
            .expect("static template"),
    );
    let slots = options.parallel.max(1);
    let mut live: Vec<Option<Live>> = (0..slots).map(|_| None).collect();
    let mut next = 0usize;
    let mut done: Vec<Option<PlayedEpisode>> = vec![None; plans.len()];
    let mut turns = 0usize;
    loop {
        // Fill free slots, in plan order.
        for slot in live.iter_mut() {
            if slot.is_none() && next < plans.len() {
                let p = &plans[next];
                *slot = Some(Live {
                    plan_index: next,
                    episode: Episode::new(&p.task, p.seed)?,
                    prompt_tokens: 0,
                    generated_tokens: 0,
                    seconds: 0.0,
                });
                next += 1;
            }
        }
        let waiting: Vec<usize> = (0..slots)
            .filter(|&s| {
                live[s]
                    .as_ref()
                    .is_some_and(|l| l.episode.current().is_some())
            })
            .collect();
        if waiting.is_empty() {
            break;
        }
        let started = Instant::now();
        let replies = {
            let requests: Vec<TurnRequest<'_>> = waiting
                .iter()
                .map(|&s| {
                    let l = live[s].as_ref().expect("waiting slots are live");
                    let turn = l.episode.current().expect("waiting");
                    TurnRequest {
                        slot: s,
                        agent: turn.agent,
                        task: l.episode.spec(),
                        seed: l.episode.seed(),
                        briefing: l.episode.briefing(turn.agent),
                        observation: turn.observation,
                        messages: l.episode.messages(turn.agent),
                    }
                })
                .collect();
            policy.reply(&requests)?
        };
        let share = started.elapsed().as_secs_f64() / waiting.len() as f64;
        turns += waiting.len();
        for (&s, reply) in waiting.iter().zip(replies) {
            let l = live[s].as_mut().expect("waiting slots are live");
            l.episode.submit(&reply.text)?;
            l.prompt_tokens += reply.prompt_tokens;
            l.generated_tokens += reply.generated_tokens;
            l.seconds += share;
            if l.episode.is_done() {
                let l = live[s].take().expect("live");
                policy.end_episode(s);
                let mut record = l.episode.record();
                record.policy = Some(policy.name());
                tracing::info!(
                    task = %record.task,
                    seed = record.seed,
                    score = record.final_score,
                    turns = record.turns.len(),
                    invalid = record.invalid_replies(),
                    generated_tokens = l.generated_tokens,
                    "episode done"
                );
                done[l.plan_index] = Some(PlayedEpisode {
                    record,
                    prompt_tokens: l.prompt_tokens,
                    generated_tokens: l.generated_tokens,
                    seconds: l.seconds,
                });
                bar.inc(1);
            }
        }
        bar.set_message(format!("{turns} turns"));
    }
    bar.finish_and_clear();
    Ok(done
        .into_iter()
        .map(|d| d.expect("every plan played"))
        .collect())
}
