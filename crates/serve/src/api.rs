//! The chat-completions request as OpenAI defines it, parsed and checked into what the engine
//! runs; the response and stream-chunk bodies.
//!
//! Fields this server does not implement are refused when they ask for something (`logprobs`
//! on a streamed request, penalties other than 0) and ignored when they do not (`user`, `metadata`,
//! `store`, `parallel_tool_calls`, ...), as vLLM does. `tools` are checked in [`crate::tools`].

use serde::Deserialize;
use serde_json::{json, Value};
use teamtune_data::{Message, Role};

use crate::error::{Result, ServeError};
use crate::logprobs::MAX_TOP_LOGPROBS;
use crate::tools::{ToolChoiceIn, ToolIn, Tools};

/// The most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// The most choices (`n`) a request may ask for.
pub const MAX_N: i64 = 16;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<ResponseFormat>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<ToolIn>>,
    pub tool_choice: Option<ToolChoiceIn>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant's earlier function calls.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    pub function: CalledFunction,
}

#[derive(Debug, Deserialize)]
pub struct CalledFunction {
    pub name: String,
    /// The arguments as a JSON string (OpenAI's form) or an object.
    pub arguments: Value,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaSpec },
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaSpec {
    pub name: String,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
    pub description: Option<String>,
}

/// What the reply must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Text,
    /// Any JSON object.
    JsonObject,
    /// A JSON value matching `schema` (an object).
    JsonSchema {
        name: String,
        schema: Value,
    },
}

impl Format {
    /// The schema to compile, if any: `{"type": "object"}` for JSON mode.
    pub fn schema(&self) -> Option<(String, Value)> {
        match self {
            Format::Text => None,
            Format::JsonObject => Some(("json_object".into(), json!({"type": "object"}))),
            Format::JsonSchema { name, schema } => Some((name.clone(), schema.clone())),
        }
    }
}

/// A request checked for everything that does not need the model or the tokenizer.
#[derive(Debug, Clone)]
pub struct Checked {
    pub model: String,
    pub messages: Vec<Message>,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    /// As asked (`max_completion_tokens`, else `max_tokens`); `None`: up to the context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    /// How many replies (choices) to give.
    pub n: usize,
    /// `logprobs` asked for, with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// A streamed reply ends with a chunk of the usage (`stream_options.include_usage`).
    pub include_usage: bool,
    /// What the request asked for; `None` when it sent no `response_format` (the server's
    /// default format for the model applies then).
    pub format: Option<Format>,
    /// The functions the reply may call, if any.
    pub tools: Option<Tools>,
}

/// Parses a chat-completions body: invalid JSON or a field of the wrong type is a 400 naming
/// the field.
pub fn parse(body: &[u8]) -> Result<ChatRequest> {
    parse_json(body)
}

/// Parses any request body as [`parse`] does.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    // A body that is JSON but not an object would be reported by the first field serde looks
    // for (`invalid [0]` for an array): say what it is instead.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        if let Ok(v) = serde_json::from_slice::<Value>(body) {
            let kind = match v {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                Value::Null => "null",
                Value::Object(_) => "an object",
            };
            return Err(ServeError::invalid(
                format!("the body must be a JSON object, not {kind}"),
                None,
            ));
        }
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = (!matches!(path.as_str(), "." | "?" | "")).then_some(path);
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("the body is not valid JSON: {inner}")
        } else {
            match &param {
                Some(p) => format!("invalid `{p}`: {inner}"),
                None => format!("invalid request: {inner}"),
            }
        };
        ServeError::InvalidRequest {
            message,
            param,
            code: None,
        }
    })
}

