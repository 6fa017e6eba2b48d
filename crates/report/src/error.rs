//! Library errors. Each names the file it is about and, for a bad record, its 1-based line.

use std::path::PathBuf;
use thiserror::Error;

/// Reading a run's metrics or evaluation results, recognising a comparison input, or writing a
/// figure.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}:{line}: a metrics record must be a JSON object", path.display())]
    NotObject { path: PathBuf, line: usize },
    #[error("{}:{line}: missing field `{field}`", path.display())]
    MissingField {
        path: PathBuf,
        line: usize,
        field: &'static str,
    },
    #[error("{}:{line}: field `{field}` must be {expected}, found {found}", path.display())]
    BadField {
        path: PathBuf,
        line: usize,
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{}: no train or eval records (empty metrics file)", path.display())]
    Empty { path: PathBuf },
    #[error("{}: {why}", path.display())]
    NotComparable { path: PathBuf, why: String },
    #[error("{}: {why}", path.display())]
    BadEval { path: PathBuf, why: String },
    #[error(
        "cannot compare training runs with evaluation results in one call: {} is a training run, \
         {} is evaluation results (compare runs with runs, evaluations with evaluations)",
        run.display(),
        eval.display()
    )]
    Mixed { run: PathBuf, eval: PathBuf },
    #[error("{why}")]
    Usage { why: String },
    #[error("{names} names given for {inputs} inputs")]
    NameCount { names: usize, inputs: usize },
    #[error("writing {}: {why}", path.display())]
    Write { path: PathBuf, why: String },
}

pub type Result<T, E = ReportError> = std::result::Result<T, E>;
