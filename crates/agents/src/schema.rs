//! The JSON schema of one agent reply in one task.
//!
//! The schema is the contract between decoding and the world: every object it admits is
//! accepted by [`teamtune_gridworld::parse_reply`] for the task it was made for, with an action
//! the task allows. It is deliberately stricter than the parser (all six fields, in the order
//! of [`teamtune_gridworld::Reply`], strings only, no extra keys): the parser tolerates what
//! models write unconstrained, while a constrained model should write exactly the form the
//! training data has, so that constrained and trained replies look alike.

use serde_json::{json, Map, Value};
use teamtune_gridworld::{
    ActionName, TaskKind, TaskSpec, MAX_MEMORY_CHARS, MAX_MESSAGE_CHARS, MAX_TEXT_CHARS,
};
use teamtune_guide::{JsonStyle, ReplyGrammar, TokenVocab};

/// The reply's fields in the order they are written: reasoning before the action, so that
/// the model has stated its facts when it picks the action.
pub const FIELDS: [&str; 6] = [
    "reflection",
    "rationale",
    "action_name",
    "action_parameters",
    "message",
    "add_memory",
];

/// Length limits of the free-text fields, in characters (as `parse_reply` counts them).
///
/// They bound the length of a turn, and so its decoding time; they may not exceed the parser's
/// limits, since a longer string would be generated only to be refused. The defaults leave
/// room for the scripted experts' replies (a test holds them to that) with about twice their
/// longest (over 20 episodes of every task: reflection 40, rationale 115, message 44, memory
/// 27 characters). A base model tends to fill a field up to its limit, so looser limits cost
/// evaluation time without changing what a reply can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaOptions {
    pub max_reflection_chars: usize,
    pub max_rationale_chars: usize,
    pub max_message_chars: usize,
    pub max_memory_chars: usize,
}

impl Default for SchemaOptions {
    fn default() -> Self {
        SchemaOptions {
            max_reflection_chars: 80,
            max_rationale_chars: 160,
            max_message_chars: 80,
            max_memory_chars: 60,
        }
    }
}

impl SchemaOptions {
    /// The same limit for every text field (clamped to the parser's limits): handy to keep
    /// replies, or test walks, short.
    pub fn uniform(max_chars: usize) -> Self {
        SchemaOptions {
            max_reflection_chars: max_chars.min(MAX_TEXT_CHARS),
            max_rationale_chars: max_chars.min(MAX_TEXT_CHARS),
            max_message_chars: max_chars.min(MAX_MESSAGE_CHARS),
            max_memory_chars: max_chars.min(MAX_MEMORY_CHARS),
        }
    }

    /// An upper bound on the tokens of any reply this schema admits, so that a constrained
    /// reply is never cut off by a token limit (a cut reply is an invalid one). Every token is
    /// at least one byte, and one character of a JSON string is at most twelve bytes (an
    /// escaped surrogate pair, `\uD83D\uDE00`, for a character outside the BMP); the rest (keys, punctuation, the action and its parameters, the end-of-turn token) is
    /// well under 256 bytes.
    pub fn max_reply_tokens(&self) -> usize {
        let chars = self.max_reflection_chars
            + self.max_rationale_chars
            + self.max_message_chars
            + self.max_memory_chars;
        12 * chars + 256
    }
}

/// A reply schema that cannot be made for a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reply schema for task `{task}`: {reason}")]
pub struct SchemaError {
    pub task: String,
    pub reason: String,
}

