//! `teamtune serve`: an OpenAI-compatible chat-completions server over a teamtune model.
//!
//! This crate owns the HTTP routes, the batching engine, serving LoRA adapters by model name,
//! and the errors of requests. It must not own grid-world knowledge (tasks, agents, their
//! reply schemas: a client sends its own schema) nor constrained decoding itself, which is
//! `teamtune-guide`'s (schema to token filter, the filter adapter, stop tokens, prompt reuse).
//!
//! - `api`: the request as OpenAI defines it, checked; response and stream-chunk bodies.
//! - `error`: every refusal with its status and OpenAI error body.
//! - `engine`: the model worker thread, its bounded queue and batched decoding.
//! - `routes`: the axum routes and the bearer-token check.
//! - `sse`: a streamed reply as server-sent events.
//! - `logprobs`: the log-probabilities of a reply's tokens.
//! - `tools`: function calling (`tools`, `tool_choice`, `tool_calls`).
//!
//! [`Server::new`] takes a loaded model (adapters loaded, none active), its tokenizer and chat
//! template; [`Server::run`] serves on a bound listener until the shutdown future resolves,
//! then lets the requests in flight finish (or cancels them after a grace period) and stops
//! the worker.

mod api;
mod engine;
mod error;
mod logprobs;
mod routes;
mod sse;
mod tools;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use teamtune_data::{ChatTemplate, EncodeOptions, Encoder};
use teamtune_guide::{max_json_bytes, stop_tokens, ReplyGrammar, TokenVocab};
use teamtune_llama::{ChatAssets, Llama};

pub use engine::{Engine, EngineConfig, Stats};

/// Requests templated, tokenised and grammar-compiled at once (on the blocking pool): more
/// wait, without holding a thread.
const PREPARING_AT_ONCE: usize = 4;
pub use error::{Result, ServeError};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The base model's name in `/v1/models` and requests.
    pub model_name: String,
    pub engine: EngineConfig,
    /// Require `Authorization: Bearer <key>` on `/v1/*`.
    pub api_key: Option<String>,
    /// After a shutdown signal, how long requests in flight may run before they are cancelled.
    pub shutdown_grace: Duration,
    /// The reply format of requests that send no `response_format`, for every model; `None`:
    /// free text.
    pub default_format: Option<DefaultFormat>,
    /// The same per adapter (by served name), before `default_format`.
    pub adapter_formats: HashMap<String, DefaultFormat>,
    /// Serve `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's API): a
    /// client may then make the server read any adapter folder it can reach.
    pub allow_runtime_lora: bool,
}

/// A JSON schema the server applies to requests that send no `response_format` (for agent
/// programs that parse JSON but never ask for it). A request's own `response_format` wins.
#[derive(Debug, Clone)]
pub struct DefaultFormat {
    /// A JSON schema (an object).
    pub schema: serde_json::Value,
    /// Where it came from, named in errors: `--json-schema-file agent.json`.
    pub source: String,
}

/// Errors setting the server up (not those of requests).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] teamtune_data::DataError),
    #[error(transparent)]
    Constraint(#[from] teamtune_guide::ConstraintError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Server {
    state: Arc<routes::AppState>,
    shutdown_grace: Duration,
}

