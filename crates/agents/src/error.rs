//! Errors of the agent runtime, the constraint's among them.

use teamtune_guide::ConstraintError;

use crate::schema::SchemaError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Episode(#[from] teamtune_gridworld::EpisodeError),
    #[error(transparent)]
    Spec(#[from] teamtune_gridworld::SpecError),
    #[error(transparent)]
    Model(#[from] teamtune_llama::LlamaError),
    #[error(transparent)]
    Data(#[from] teamtune_data::DataError),
    /// An OpenAI-compatible endpoint failed or answered something unusable.
    #[error("{url}: {message}")]
    Endpoint { url: String, message: String },
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, AgentError>;
