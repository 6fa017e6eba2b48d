//! Errors of the data crate. Every error a user can cause names where it happened: the file and
//! line of a bad record and the field in it, or the conversation a template failed on.

use std::fmt;
use std::path::PathBuf;

/// A record (one line of a JSONL file) that is not a valid conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRecord {
    /// The file the line came from.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: u64,
    /// The offending field as a path into the record (`messages[2].content`), or `None` when the
    /// line as a whole is at fault (not JSON, not an object, not UTF-8).
    pub field: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for InvalidRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for InvalidRecord {}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading a file failed (missing, unreadable, corrupt gzip stream).
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A record is not a valid conversation (only when invalid records are not skipped).
    #[error(transparent)]
    Invalid(#[from] InvalidRecord),
    /// A folder holds no conversation files.
    #[error("{}: no conversation files here (looked for *.jsonl and *.jsonl.gz)", .0.display())]
    NoFiles(PathBuf),
    /// The chat template does not compile, raised an exception or rewrote history.
    #[error("chat template: {0}")]
    Template(String),
    /// Rendering or tokenising one conversation failed.
    #[error("{source_name}: {message}")]
    Conversation {
        source_name: String,
        message: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An option or combination of options is invalid.
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
