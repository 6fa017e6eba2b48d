//! Episode records and training lines as JSON Lines files. Writes go to a temporary file in the
//! same folder that is renamed over the target, so a crash never loses what was there.

use crate::episode::{EpisodeRecord, TrainingConversation};
use crate::error::RecordError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

fn io_err(path: &Path, source: std::io::Error) -> RecordError {
    RecordError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads every JSON line of a file (blank lines skipped).
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, RecordError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| RecordError::Json {
                path: path.display().to_string(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Reads the episode records of a file.
pub fn read_records(path: &Path) -> Result<Vec<EpisodeRecord>, RecordError> {
    let records: Vec<EpisodeRecord> = read_jsonl(path)?;
    // A record of another format version may parse and still mean something else.
    if let Some((index, r)) = records
        .iter()
        .enumerate()
        .find(|(_, r)| r.format != teamtune_formats::EPISODE_FORMAT)
    {
        return Err(RecordError::Format {
            path: path.display().to_string(),
            index,
            found: r.format.clone(),
            expected: teamtune_formats::EPISODE_FORMAT,
        });
    }
    Ok(records)
}

/// The record at `index` (0-based).
pub fn read_record(path: &Path, index: usize) -> Result<EpisodeRecord, RecordError> {
    let mut all = read_records(path)?;
    let count = all.len();
    if index >= count {
        return Err(RecordError::NoSuchRecord {
            path: path.display().to_string(),
            index,
            count,
        });
    }
    Ok(all.swap_remove(index))
}

/// Writes `existing bytes + one JSON line per value` to `path` atomically (a temporary file,
/// synced, renamed over it; the folder created if needed). With `append = false` the old content is replaced.
pub fn write_jsonl_atomic<T: Serialize>(
    path: &Path,
    values: &[T],
    append: bool,
) -> Result<(), RecordError> {
    let mut body = Vec::new();
    if append {
        match std::fs::read(path) {
            Ok(old) => {
                body = old;
                if !body.is_empty() && !body.ends_with(b"\n") {
                    body.push(b'\n');
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, e)),
        }
    }
    for v in values {
        serde_json::to_writer(&mut body, v)?;
        body.push(b'\n');
    }
    teamtune_formats::write_atomic(path, &body).map_err(|e| io_err(path, e))
}

/// Appends episode records to a JSONL file (atomically: see [`write_jsonl_atomic`]).
pub fn append_records(path: &Path, records: &[EpisodeRecord]) -> Result<(), RecordError> {
    write_jsonl_atomic(path, records, true)
}

/// The training lines of several episodes, optionally only those scoring at least `min_score`
/// (the original pruned below 50).
pub fn training_lines(
    records: &[EpisodeRecord],
    min_score: Option<f64>,
) -> Vec<TrainingConversation> {
    records
        .iter()
        .filter(|r| min_score.is_none_or(|m| r.final_score >= m))
        .flat_map(|r| r.training_lines())
        .collect()
}