/// The JSON schema of a reply in `task`.
///
/// `action_name` is an enum of exactly the task's allowed actions. Where an action takes
/// parameters (`pick` may name the item, `{"item": "a"}`), the schema is an `anyOf` of one
/// object per parameter shape, so that the parameters are tied to the action; every other
/// action has `{}`. Without `pick` it is a single object.
pub fn reply_schema(task: &TaskSpec, options: &SchemaOptions) -> Result<Value, SchemaError> {
    let err = |reason: String| SchemaError {
        task: task.id.clone(),
        reason,
    };
    for (field, value, max) in [
        ("reflection", options.max_reflection_chars, MAX_TEXT_CHARS),
        ("rationale", options.max_rationale_chars, MAX_TEXT_CHARS),
        ("message", options.max_message_chars, MAX_MESSAGE_CHARS),
        ("add_memory", options.max_memory_chars, MAX_MEMORY_CHARS),
    ] {
        if value > max {
            return Err(err(format!(
                "maxLength {value} of {field} exceeds the parser's limit of {max} characters"
            )));
        }
    }
    let allowed = task.allowed_actions();
    if allowed.is_empty() {
        return Err(err("the task allows no action".into()));
    }
    let plain: Vec<ActionName> = allowed
        .iter()
        .copied()
        .filter(|a| *a != ActionName::Pick)
        .collect();
    let mut branches = Vec::new();
    if !plain.is_empty() {
        branches.push(object(&plain, empty_object(), options));
    }
    if allowed.contains(&ActionName::Pick) {
        let items: Vec<String> = item_letters(task).map(|c| c.to_string()).collect();
        let params = json!({
            "type": "object",
            "properties": {"item": {"type": "string", "enum": items}},
            "additionalProperties": false,
        });
        branches.push(object(&[ActionName::Pick], params, options));
    }
    Ok(if branches.len() == 1 {
        branches.pop().unwrap()
    } else {
        json!({ "anyOf": branches })
    })
}

/// The task's [`reply_schema`] compiled for the vocabulary: once per task, as it costs about
/// as much as a hundred constraints. Compact JSON, as `Reply::to_json` writes it (the training
/// data's form, and fewer tokens); string escapes limited to the printable ones a reply needs.
pub fn reply_grammar(
    vocab: &TokenVocab,
    task: &TaskSpec,
    options: &SchemaOptions,
) -> crate::Result<ReplyGrammar> {
    let schema = reply_schema(task, options)?;
    let style = JsonStyle {
        allowed_escapes: Some("nt\"\\".into()),
    };
    Ok(ReplyGrammar::with_style(vocab, &task.id, schema, &style)?)
}

/// The actions a schema admits, in schema order (for checks and messages).
pub fn schema_actions(schema: &Value) -> Vec<String> {
    let branches: Vec<&Value> = match schema.get("anyOf").and_then(Value::as_array) {
        Some(b) => b.iter().collect(),
        None => vec![schema],
    };
    branches
        .iter()
        .filter_map(|b| b.pointer("/properties/action_name/enum")?.as_array())
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// The ids items can have in the task: `a`, `b`, ... up to the largest item count the task
/// can draw (one item per agent when `items` is empty).
fn item_letters(task: &TaskSpec) -> impl Iterator<Item = char> {
    let n = if task.kind != TaskKind::Carry {
        26
    } else if task.items.is_empty() {
        task.agents.iter().copied().max().unwrap_or(1)
    } else {
        task.items.iter().copied().max().unwrap_or(1)
    };
    (0..n.clamp(1, 26) as u8).map(|i| (b'a' + i) as char)
}

fn empty_object() -> Value {
    json!({"type": "object", "properties": {}, "additionalProperties": false})
}

fn text(max: usize) -> Value {
    json!({"type": "string", "maxLength": max})
}

/// One reply object whose action is one of `actions`, with `params` as its parameters.
fn object(actions: &[ActionName], params: Value, o: &SchemaOptions) -> Value {
    let names: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
    let mut props = Map::new();
    props.insert("reflection".into(), text(o.max_reflection_chars));
    props.insert("rationale".into(), text(o.max_rationale_chars));
    props.insert(
        "action_name".into(),
        json!({"type": "string", "enum": names}),
    );
    props.insert("action_parameters".into(), params);
    props.insert("message".into(), text(o.max_message_chars));
    props.insert("add_memory".into(), text(o.max_memory_chars));
    json!({
        "type": "object",
        "properties": props,
        "required": FIELDS,
        "additionalProperties": false,
    })
}
