//! The HTTP side: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, bearer-token
//! checks, and OpenAI error bodies for everything else (unknown routes and methods, bodies
//! too large).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use teamtune_data::{ChatTemplate, Message};
use teamtune_guide::{prompt_tokens_with_tools, PromptError, ReplyGrammar, TokenVocab};
use teamtune_llama::SamplingParams;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::unbounded_channel;

use crate::api::{self, Checked, FinishReason, Format, ResponseMeta};
use crate::engine::{AdapterChange, Engine, Event, Job};
use crate::error::{Result, ServeError};
use crate::sse::SseStream;
use crate::tools::{self, Tools};

/// Largest request body accepted (a longer one is a 413).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Compiled grammars kept for reuse (by schema text); the cache is emptied when full.
const GRAMMAR_CACHE: usize = 64;
/// The sampling seed of requests that give none: `teamtune generate`'s default.
const DEFAULT_SEED: u64 = 299792458;

/// A server-side reply format: its grammar and, when the schema bounds its replies, the most
/// tokens one can take (the token limit of its requests is raised to it).
pub struct DefaultGrammar {
    pub grammar: ReplyGrammar,
    pub bound: Option<usize>,
}

/// Everything a request handler needs.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub template: ChatTemplate,
    pub tokenizer: Tokenizer,
    /// For JSON replies: the vocabulary the grammars are compiled for.
    pub vocab: TokenVocab,
    /// The base model's name; requests for it run without an adapter.
    pub base_name: String,
    /// The adapters served now (runtime loads and unloads change it).
    pub adapters: Mutex<Vec<String>>,
    pub allow_runtime_lora: bool,
    /// The model's context in tokens: prompt + reply must fit.
    pub context: usize,
    pub api_key: Option<String>,
    pub grammars: Mutex<HashMap<String, ReplyGrammar>>,
    /// Requests being prepared (templated, tokenised, grammar compiled) at once, at most.
    pub prep_slots: tokio::sync::Semaphore,
    /// For requests without `response_format`: the server-wide schema's grammar, and the
    /// adapters' own ones, which come first.
    pub default_grammar: Option<DefaultGrammar>,
    pub adapter_grammars: HashMap<String, DefaultGrammar>,
    pub next_id: AtomicU64,
    pub started: u64,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn require_key(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let err = match given.and_then(bearer_token) {
            None => Some("missing bearer token: send `Authorization: Bearer <key>`"),
            Some(t) if !constant_time_eq(t.trim().as_bytes(), key.as_bytes()) => {
                Some("incorrect API key")
            }
            Some(_) => None,
        };
        if let Some(e) = err {
            return ServeError::Unauthorized(e).into_response();
        }
    }
    next.run(request).await
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110), so `bearer` and `BEARER` are accepted as well.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn unknown_route(method: Method, uri: Uri) -> ServeError {
    ServeError::UnknownRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
        status: StatusCode::NOT_FOUND,
    }
}

async fn wrong_method(method: Method, uri: Uri) -> ServeError {
    ServeError::UnknownRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
        status: StatusCode::METHOD_NOT_ALLOWED,
    }
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    Json(json!({"status": "ok", "engine": state.engine.stats()}))
}

async fn list_models(State(state): State<Shared>) -> Json<Value> {
    let model = |id: &str, parent: Option<&str>| {
        json!({"id": id, "object": "model", "created": state.started, "owned_by": "teamtune",
               "root": state.base_name, "parent": parent})
    };
    let mut data = vec![model(&state.base_name, None)];
    data.extend(
        state
            .adapter_names()
            .iter()
            .map(|a| model(a, Some(&state.base_name))),
    );
    Json(json!({"object": "list", "data": data}))
}

/// A request checked and turned into what the engine runs: the CPU work of a request
/// (parsing, the chat template, tokenising, compiling a grammar).
struct Prepared {
    checked: Checked,
    adapter: Option<String>,
    tools: Option<Arc<Tools>>,
    prompt: Vec<u32>,
    max_tokens: usize,
    grammar: Option<ReplyGrammar>,
}

