//! Pruning by score and filtering by task.

use std::collections::BTreeSet;

use crate::conversation::Conversation;

/// The minimum score kept by default (the study trains on episodes scoring at least 50).
pub const DEFAULT_MIN_SCORE: f64 = 50.0;

/// What to do with a conversation that has no `score`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingScore {
    /// Prune it: an unscored trajectory is not known to be good.
    #[default]
    Drop,
    /// Keep it.
    Keep,
}

impl MissingScore {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "drop" => Some(MissingScore::Drop),
            "keep" => Some(MissingScore::Keep),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PruneOptions {
    /// Keep conversations with `score >= min_score`; `None` keeps every score.
    pub min_score: Option<f64>,
    pub missing_score: MissingScore,
    /// Keep only these tasks (empty: all tasks). A conversation without a task matches the
    /// name `""`.
    pub tasks: BTreeSet<String>,
    /// Leave these tasks out.
    pub exclude_tasks: BTreeSet<String>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            min_score: Some(DEFAULT_MIN_SCORE),
            missing_score: MissingScore::Drop,
            tasks: BTreeSet::new(),
            exclude_tasks: BTreeSet::new(),
        }
    }
}

/// Why a conversation was pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PruneReason {
    LowScore,
    MissingScore,
    TaskFiltered,
}

impl PruneOptions {
    /// Keeps everything.
    pub fn keep_all() -> Self {
        PruneOptions {
            min_score: None,
            missing_score: MissingScore::Keep,
            ..Default::default()
        }
    }

    /// `None` when the conversation is kept, else why not.
    pub fn check(&self, conv: &Conversation) -> Option<PruneReason> {
        let task = conv.task.as_deref().unwrap_or("");
        if (!self.tasks.is_empty() && !self.tasks.contains(task))
            || self.exclude_tasks.contains(task)
        {
            return Some(PruneReason::TaskFiltered);
        }
        match (self.min_score, conv.score) {
            (None, Some(_)) => None,
            (_, None) => match self.missing_score {
                MissingScore::Keep => None,
                MissingScore::Drop => Some(PruneReason::MissingScore),
            },
            (Some(min), Some(s)) => (s < min).then_some(PruneReason::LowScore),
        }
    }
}