impl ChatRequest {
    /// Checks the values; the first problem is the error.
    pub fn check(self) -> Result<Checked> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ServeError::invalid_value(
                format!("n = {n}: give 1 to {MAX_N} choices"),
                "n",
            ));
        }
        if self.messages.is_empty() {
            return Err(ServeError::invalid_value(
                "`messages` is empty: give at least one message",
                "messages",
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            messages.push(m.check(i)?);
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ServeError::invalid_value(
                format!("temperature {temperature} is outside [0, 2]"),
                "temperature",
            ));
        }
        let top_p = match self.top_p {
            Some(p) if !(p > 0.0 && p <= 1.0) => {
                return Err(ServeError::invalid_value(
                    format!("top_p {p} is outside (0, 1]"),
                    "top_p",
                ))
            }
            Some(p) if p < 1.0 => Some(p),
            _ => None,
        };
        let (max_param, max) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match max {
            Some(m) if m < 1 => {
                return Err(ServeError::invalid_value(
                    format!("{max_param} = {m}: it must be at least 1"),
                    max_param,
                ))
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOP {
            return Err(ServeError::invalid_value(
                format!(
                    "{} stop sequences: at most {MAX_STOP} are allowed",
                    stop.len()
                ),
                "stop",
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ServeError::invalid_value(
                "a stop sequence is empty",
                "stop",
            ));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = v.filter(|&v| v != 0.0) {
                return Err(ServeError::invalid_value(
                    format!("{name} = {v} is not supported (only 0)"),
                    name,
                ));
            }
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(t)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&t) => {
                return Err(ServeError::invalid_value(
                    format!("top_logprobs = {t}: give 0 to {MAX_TOP_LOGPROBS}"),
                    "top_logprobs",
                ))
            }
            (false, Some(t)) if t > 0 => {
                return Err(ServeError::invalid_value(
                    "top_logprobs needs logprobs: true",
                    "top_logprobs",
                ))
            }
            (true, _) if self.stream == Some(true) => {
                return Err(ServeError::invalid_value(
                    "logprobs are not streamed yet: ask without stream",
                    "logprobs",
                ))
            }
            (true, top) => Some(top.unwrap_or(0) as usize),
            (false, _) => None,
        };
        let tools = crate::tools::check(self.tools, self.tool_choice)?;
        let format = match self.response_format {
            None => None,
            Some(f) => Some(Format::checked(f)?),
        };
        Ok(Checked {
            model: self.model,
            messages,
            temperature,
            top_p,
            max_tokens,
            stop,
            seed: self.seed.map(|s| s as u64),
            stream: self.stream.unwrap_or(false),
            n: n as usize,
            logprobs,
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            format,
            tools,
        })
    }
}

impl Format {
    fn checked(format: ResponseFormat) -> Result<Format> {
        Ok(match format {
            ResponseFormat::Text => Format::Text,
            ResponseFormat::JsonObject => Format::JsonObject,
            ResponseFormat::JsonSchema { json_schema } => {
                let _ = (json_schema.strict, json_schema.description);
                if json_schema.name.is_empty() {
                    return Err(ServeError::invalid_value(
                        "response_format.json_schema.name is empty",
                        "response_format.json_schema.name",
                    ));
                }
                match json_schema.schema {
                    None => Format::JsonObject,
                    Some(schema @ Value::Object(_)) => Format::JsonSchema {
                        name: json_schema.name,
                        schema,
                    },
                    Some(other) => {
                        return Err(ServeError::invalid_value(
                            format!("the JSON schema must be an object, not {other}"),
                            "response_format.json_schema.schema",
                        ))
                    }
                }
            }
        })
    }
}

impl MessageIn {
    fn check(self, i: usize) -> Result<Message> {
        let role = match self.role.as_str() {
            // OpenAI's newer name for the system role.
            "developer" => Role::System,
            other => Role::parse(other).ok_or_else(|| {
                ServeError::invalid_value(
                    format!(
                        "messages[{i}].role `{other}` is not one of system, developer, user, assistant, tool"
                    ),
                    &format!("messages[{i}].role"),
                )
            })?,
        };
        let content = match self.content {
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ServeError::invalid_value(
                                format!(
                                    "messages[{i}].content[{j}]: only text parts are supported, not `{kind}`"
                                ),
                                &format!("messages[{i}].content[{j}]"),
                            ))
                        }
                    }
                }
                text
            }
            // An assistant message that only calls functions has no content.
            None if role == Role::Assistant && self.tool_calls.is_some() => String::new(),
            None => {
                return Err(ServeError::invalid_value(
                    format!("messages[{i}] has no content"),
                    &format!("messages[{i}].content"),
                ))
            }
        };
        let mut message = Message::new(role, content);
        if let Some(calls) = self.tool_calls {
            if role != Role::Assistant {
                return Err(ServeError::invalid_value(
                    format!("messages[{i}]: only assistant messages have tool_calls"),
                    &format!("messages[{i}].tool_calls"),
                ));
            }
            // Templates read the arguments as an object (OpenAI sends a JSON string).
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|c| {
                    let arguments = match c.function.arguments {
                        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
                        other => other,
                    };
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.function.name, "arguments": arguments}})
                })
                .collect();
            message
                .extra
                .insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some(id) = self.tool_call_id {
            message
                .extra
                .insert("tool_call_id".into(), Value::String(id));
        }
        Ok(message)
    }
}

/// Why a reply ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of turn, a stop sequence, or the schema's JSON complete.
    Stop,
    /// The token limit.
    Length,
    /// The reply is a function call.
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}

/// Identity of one response: its id, creation time and model name.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// The body of a non-streamed answer: each choice's `message` (`{"role": "assistant", ...}`),
/// finish reason and log-probabilities (`null` when not asked for), in order.
pub fn completion(
    meta: &ResponseMeta,
    choices: Vec<(Value, FinishReason, Option<Value>)>,
    usage: Usage,
) -> Value {
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(index, (message, finish, logprobs))| {
            json!({"index": index, "message": message, "logprobs": logprobs,
                   "finish_reason": finish.as_str()})
        })
        .collect();
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": choices,
        "usage": usage.to_json(),
    })
}

impl Usage {
    /// The usage of a request's choices together: the prompt once, every choice's reply.
    pub fn of_choices(choices: &[Usage]) -> Usage {
        Usage {
            prompt_tokens: choices.first().map_or(0, |u| u.prompt_tokens),
            completion_tokens: choices.iter().map(|u| u.completion_tokens).sum(),
            cached_tokens: choices.first().map_or(0, |u| u.cached_tokens),
        }
    }
}