fn prepare(state: &AppState, body: &[u8]) -> Result<Prepared> {
    let checked = api::parse(body)?.check()?;
    let adapter = state.adapter_of(&checked.model)?;
    let tools = checked.tools.clone().filter(Tools::shown).map(Arc::new);
    let renders_tools = state.template.renders_tools();
    let messages = tools::messages_for_template(&checked.messages, tools.as_deref(), renders_tools);
    let definitions = tools
        .as_ref()
        .filter(|_| renders_tools)
        .map(|t| &t.definitions);
    let prompt = state.prompt_tokens(&messages, definitions)?;
    let mut max_tokens = state.token_budget(prompt.len(), checked.max_tokens)?;
    // A required or named call is decoded under its schema; with functions on offer, the
    // server's default format would rule out calling them, so it does not apply.
    let grammar = match (&tools, &checked.format) {
        (Some(t), format) => match state.tool_grammar(t)? {
            Some(g) => Some(g),
            None => format
                .as_ref()
                .map(|f| state.grammar(f))
                .transpose()?
                .flatten(),
        },
        (None, Some(format)) => state.grammar(format)?,
        (None, None) => match state.default_grammar(adapter.as_deref()) {
            Some(d) => {
                // The agents' rule: a reply under the server's schema is never cut into
                // invalid JSON by a token limit (as far as the context allows).
                if let Some(bound) = d.bound {
                    let left = state.context - prompt.len();
                    max_tokens = max_tokens.max(bound.min(left));
                }
                Some(d.grammar.clone())
            }
            None => None,
        },
    };
    Ok(Prepared {
        checked,
        adapter,
        tools,
        prompt,
        max_tokens,
        grammar,
    })
}

async fn chat_completions(
    State(state): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body = body.map_err(body_error)?;
    // The CPU work runs on the blocking pool, a bounded number at a time, so that the async
    // threads keep answering (`/health`, streams, other clients) whatever the bodies are.
    let prepared = {
        let _slot = state
            .prep_slots
            .acquire()
            .await
            .map_err(|_| ServeError::ShuttingDown)?;
        let state = state.clone();
        tokio::task::spawn_blocking(move || prepare(&state, &body))
            .await
            .map_err(|_| ServeError::Internal("preparing a request panicked".into()))??
    };
    let Prepared {
        checked,
        adapter,
        tools,
        prompt,
        max_tokens,
        grammar,
    } = prepared;
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = ResponseMeta {
        id: format!("chatcmpl-{:x}-{id}", state.started),
        created: now_s(),
        model: checked.model.clone(),
    };
    let (tx, rx) = unbounded_channel();
    let params = sampling(&checked, id);
    state.engine.submit(Job {
        adapter,
        prompt,
        params,
        max_tokens,
        stop: checked.stop.clone(),
        grammar,
        // A reply that may be a call is known only whole: it streams at its end.
        stream: checked.stream && tools.is_none(),
        n: checked.n,
        logprobs: checked.logprobs,
        events: tx,
    })?;
    let call_id = format!("call_{:x}_{id}", state.started);
    if checked.stream {
        let stream = SseStream::new(rx, meta, tools, call_id, checked.n, checked.include_usage);
        let mut response = Body::from_stream(stream).into_response();
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(response);
    }
    // Dropping `rx` (the client left, so hyper dropped this future) ends the decode.
    let mut rx = rx;
    let mut done: Vec<Option<Answered>> = (0..checked.n).map(|_| None).collect();
    while done.iter().any(Option::is_none) {
        match rx.recv().await {
            Some(Event::Text { .. }) => continue,
            Some(Event::Done {
                choice,
                text,
                finish,
                usage,
                logprobs,
            }) => {
                if let Some(slot) = done.get_mut(choice) {
                    *slot = Some(Answered {
                        text,
                        finish,
                        usage,
                        logprobs,
                    });
                }
            }
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ServeError::ShuttingDown),
        }
    }
    let done: Vec<Answered> = done.into_iter().flatten().collect();
    let usage = api::Usage::of_choices(&done.iter().map(|d| d.usage).collect::<Vec<_>>());
    let choices = done
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let call_id = choice_call_id(&call_id, i);
            let (message, finish) = reply_message(&a.text, a.finish, tools.as_deref(), &call_id);
            (message, finish, a.logprobs)
        })
        .collect();
    Ok(Json(api::completion(&meta, choices, usage)).into_response())
}

