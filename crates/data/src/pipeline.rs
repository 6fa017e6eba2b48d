//! The whole way from files to training examples: read, prune, split, encode, count.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::conversation::Conversation;
use crate::encode::{EncodeOutcome, Encoder, Example};
use crate::error::{DataError, Result};
use crate::filter::{PruneOptions, PruneReason};
use crate::reader::{read_conversations, ReadOptions, ReadReport};
use crate::split::{assign_splits, Split, SplitOptions};
use crate::stats::TokenStats;

#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    pub read: ReadOptions,
    pub prune: PruneOptions,
    pub split: SplitOptions,
}

/// Per-task counts. Every conversation read lands in exactly one of `pruned_*`, `render_failed`,
/// `dropped_overlong`, `train` or `validation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskCounts {
    pub read: usize,
    pub pruned_low_score: usize,
    pub pruned_missing_score: usize,
    pub pruned_task: usize,
    /// Failed to render or tokenise (only with `skip_invalid`).
    pub render_failed: usize,
    pub dropped_overlong: usize,
    /// Kept after cutting at a turn boundary (also counted in train/validation).
    pub cut: usize,
    /// Kept with special-token text in a message's content, tokenised as plain text (also
    /// counted in train/validation).
    pub special_text: usize,
    pub train: usize,
    pub validation: usize,
}

impl TaskCounts {
    pub fn pruned(&self) -> usize {
        self.pruned_low_score + self.pruned_missing_score + self.pruned_task
    }
    pub fn kept(&self) -> usize {
        self.train + self.validation
    }
    fn add(&mut self, o: &TaskCounts) {
        self.read += o.read;
        self.pruned_low_score += o.pruned_low_score;
        self.pruned_missing_score += o.pruned_missing_score;
        self.pruned_task += o.pruned_task;
        self.render_failed += o.render_failed;
        self.dropped_overlong += o.dropped_overlong;
        self.cut += o.cut;
        self.special_text += o.special_text;
        self.train += o.train;
        self.validation += o.validation;
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrepareReport {
    pub read: ReadReport,
    /// Counts per task; conversations without a task are under `""`.
    pub per_task: BTreeMap<String, TaskCounts>,
    pub train: TokenStats,
    pub validation: TokenStats,
    /// The first few render/tokenise failures skipped (with `skip_invalid`).
    pub render_errors: Vec<String>,
}

impl PrepareReport {
    pub fn totals(&self) -> TaskCounts {
        let mut t = TaskCounts::default();
        for c in self.per_task.values() {
            t.add(c);
        }
        t
    }
}

/// Training and validation examples with the report of how they were made.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub report: PrepareReport,
}

/// Reads the files, prunes, splits and encodes. Conversations are encoded in parallel; the output
/// keeps file order.
pub fn prepare(paths: &[PathBuf], encoder: &Encoder, options: &PrepareOptions) -> Result<Prepared> {
    let (convs, read) = read_conversations(paths, &options.read)?;
    let mut out = prepare_conversations(convs, encoder, options)?;
    out.report.read = read;
    Ok(out)
}

/// As [`prepare`], for conversations already in memory.
pub fn prepare_conversations(
    convs: Vec<Conversation>,
    encoder: &Encoder,
    options: &PrepareOptions,
) -> Result<Prepared> {
    let mut report = PrepareReport::default();
    let task = |c: &Conversation| c.task.clone().unwrap_or_default();
    let mut kept = Vec::with_capacity(convs.len());
    for c in convs {
        let counts = report.per_task.entry(task(&c)).or_default();
        counts.read += 1;
        match options.prune.check(&c) {
            None => kept.push(c),
            Some(PruneReason::LowScore) => counts.pruned_low_score += 1,
            Some(PruneReason::MissingScore) => counts.pruned_missing_score += 1,
            Some(PruneReason::TaskFiltered) => counts.pruned_task += 1,
        }
    }
    let splits = assign_splits(&kept, &options.split)?;
    let outcomes = encoder.encode_all(&kept);
    let mut train = Vec::new();
    let mut validation = Vec::new();
    for ((c, split), outcome) in kept.iter().zip(splits).zip(outcomes) {
        let counts = report.per_task.get_mut(&task(c)).expect("counted above");
        match outcome {
            Ok(EncodeOutcome::Kept(e)) => {
                counts.cut += e.cut as usize;
                counts.special_text += encoder.holds_special_text(c) as usize;
                match split {
                    Split::Train => {
                        counts.train += 1;
                        train.push(e);
                    }
                    Split::Validation => {
                        counts.validation += 1;
                        validation.push(e);
                    }
                }
            }
            Ok(EncodeOutcome::Dropped { .. }) => counts.dropped_overlong += 1,
            Err(e) if options.read.skip_invalid => {
                counts.render_failed += 1;
                if report.render_errors.len() < crate::reader::MAX_REPORTED_INVALID {
                    report.render_errors.push(e.to_string());
                }
            }
            Err(e) => return Err(e),
        }
    }
    report.train = TokenStats::of(&train);
    report.validation = TokenStats::of(&validation);
    if train.is_empty() && !kept.is_empty() && report.totals().dropped_overlong == kept.len() {
        return Err(DataError::Config(format!(
            "all {} conversations are longer than max_len",
            kept.len()
        )));
    }
    Ok(Prepared {
        train,
        validation,
        report,
    })
}
