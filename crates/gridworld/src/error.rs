//! Library errors. Model output never produces one of these: a bad reply is a wasted turn
//! (see [`crate::reply::ReplyError`]), not an error.

use thiserror::Error;

/// A task specification that cannot be used.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error("unknown task `{id}` (known: {known})")]
    UnknownTask { id: String, known: String },
    #[error("task `{id}` is invalid: {why}")]
    Invalid { id: String, why: String },
    #[error("task file: {0}")]
    Toml(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Misuse of the episode state machine by the caller.
#[derive(Debug, Error)]
pub enum EpisodeError {
    #[error("the episode is over")]
    Finished,
    #[error(transparent)]
    Spec(#[from] SpecError),
}

/// Reading or writing episode records.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {source}")]
    Json {
        path: String,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: no record at index {index} ({count} records)")]
    NoSuchRecord {
        path: String,
        index: usize,
        count: usize,
    },
    #[error("{path}: record {index} is in format `{found}`, but this teamtune reads `{expected}`")]
    Format {
        path: String,
        index: usize,
        found: String,
        expected: &'static str,
    },
    #[error("serialising a record: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error(transparent)]
    Spec(#[from] SpecError),
}

/// Drawing an episode.
#[derive(Debug, Error)]
pub enum RenderError {
    #[error("drawing: {0}")]
    Draw(String),
    #[error("nothing to draw")]
    Empty,
    #[error(transparent)]
    Replay(#[from] RecordError),
}
