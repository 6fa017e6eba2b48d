//! Deterministic train/validation splits.
//!
//! The assignment depends only on the seed and on the content of the conversations, never on file
//! order: each conversation (or task) gets a key, the keys are ordered by a seeded hash, and the
//! first ones go to validation until the wanted fraction is reached. Identical conversations share
//! a key, so a duplicate can never sit on both sides. The hash is FNV-1a with a SplitMix64
//! finaliser, stable across platforms and Rust versions.

use std::collections::{BTreeMap, BTreeSet};
use teamtune_seed::{mix64, GOLDEN_GAMMA};

use crate::conversation::Conversation;
use crate::error::{DataError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitBy {
    /// Hold out whole conversations.
    #[default]
    Conversation,
    /// Hold out whole tasks (the study's setting).
    Task,
}

impl SplitBy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "conversation" => Some(SplitBy::Conversation),
            "task" => Some(SplitBy::Task),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SplitOptions {
    /// Fraction of conversations (or tasks) held out for validation, in [0, 1).
    pub validation_fraction: f64,
    pub seed: u64,
    pub by: SplitBy,
    /// With [`SplitBy::Task`]: hold out exactly these tasks instead of drawing them.
    pub validation_tasks: BTreeSet<String>,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions {
            validation_fraction: 0.1,
            seed: 0,
            by: SplitBy::Conversation,
            validation_tasks: BTreeSet::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Validation,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// A fingerprint of a conversation's messages (roles and contents).
pub fn conversation_key(conv: &Conversation) -> u64 {
    let mut h = FNV_OFFSET;
    for m in &conv.messages {
        h = fnv1a(h, m.role.as_str().as_bytes());
        h = fnv1a(h, &[0xff]);
        h = fnv1a(h, &(m.content.len() as u64).to_le_bytes());
        h = fnv1a(h, m.content.as_bytes());
    }
    mix64(h)
}

fn task_key(task: &str) -> u64 {
    mix64(fnv1a(FNV_OFFSET, task.as_bytes()))
}

fn seeded(seed: u64, key: u64) -> u64 {
    mix64(key ^ mix64(seed.wrapping_add(GOLDEN_GAMMA)))
}

/// How many of `n` groups to hold out: `round(fraction * n)`, at least one and at most `n - 1`
/// when the fraction is positive and there are two groups or more.
fn held_out(n: usize, fraction: f64) -> usize {
    if fraction <= 0.0 || n < 2 {
        return 0;
    }
    ((fraction * n as f64).round() as usize).clamp(1, n - 1)
}

/// Assigns each conversation to train or validation.
pub fn assign_splits(convs: &[Conversation], options: &SplitOptions) -> Result<Vec<Split>> {
    let f = options.validation_fraction;
    if !(0.0..1.0).contains(&f) {
        return Err(DataError::Config(format!(
            "validation fraction {f} is outside [0, 1)"
        )));
    }
    match options.by {
        SplitBy::Conversation => {
            if !options.validation_tasks.is_empty() {
                return Err(DataError::Config(
                    "validation tasks need a split by task".into(),
                ));
            }
            let keys: Vec<u64> = convs.iter().map(conversation_key).collect();
            let mut groups: BTreeMap<u64, usize> = BTreeMap::new();
            for &k in &keys {
                *groups.entry(k).or_default() += 1;
            }
            let mut order: Vec<(u64, u64, usize)> = groups
                .into_iter()
                .map(|(k, n)| (seeded(options.seed, k), k, n))
                .collect();
            order.sort_unstable();
            let target = held_out(convs.len(), f);
            let mut val = BTreeSet::new();
            let mut count = 0;
            for (_, k, n) in order {
                if count >= target || count + n >= convs.len() {
                    break;
                }
                val.insert(k);
                count += n;
            }
            Ok(keys
                .iter()
                .map(|k| {
                    if val.contains(k) {
                        Split::Validation
                    } else {
                        Split::Train
                    }
                })
                .collect())
        }
        SplitBy::Task => {
            let task_of = |c: &Conversation| c.task.clone().unwrap_or_default();
            let tasks: BTreeSet<String> = convs.iter().map(task_of).collect();
            let val: BTreeSet<String> = if !options.validation_tasks.is_empty() {
                if let Some(t) = options
                    .validation_tasks
                    .iter()
                    .find(|t| !tasks.contains(*t))
                {
                    return Err(DataError::Config(format!(
                        "validation task {t:?} has no conversations (tasks: {})",
                        tasks.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                options.validation_tasks.clone()
            } else {
                let mut order: Vec<(u64, &String)> = tasks
                    .iter()
                    .map(|t| (seeded(options.seed, task_key(t)), t))
                    .collect();
                order.sort_unstable();
                order
                    .into_iter()
                    .take(held_out(tasks.len(), f))
                    .map(|(_, t)| t.clone())
                    .collect()
            };
            Ok(convs
                .iter()
                .map(|c| {
                    if val.contains(&task_of(c)) {
                        Split::Validation
                    } else {
                        Split::Train
                    }
                })
                .collect())
        }
    }
}