impl Server {
    /// `model` with its adapters loaded; each adapter is served under its own name.
    pub fn new(
        mut model: Llama,
        assets: &ChatAssets,
        template: ChatTemplate,
        config: ServeConfig,
    ) -> std::result::Result<Self, SetupError> {
        let adapters: Vec<String> = model
            .adapter_names()
            .into_iter()
            .map(str::to_string)
            .collect();
        if adapters.contains(&config.model_name) {
            return Err(SetupError::Config(format!(
                "an adapter is named like the base model `{}`",
                config.model_name
            )));
        }
        model
            .set_active_adapter(None)
            .map_err(|e| SetupError::Config(e.to_string()))?;
        let encoder = Encoder::new(
            assets.tokenizer.clone(),
            template.clone(),
            EncodeOptions::default(),
        )?;
        let stop_ids = stop_tokens(encoder.end_of_turn_ids(), &assets.eos_token_ids)
            .map_err(|e| SetupError::Config(e.to_string()))?;
        let vocab = TokenVocab::new(&assets.tokenizer, &stop_ids)?;
        let compile = |f: &DefaultFormat| {
            let grammar =
                ReplyGrammar::from_schema(&vocab, "server default", &f.schema).map_err(|e| {
                    SetupError::Config(format!("{}: the JSON schema cannot be used: {e}", f.source))
                })?;
            // Replies under it are never cut: their token limit is raised to the schema's
            // bound (one byte a token at least, and the end of turn).
            let bound = max_json_bytes(&f.schema).map(|b| b + 1);
            if bound.is_none() {
                tracing::warn!(
                    "{}: the schema does not bound its replies (give every string maxLength, every array maxItems, every integer minimum and maximum, every object additionalProperties false), so a reply can be cut at the token limit",
                    f.source
                );
            }
            Ok::<_, SetupError>(routes::DefaultGrammar { grammar, bound })
        };
        let default_grammar = config.default_format.as_ref().map(compile).transpose()?;
        let mut adapter_grammars = HashMap::new();
        for (name, f) in &config.adapter_formats {
            if !adapters.contains(name) {
                return Err(SetupError::Config(format!(
                    "{}: no adapter is served as `{name}`",
                    f.source
                )));
            }
            adapter_grammars.insert(name.clone(), compile(f)?);
        }
        let context = model.config().max_position_embeddings;
        let engine = Arc::new(Engine::start(
            model,
            assets.tokenizer.clone(),
            vocab.clone(),
            stop_ids,
            config.engine.clone(),
        ));
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let state = routes::AppState {
            engine,
            template,
            tokenizer: assets.tokenizer.clone(),
            vocab,
            base_name: config.model_name.clone(),
            adapters: Mutex::new(adapters),
            allow_runtime_lora: config.allow_runtime_lora,
            context,
            api_key: config.api_key.clone(),
            grammars: Mutex::new(HashMap::new()),
            prep_slots: tokio::sync::Semaphore::new(PREPARING_AT_ONCE),
            default_grammar,
            adapter_grammars,
            next_id: AtomicU64::new(0),
            started,
        };
        Ok(Server {
            state: Arc::new(state),
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The served model names: the base first, then the adapters.
    pub fn model_names(&self) -> Vec<String> {
        let mut names = vec![self.state.base_name.clone()];
        names.extend(self.state.adapter_names());
        names
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.state.engine
    }

    /// The routes, e.g. to serve them elsewhere.
    pub fn router(&self) -> axum::Router {
        routes::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves; then takes no new connections, lets
    /// the requests in flight finish (cancelling them after the grace period) and stops the
    /// model worker.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::result::Result<(), SetupError> {
        let engine = self.state.engine.clone();
        let grace = self.shutdown_grace;
        let signalled = Arc::new(tokio::sync::Notify::new());
        let on_signal = {
            let signalled = signalled.clone();
            async move {
                shutdown.await;
                tracing::info!(
                    grace_s = grace.as_secs_f64(),
                    "shutting down: finishing the requests in flight"
                );
                signalled.notify_one();
            }
        };
        // Past the grace period, every running request ends at its next token.
        let canceller = {
            let engine = engine.clone();
            tokio::spawn(async move {
                signalled.notified().await;
                tokio::time::sleep(grace).await;
                tracing::warn!("grace period over: cancelling the requests in flight");
                engine.cancel_all();
            })
        };
        axum::serve(listener, self.router())
            .with_graceful_shutdown(on_signal)
            .await?;
        canceller.abort();
        tokio::task::spawn_blocking(move || engine.shutdown())
            .await
            .map_err(|e| SetupError::Config(format!("stopping the model worker: {e}")))?;
        tracing::info!("stopped");
        Ok(())
    }
}
