//! `metrics.jsonl` ([`teamtune_formats::METRICS_FILE`]): one JSON object per train step (`step,
//! epoch, loss, lr, grad_norm, trained_tokens, tokens, tokens_per_s, trained_tokens_per_s,
//! peak_memory_mb`) or evaluation (`step, epoch, eval_loss`). `tokens` counts every real token
//! of the step (what PEFT/TRL users read as tokens/s), `trained_tokens` the ones in the loss.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending. When resuming from `resumed_at`, the records written after
    /// that step by the interrupted run are dropped first, so the log reads as one run.
    pub fn open(path: &Path, resumed_at: Option<usize>) -> Result<Self> {
        if let Some(step) = resumed_at {
            truncate_after(path, step)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(MetricsLog {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends one record as a line (flushed, so a killed run keeps every finished step).
    pub fn write(&mut self, record: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(io_err(&self.path))
    }
}

/// Drops the records after `step`. Atomic (temporary file and rename).
fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let mut kept = String::new();
    for line in text.lines() {
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|r| r.get("step").and_then(serde_json::Value::as_u64))
            .is_some_and(|s| s as usize <= step);
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    teamtune_formats::write_atomic(path, kept.as_bytes()).map_err(io_err(path))
}