#[derive(Deserialize)]
struct LoadLora {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadLora {
    lora_name: String,
}

/// The body of an adapter route, or the 400 / 403 / 413 a bad one gets.
fn adapter_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<T> {
    if !state.allow_runtime_lora {
        return Err(ServeError::Forbidden(
            "loading and unloading adapters at run time is off: start the server with --allow-runtime-lora",
        ));
    }
    let body = body.map_err(body_error)?;
    api::parse_json(&body)
}

/// `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`: loads a PEFT adapter folder and
/// serves it under the name at once.
async fn load_lora_adapter(
    State(state): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let req: LoadLora = adapter_request(&state, body)?;
    let name = req.lora_name.trim().to_string();
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(ServeError::invalid_value(
            "lora_name must be 1 to 256 printable characters",
            "lora_name",
        ));
    }
    if name == state.base_name || state.adapter_names().contains(&name) {
        return Err(ServeError::invalid_value(
            format!("the name `{name}` is already served"),
            "lora_name",
        ));
    }
    let (done, outcome) = tokio::sync::oneshot::channel();
    state.engine.change_adapter(AdapterChange::Load {
        name: name.clone(),
        dir: std::path::PathBuf::from(&req.lora_path),
        done,
    })?;
    outcome.await.map_err(|_| ServeError::ShuttingDown)??;
    state
        .adapters
        .lock()
        .expect("adapter list")
        .push(name.clone());
    Ok(Json(json!({"status": "ok", "lora_name": name})).into_response())
}

/// `POST /v1/unload_lora_adapter {"lora_name"}`: stops serving the name at once, and removes
/// the adapter when the requests using it have finished.
async fn unload_lora_adapter(
    State(state): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let req: UnloadLora = adapter_request(&state, body)?;
    let removed = {
        let mut list = state.adapters.lock().expect("adapter list");
        let before = list.len();
        list.retain(|a| *a != req.lora_name);
        before != list.len()
    };
    if !removed {
        return Err(ServeError::ModelNotFound(req.lora_name));
    }
    let (done, outcome) = tokio::sync::oneshot::channel();
    state.engine.change_adapter(AdapterChange::Unload {
        name: req.lora_name.clone(),
        done,
    })?;
    outcome.await.map_err(|_| ServeError::ShuttingDown)??;
    Ok(Json(json!({"status": "ok", "lora_name": req.lora_name})).into_response())
}

fn body_error(e: BytesRejection) -> ServeError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ServeError::BodyTooLarge {
            limit: MAX_BODY_BYTES,
        }
    } else {
        ServeError::invalid(format!("cannot read the body: {e}"), None)
    }
}

fn sampling(c: &Checked, id: u64) -> SamplingParams {
    SamplingParams {
        temperature: c.temperature,
        top_p: c.top_p,
        // No seed: a different one per request (as OpenAI samples), unless greedy.
        seed: c.seed.unwrap_or_else(|| {
            if c.temperature == 0.0 {
                DEFAULT_SEED
            } else {
                DEFAULT_SEED ^ (now_s() << 20) ^ id
            }
        }),
        ..SamplingParams::default()
    }
}