/// The chunk after the last one when `stream_options.include_usage` asks for it: no choices,
/// the usage.
pub fn usage_chunk(meta: &ResponseMeta, usage: Usage) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [],
        "usage": usage.to_json(),
    })
}

/// One stream chunk: a delta, and on the last one the finish reason. `usage`: `None` leaves the
/// field out, `Some(None)` writes `null` (every chunk, when the usage comes at the end).
pub fn chunk(
    meta: &ResponseMeta,
    index: usize,
    delta: Value,
    finish: Option<FinishReason>,
    usage: Option<Option<Usage>>,
) -> Value {
    let mut c = json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [{
            "index": index,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish.map(FinishReason::as_str),
        }],
    });
    if let Some(u) = usage {
        c["usage"] = u.map_or(Value::Null, Usage::to_json);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<Checked> {
        parse(body.as_bytes())?.check()
    }

    fn param(e: ServeError) -> Option<String> {
        match e {
            ServeError::InvalidRequest { param, .. } => param,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn parses_a_full_request() {
        let c = check(
            r#"{"model":"m","messages":[{"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}],
                "temperature":0,"top_p":1,"max_completion_tokens":7,"max_tokens":9,"stop":"\n",
                "seed":-1,"n":1,"stream":true,"user":"ignored",
                "response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object"}}}}"#,
        )
        .unwrap();
        assert_eq!(c.messages[0].role, Role::System);
        assert_eq!(c.messages[1].content, "hi there");
        assert_eq!(c.temperature, 0.0);
        assert_eq!(c.top_p, None);
        assert_eq!(c.max_tokens, Some(7));
        assert_eq!(c.stop, vec!["\n".to_string()]);
        assert_eq!(c.seed, Some(u64::MAX));
        assert!(c.stream);
        assert!(matches!(c.format, Some(Format::JsonSchema { .. })));
    }

    #[test]
    fn names_the_offending_parameter() {
        let base = |extra: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#)
        };
        let cases = [
            (base(r#","temperature":"hot""#), "temperature"),
            (base(r#","temperature":3"#), "temperature"),
            (base(r#","top_p":0"#), "top_p"),
            (base(r#","n":0"#), "n"),
            (base(r#","n":17"#), "n"),
            (base(r#","max_tokens":0"#), "max_tokens"),
            (base(r#","stop":["a","b","c","d","e"]"#), "stop"),
            (base(r#","logprobs":true,"stream":true"#), "logprobs"),
            (base(r#","top_logprobs":3"#), "top_logprobs"),
            (
                base(r#","logprobs":true,"top_logprobs":21"#),
                "top_logprobs",
            ),
            (base(r#","presence_penalty":0.5"#), "presence_penalty"),
            (
                base(
                    r#","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":3}}"#,
                ),
                "response_format.json_schema.schema",
            ),
            (
                r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#.to_string(),
                "messages[0].role",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#
                    .to_string(),
                "messages[0].content[0]",
            ),
            (r#"{"model":"m","messages":[]}"#.to_string(), "messages"),
        ];
        for (body, want) in cases {
            let got = param(check(&body).unwrap_err());
            assert_eq!(got.as_deref(), Some(want), "{body}");
        }
        assert_eq!(param(check("{not json").unwrap_err()), None);
        for (body, kind) in [
            ("[1, 2]", "an array"),
            (" \"x\"", "a string"),
            ("null", "null"),
        ] {
            let e = check(body).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("the body must be a JSON object, not {kind}"),
                "{body}"
            );
        }
        let e = check(&base(r#","response_format":{"type":"xml"}"#)).unwrap_err();
        assert!(e.to_string().contains("xml"), "{e}");
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        /// JSON shaped like requests: the real field names, wrong types and nesting among them.
        fn request_like() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|f| json!(f)),
                "[a-z_<|>\\\\\"]{0,10}".prop_map(Value::String),
                Just(json!("user")),
                Just(json!("json_schema")),
                Just(json!("function")),
            ];
            let key = prop_oneof![
                Just("model"),
                Just("messages"),
                Just("role"),
                Just("content"),
                Just("n"),
                Just("tools"),
                Just("tool_choice"),
                Just("function"),
                Just("parameters"),
                Just("response_format"),
                Just("type"),
                Just("json_schema"),
                Just("schema"),
                Just("stop"),
                Just("max_tokens"),
                Just("logprobs"),
                Just("top_logprobs"),
                Just("stream"),
                Just("stream_options"),
                Just("tool_calls"),
                Just("name"),
            ]
            .prop_map(str::to_string);
            leaf.prop_recursive(5, 96, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::vec((key.clone(), inner), 0..7)
                        .prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            /// Any bytes: an error or a request, never a panic.
            #[test]
            fn random_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse(&bytes).and_then(ChatRequest::check);
            }

            /// Request-shaped JSON with wrong types and nesting: the same.
            #[test]
            fn request_shaped_json_never_panics(v in request_like()) {
                let _ = parse(v.to_string().as_bytes()).and_then(ChatRequest::check);
            }
        }
    }
}
