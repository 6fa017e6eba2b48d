//! Errors of the server, each with its HTTP status and the OpenAI error body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

pub type Result<T, E = ServeError> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// A malformed body, a wrong type, an unknown or unsupported parameter value (400).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// The prompt alone does not fit in the model's context (413).
    #[error("this model's maximum context length is {context} tokens, but the messages take {prompt} tokens")]
    ContextLength { context: usize, prompt: usize },
    /// The request body is larger than the server takes (413).
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// No such model (base or adapter) is served (404).
    #[error("the model `{0}` does not exist; GET /v1/models lists the served ones")]
    ModelNotFound(String),
    /// No route for the path (404) or the method (405).
    #[error("invalid URL ({method} {path})")]
    UnknownRoute {
        method: String,
        path: String,
        status: StatusCode,
    },
    /// Missing or wrong bearer token (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A route the server's flags turned off (403).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The queue of waiting requests is full (429, Retry-After).
    #[error("the server is busy: {waiting} requests are waiting; retry after {retry_after_s} s")]
    QueueFull { waiting: usize, retry_after_s: u64 },
    /// The server is shutting down and takes no new requests (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Something failed on our side while decoding (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ServeError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn invalid_value(message: impl Into<String>, param: &str) -> Self {
        ServeError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
            code: Some("invalid_value"),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ServeError::ContextLength { .. } | ServeError::BodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ServeError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ServeError::UnknownRoute { status, .. } => *status,
            ServeError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServeError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ServeError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::InvalidRequest { .. }
            | ServeError::ContextLength { .. }
            | ServeError::BodyTooLarge { .. }
            | ServeError::ModelNotFound(_)
            | ServeError::UnknownRoute { .. }
            | ServeError::Unauthorized(_)
            | ServeError::Forbidden(_) => "invalid_request_error",
            ServeError::QueueFull { .. } => "rate_limit_error",
            ServeError::ShuttingDown | ServeError::Internal(_) => "server_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ServeError::InvalidRequest { param, .. } => param.as_deref(),
            ServeError::ContextLength { .. } => Some("messages"),
            ServeError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ServeError::InvalidRequest { code, .. } => *code,
            ServeError::ContextLength { .. } => Some("context_length_exceeded"),
            ServeError::BodyTooLarge { .. } => Some("request_too_large"),
            ServeError::ModelNotFound(_) => Some("model_not_found"),
            ServeError::UnknownRoute { .. } => Some("unknown_url"),
            ServeError::Unauthorized(_) => Some("invalid_api_key"),
            ServeError::Forbidden(_) => Some("forbidden"),
            ServeError::QueueFull { .. } => Some("rate_limit_exceeded"),
            ServeError::ShuttingDown => Some("server_shutting_down"),
            ServeError::Internal(_) => Some("internal_error"),
        }
    }

    /// The OpenAI error body. An internal error's details stay in the server's log: they may
    /// name files and internal state a client has no business seeing.
    pub fn body(&self) -> Value {
        let message = match self {
            ServeError::Internal(_) => "internal error (the server's log has the details)".into(),
            other => other.to_string(),
        };
        json!({
            "error": {
                "message": message,
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "{self}");
        } else {
            tracing::debug!(status = status.as_u16(), "{self}");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        match &self {
            ServeError::QueueFull { retry_after_s, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            ServeError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl From<teamtune_llama::LlamaError> for ServeError {
    fn from(e: teamtune_llama::LlamaError) -> Self {
        ServeError::Internal(e.to_string())
    }
}
