//! Conversations in the common chat format and their validation.
//!
//! One JSON object per conversation:
//! `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "task": ..., "score": ..., ...}`.
//! Fields other than `messages`, `task` and `score` are kept as [`Conversation::metadata`]; fields of
//! a message other than `role` and `content` are kept in [`Message::extra`] and passed to the chat
//! template, as transformers does (fields whose value is `null` are dropped, as transformers does).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

pub use teamtune_formats::{Message, Role};

/// Where a conversation came from: file and 1-based line, or a label for conversations built in
/// memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub file: Arc<Path>,
    pub line: u64,
}

impl Source {
    pub fn new(file: impl Into<PathBuf>, line: u64) -> Self {
        Source {
            file: Arc::from(file.into().into_boxed_path()),
            line,
        }
    }
    /// A source for a conversation that did not come from a file.
    pub fn memory(index: u64) -> Self {
        Source::new("<memory>", index)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A validated conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub task: Option<String>,
    pub score: Option<f64>,
    /// All other top-level fields, in file order.
    pub metadata: Map<String, Value>,
    pub source: Source,
}

/// A field that failed validation: the path of the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// A short description of a JSON value's type for error messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => {
            let mut short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                short.push('…');
            }
            format!("string {short:?}")
        }
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

impl Conversation {
    /// A conversation built in memory (for example by the agent runtime).
    pub fn new(messages: Vec<Message>) -> Self {
        Conversation {
            messages,
            task: None,
            score: None,
            metadata: Map::new(),
            source: Source::memory(0),
        }
    }

    pub fn with_task(mut self, task: impl Into<String>) -> Self {
        self.task = Some(task.into());
        self
    }

    pub fn with_score(mut self, score: f64) -> Self {
        self.score = Some(score);
        self
    }

    /// Checks the rules that every conversation must satisfy: at least one message, at least one
    /// assistant turn.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.messages.is_empty() {
            return Err(FieldError::at(
                "messages",
                "empty: a conversation needs at least one assistant turn",
            ));
        }
        if !self.messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(FieldError::at(
                "messages",
                format!(
                    "no assistant turn among {} messages: nothing to train on",
                    self.messages.len()
                ),
            ));
        }
        Ok(())
    }

    /// Parses and validates one record. The error names the offending field.
    pub fn from_json(value: Value, source: Source) -> Result<Self, FieldError> {
        let mut obj = match value {
            Value::Object(m) => m,
            other => {
                return Err(FieldError {
                    field: None,
                    message: format!(
                        "expected a JSON object with a \"messages\" array, got {}",
                        describe(&other)
                    ),
                })
            }
        };
        let messages = match obj.shift_remove("messages") {
            None => {
                return Err(FieldError::at(
                    "messages",
                    "missing: every record needs a \"messages\" array",
                ))
            }
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(FieldError::at(
                    "messages",
                    format!("expected an array of messages, got {}", describe(&other)),
                ))
            }
        };
        let mut parsed = Vec::with_capacity(messages.len());
        for (i, m) in messages.into_iter().enumerate() {
            parsed.push(parse_message(i, m)?);
        }
        let task = match obj.shift_remove("task") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(FieldError::at(
                    "task",
                    format!("expected a string, got {}", describe(&other)),
                ))
            }
        };
        let score = match obj.shift_remove("score") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if f.is_finite() => Some(f),
                _ => {
                    return Err(FieldError::at(
                        "score",
                        format!("number {n} is not a finite float"),
                    ))
                }
            },
            Some(other) => {
                return Err(FieldError::at(
                    "score",
                    format!("expected a number, got {}", describe(&other)),
                ))
            }
        };
        let conv = Conversation {
            messages: parsed,
            task,
            score,
            metadata: obj,
            source,
        };
        conv.validate()?;
        Ok(conv)
    }

    /// The record as JSON again (`messages`, `task`, `score`, then metadata).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "messages".into(),
            Value::Array(self.messages.iter().map(Message::to_json).collect()),
        );
        if let Some(t) = &self.task {
            m.insert("task".into(), Value::String(t.clone()));
        }
        if let Some(s) = self.score {
            m.insert("score".into(), serde_json::json!(s));
        }
        for (k, v) in &self.metadata {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// Number of assistant turns.
    pub fn assistant_turns(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count()
    }
}

fn parse_message(i: usize, m: Value) -> Result<Message, FieldError> {
    let at = |f: &str| format!("messages[{i}]{f}");
    let mut obj = match m {
        Value::Object(o) => o,
        other => {
            return Err(FieldError::at(
                at(""),
                format!(
                    "expected an object with \"role\" and \"content\", got {}",
                    describe(&other)
                ),
            ))
        }
    };
    let role = match obj.shift_remove("role") {
        None => return Err(FieldError::at(at(".role"), "missing")),
        Some(Value::String(s)) => match Role::parse(&s) {
            Some(r) => r,
            None => {
                return Err(FieldError::at(
                    at(".role"),
                    format!(
                    "unknown role {s:?} (expected \"system\", \"user\", \"assistant\" or \"tool\")"
                ),
                ))
            }
        },
        Some(other) => {
            return Err(FieldError::at(
                at(".role"),
                format!("expected a string, got {}", describe(&other)),
            ))
        }
    };
    let content = match obj.shift_remove("content") {
        None => return Err(FieldError::at(at(".content"), "missing")),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(FieldError::at(
                at(".content"),
                format!("expected a string, got {}", describe(&other)),
            ))
        }
    };
    // transformers drops message keys whose value is None before rendering.
    obj.retain(|_, v| !v.is_null());
    Ok(Message {
        role,
        content,
        extra: obj,
    })
}