impl AppState {
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.lock().expect("adapter list").clone()
    }

    /// `None` for the base model, the adapter's name for an adapter; 404 otherwise.
    fn adapter_of(&self, model: &str) -> Result<Option<String>> {
        if model == self.base_name {
            Ok(None)
        } else if self.adapter_names().iter().any(|a| a == model) {
            Ok(Some(model.to_string()))
        } else {
            Err(ServeError::ModelNotFound(model.to_string()))
        }
    }

    /// The conversation rendered with the generation prompt (and the function definitions,
    /// for a template that shows them) and tokenised (the template writes the special
    /// tokens: none are added again), as `teamtune generate` does.
    fn prompt_tokens(&self, messages: &[Message], tools: Option<&Value>) -> Result<Vec<u32>> {
        prompt_tokens_with_tools(&self.template, &self.tokenizer, messages, tools).map_err(|e| {
            match e {
                PromptError::Template(e) => ServeError::invalid(
                    format!("the chat template refused the messages: {e}"),
                    Some("messages"),
                ),
                PromptError::SpecialText => {
                    ServeError::invalid(PromptError::SpecialText.to_string(), Some("messages"))
                }
                PromptError::Tokenizer(e) => {
                    ServeError::Internal(format!("tokenizing the prompt: {e}"))
                }
            }
        })
    }

    /// How many tokens the reply may have: as asked when it fits in the context with the
    /// prompt, else an error; all that is left when not asked.
    fn token_budget(&self, prompt: usize, asked: Option<usize>) -> Result<usize> {
        if prompt >= self.context {
            return Err(ServeError::ContextLength {
                context: self.context,
                prompt,
            });
        }
        let left = self.context - prompt;
        match asked {
            None => Ok(left),
            Some(m) if m <= left => Ok(m),
            Some(m) => Err(ServeError::InvalidRequest {
                message: format!(
                    "this model's maximum context length is {} tokens; the messages take {prompt} and {m} were asked for the reply (at most {left})",
                    self.context
                ),
                param: Some("max_tokens".into()),
                code: Some("invalid_value"),
            }),
        }
    }

    /// The server's format for a request that asked for none: the adapter's, else the
    /// server-wide one, else free text.
    fn default_grammar(&self, adapter: Option<&str>) -> Option<&DefaultGrammar> {
        adapter
            .and_then(|a| self.adapter_grammars.get(a))
            .or(self.default_grammar.as_ref())
    }

    fn grammar(&self, format: &Format) -> Result<Option<ReplyGrammar>> {
        let Some((name, schema)) = format.schema() else {
            return Ok(None);
        };
        self.compiled(&name, &schema).map(Some).map_err(|e| {
            ServeError::invalid_value(
                format!(
                    "the response format's JSON schema cannot be used: {}",
                    first_line(&e)
                ),
                "response_format.json_schema.schema",
            )
        })
    }

    /// Checks every function's schema (a 400 names the first unusable one), and returns the
    /// grammar of a required or named call.
    fn tool_grammar(&self, tools: &Tools) -> Result<Option<ReplyGrammar>> {
        for (i, f) in tools.functions.iter().enumerate() {
            self.compiled(&f.name, &tools::call_schema(f))
                .map_err(|e| {
                    ServeError::invalid_value(
                        format!(
                            "tools[{i}].function.parameters is not a usable JSON schema: {}",
                            first_line(&e)
                        ),
                        &format!("tools[{i}].function.parameters"),
                    )
                })?;
        }
        let Some(schema) = tools.reply_schema() else {
            return Ok(None);
        };
        self.compiled("tool call", &schema).map(Some).map_err(|e| {
            ServeError::invalid_value(
                format!(
                    "the functions' schemas cannot be combined: {}",
                    first_line(&e)
                ),
                "tools",
            )
        })
    }

    /// The grammar of a schema, compiled once and kept (by schema text).
    fn compiled(
        &self,
        name: &str,
        schema: &Value,
    ) -> std::result::Result<ReplyGrammar, teamtune_guide::ConstraintError> {
        let key = schema.to_string();
        if let Some(g) = self.grammars.lock().expect("grammar cache").get(&key) {
            return Ok(g.clone());
        }
        let g = ReplyGrammar::from_schema(&self.vocab, name, schema)?;
        // Some schemas compile and then fail on their first token (a `$ref` to itself that
        // nothing ends): find out now, so that it is this request's 400 and not a failure in
        // the middle of a decode.
        let mut probe = g.constraint();
        probe.allowed()?;
        probe.fast_forward()?;
        let mut cache = self.grammars.lock().expect("grammar cache");
        if cache.len() >= GRAMMAR_CACHE {
            cache.clear();
        }
        cache.insert(key, g.clone());
        Ok(g)
    }
}

/// An error's first line: the grammar compiler appends its parser state (internal, long) on
/// the lines after.
fn first_line(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or("").trim().to_string()
}

/// One choice's finished reply, as the worker sent it.
struct Answered {
    text: String,
    finish: FinishReason,
    usage: api::Usage,
    logprobs: Option<Value>,
}

/// The id of choice `i`'s function call (the request's id, then the choice).
pub(crate) fn choice_call_id(call_id: &str, choice: usize) -> String {
    if choice == 0 {
        call_id.to_string()
    } else {
        format!("{call_id}_{choice}")
    }
}

/// The answer's `message` and finish reason: a function call when the reply is one.
pub(crate) fn reply_message(
    text: &str,
    finish: FinishReason,
    tools: Option<&Tools>,
    call_id: &str,
) -> (Value, FinishReason) {
    match tools.and_then(|t| t.read_call(text)) {
        Some(call) => (
            json!({"role": "assistant", "content": null,
                   "tool_calls": tools::calls_json(&call, call_id)}),
            FinishReason::ToolCalls,
        ),
        None => (json!({"role": "assistant", "content": text}), finish),
    }
}
