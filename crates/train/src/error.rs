use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid state: {message}")]
    State { path: PathBuf, message: String },
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("non-finite loss {loss} at step {step}; last good checkpoint: {}", last_checkpoint.as_ref().map_or("none".to_owned(), |p| p.display().to_string()))]
    NonFinite {
        step: usize,
        loss: f64,
        last_checkpoint: Option<PathBuf>,
    },
    #[error(transparent)]
    Model(#[from] teamtune_llama::LlamaError),
    #[error(transparent)]
    Data(#[from] teamtune_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
