use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model. Variants name the file and
/// the field so that a user can act on the message.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    /// A model file that cannot be read as one (a device, a folder, far too large).
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: missing required config field `{field}`")]
    MissingField { path: PathBuf, field: String },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: unsupported GGUF: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("hub: {0}")]
    Hub(String),
    #[error("model not found: {0}")]
    NotFound(String),
    #[error("adapter: {0}")]
    Adapter(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A decoding constraint refused or failed (see `session::TokenFilter`).
    #[error("token filter: {0}")]
    Filter(String),
    /// A setting this model or device does not offer.
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LlamaError>;

impl LlamaError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LlamaError::Io {
            path: path.into(),
            source,
        }
    }
}
