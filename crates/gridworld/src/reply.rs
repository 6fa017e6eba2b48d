//! The assistant reply: one JSON object
//! `{"reflection", "rationale", "action_name", "action_parameters", "message", "add_memory"}`.
//!
//! Parsing is tolerant (text around the object, `action` for `action_name`, an object or array
//! in `add_memory`, case of the action name) but never guesses: a reply that cannot be used is a
//! [`ReplyError`] whose text tells the agent exactly what was wrong. Parsing never panics.

use crate::geom::Dir;
use crate::task::ActionName;
use crate::world::Action;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Longest reply text looked at, in characters.
pub const MAX_REPLY_CHARS: usize = 8000;
/// Longest `message`.
pub const MAX_MESSAGE_CHARS: usize = 300;
/// Longest `add_memory` (after turning an object into text).
pub const MAX_MEMORY_CHARS: usize = 200;
/// Longest `reflection` or `rationale`.
pub const MAX_TEXT_CHARS: usize = 1000;

/// A usable reply. Serialises with the schema's keys in the schema's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub reflection: String,
    pub rationale: String,
    pub action_name: ActionName,
    pub action_parameters: Map<String, Value>,
    pub message: String,
    pub add_memory: String,
}

impl Reply {
    pub fn new(action: ActionName) -> Self {
        Reply {
            reflection: String::new(),
            rationale: String::new(),
            action_name: action,
            action_parameters: Map::new(),
            message: String::new(),
            add_memory: String::new(),
        }
    }

    /// The reply as the one-line JSON an assistant message holds.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a reply always serialises")
    }

    /// The world action; `pick` may name an item with `{"item": "a"}`.
    pub fn action(&self) -> Action {
        match self.action_name {
            ActionName::North => Action::Move(Dir::North),
            ActionName::South => Action::Move(Dir::South),
            ActionName::East => Action::Move(Dir::East),
            ActionName::West => Action::Move(Dir::West),
            ActionName::Skip => Action::Skip,
            ActionName::Drop => Action::Drop,
            ActionName::Pick => Action::Pick(
                self.action_parameters
                    .get("item")
                    .and_then(Value::as_str)
                    .and_then(|s| {
                        let mut c = s.trim().chars();
                        match (c.next(), c.next()) {
                            (Some(ch), None) => Some(ch.to_ascii_lowercase()),
                            _ => None,
                        }
                    }),
            ),
        }
    }
}

/// Why a reply could not be used. `Display` is the text the agent reads next turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    Empty,
    TooLong {
        chars: usize,
    },
    NoJson,
    Unclosed,
    InvalidJson(String),
    SeveralObjects(usize),
    MissingAction,
    ActionNotText(&'static str),
    UnknownAction {
        name: String,
        allowed: String,
    },
    ActionNotAllowed {
        name: String,
        allowed: String,
    },
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    FieldTooLong {
        field: &'static str,
        chars: usize,
        max: usize,
    },
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Empty => write!(f, "the reply was empty"),
            ReplyError::TooLong { chars } => write!(
                f,
                "the reply was {chars} characters long; the limit is {MAX_REPLY_CHARS}"
            ),
            ReplyError::NoJson => write!(f, "the reply had no JSON object"),
            ReplyError::Unclosed => {
                write!(f, "the JSON object was never closed with }} (cut off?)")
            }
            ReplyError::InvalidJson(e) => write!(f, "the JSON was invalid: {e}"),
            ReplyError::SeveralObjects(n) => {
                write!(f, "the reply had {n} JSON objects; send exactly one")
            }
            ReplyError::MissingAction => write!(f, "the JSON had no action_name"),
            ReplyError::ActionNotText(found) => {
                write!(f, "action_name must be a string, not {found}")
            }
            ReplyError::UnknownAction { name, allowed } => {
                write!(f, "unknown action \"{name}\"; use one of: {allowed}")
            }
            ReplyError::ActionNotAllowed { name, allowed } => write!(
                f,
                "{name} is not an action in this task; use one of: {allowed}"
            ),
            ReplyError::WrongType {
                field,
                expected,
                found,
            } => write!(f, "{field} must be {expected}, not {found}"),
            ReplyError::FieldTooLong { field, chars, max } => {
                write!(f, "{field} was {chars} characters long; the limit is {max}")
            }
        }
    }
}

impl std::error::Error for ReplyError {}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The end (exclusive byte index) of the balanced `{...}` starting at `start`, respecting JSON
/// strings and escapes; `None` when it never closes.
fn balanced_end(s: &str, start: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    let mut in_str = false;
    let mut esc = false;
    for (i, &b) in bytes.iter().enumerate().skip(start) {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// Finds the top-level JSON objects in a text. Returns the objects that parse, the first parse
/// error of a balanced `{...}` that does not, and whether a `{` was left unclosed.
fn find_objects(text: &str) -> (Vec<Map<String, Value>>, Option<String>, bool) {
    let mut objects = Vec::new();
    let mut first_error = None;
    let mut unclosed = false;
    let mut i = 0;
    while let Some(off) = text[i..].find('{') {
        let start = i + off;
        match balanced_end(text, start) {
            Some(end) => {
                match serde_json::from_str::<Value>(&text[start..end]) {
                    Ok(Value::Object(m)) => objects.push(m),
                    Ok(_) => {}
                    Err(e) => {
                        if first_error.is_none() {
                            first_error = Some(e.to_string());
                        }
                    }
                }
                i = end;
            }
            None => {
                unclosed = true;
                break;
            }
        }
    }
    (objects, first_error, unclosed)
}

fn text_field(
    obj: &Map<String, Value>,
    field: &'static str,
    max: usize,
) -> Result<String, ReplyError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => {
            let chars = s.chars().count();
            if chars > max {
                Err(ReplyError::FieldTooLong { field, chars, max })
            } else {
                Ok(s.trim().to_string())
            }
        }
        Some(other) => Err(ReplyError::WrongType {
            field,
            expected: "a string",
            found: type_name(other),
        }),
    }
}

/// Parses a reply against the actions allowed in the task.
pub fn parse_reply(text: &str, allowed: &[ActionName]) -> Result<Reply, ReplyError> {
    if text.trim().is_empty() {
        return Err(ReplyError::Empty);
    }
    let chars = text.chars().count();
    if chars > MAX_REPLY_CHARS {
        return Err(ReplyError::TooLong { chars });
    }
    let (mut objects, error, unclosed) = find_objects(text);
    let obj = match objects.len() {
        1 => objects.pop().unwrap(),
        0 => {
            return Err(match (error, unclosed) {
                (Some(e), _) => ReplyError::InvalidJson(e),
                (None, true) => ReplyError::Unclosed,
                (None, false) => ReplyError::NoJson,
            })
        }
        n => return Err(ReplyError::SeveralObjects(n)),
    };
    let allowed_list = allowed
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let action_value = obj
        .get("action_name")
        .filter(|v| !v.is_null())
        .or_else(|| obj.get("action").filter(|v| !v.is_null()))
        .ok_or(ReplyError::MissingAction)?;
    let name = match action_value {
        Value::String(s) => s,
        other => return Err(ReplyError::ActionNotText(type_name(other))),
    };
    let action = match ActionName::parse(name) {
        None => {
            return Err(ReplyError::UnknownAction {
                name: name.chars().take(40).collect(),
                allowed: allowed_list,
            })
        }
        Some(a) if !allowed.contains(&a) => {
            return Err(ReplyError::ActionNotAllowed {
                name: a.to_string(),
                allowed: allowed_list,
            })
        }
        Some(a) => a,
    };
    let action_parameters = match obj.get("action_parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(ReplyError::WrongType {
                field: "action_parameters",
                expected: "an object",
                found: type_name(other),
            })
        }
    };
    let add_memory = match obj.get("add_memory") {
        Some(v @ (Value::Object(_) | Value::Array(_))) => {
            let s = v.to_string();
            let chars = s.chars().count();
            if chars > MAX_MEMORY_CHARS {
                return Err(ReplyError::FieldTooLong {
                    field: "add_memory",
                    chars,
                    max: MAX_MEMORY_CHARS,
                });
            }
            s
        }
        _ => text_field(&obj, "add_memory", MAX_MEMORY_CHARS)?,
    };
    Ok(Reply {
        reflection: text_field(&obj, "reflection", MAX_TEXT_CHARS)?,
        rationale: text_field(&obj, "rationale", MAX_TEXT_CHARS)?,
        action_name: action,
        action_parameters,
        message: text_field(&obj, "message", MAX_MESSAGE_CHARS)?,
        add_memory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn moves() -> Vec<ActionName> {
        vec![
            ActionName::North,
            ActionName::South,
            ActionName::East,
            ActionName::West,
            ActionName::Skip,
        ]
    }

    #[test]
    fn plain_reply() {
        let r = parse_reply(
            r#"{"reflection":"ok","rationale":"At (1,1), target (3,4): 2 east, 3 north, so east.","action_name":"east","action_parameters":{},"message":"","add_memory":""}"#,
            &moves(),
        )
        .unwrap();
        assert_eq!(r.action_name, ActionName::East);
        assert_eq!(r.action(), Action::Move(Dir::East));
        assert_eq!(
            r.rationale,
            "At (1,1), target (3,4): 2 east, 3 north, so east."
        );
    }

    #[test]
    fn round_trip_of_to_json_and_key_order() {
        let mut r = Reply::new(ActionName::Pick);
        r.message = "I take item a.".into();
        r.action_parameters
            .insert("item".into(), Value::String("a".into()));
        let s = r.to_json();
        assert!(s.starts_with(r#"{"reflection":"","rationale":"","action_name":"pick","action_parameters":{"item":"a"}"#));
        let all = ActionName::ALL.to_vec();
        assert_eq!(parse_reply(&s, &all).unwrap(), r);
        assert_eq!(r.action(), Action::Pick(Some('a')));
    }

    #[test]
    fn tolerant_forms() {
        let m = moves();
        // text around, code fence, alias, case, object memory, missing optional fields
        let r = parse_reply(
            "Sure! Here is my move:\n```json\n{\"action\": \" North \", \"add_memory\": {\"corner\": [0,5]}}\n```\nGood luck {",
            &m,
        );
        // the trailing `{` never closes but one object was found before it: accepted
        let r = r.unwrap();
        assert_eq!(r.action_name, ActionName::North);
        assert_eq!(r.add_memory, r#"{"corner":[0,5]}"#);
        assert_eq!(r.message, "");
        // braces inside strings do not confuse the scanner
        let r = parse_reply(
            r#"{"action_name":"west","message":"use {x} and \"}\" freely"}"#,
            &m,
        )
        .unwrap();
        assert_eq!(r.message, r#"use {x} and "}" freely"#);
        // nulls are empty
        let r = parse_reply(
            r#"{"action_name":"skip","message":null,"action_parameters":null}"#,
            &m,
        )
        .unwrap();
        assert_eq!(r.action_name, ActionName::Skip);
    }

    /// At least 15 malformed replies: each is an error with a clear text, none panics.
    #[test]
    fn malformed_replies_are_errors_with_clear_reasons() {
        let m = moves();
        let huge = "x".repeat(5000);
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "empty"),
            ("   \n".into(), "empty"),
            ("I will go north.".into(), "no JSON object"),
            (
                r#"{"action_name": "north", "message": "hi"#.into(),
                "never closed",
            ),
            (r#"{"action_name": north}"#.into(), "invalid"),
            (r#"{'action_name': 'north'}"#.into(), "invalid"),
            (r#"{"action_name": "north",}"#.into(), "invalid"),
            (
                r#"{"action_name":"north"} {"action_name":"south"}"#.into(),
                "2 JSON objects",
            ),
            (r#"{"message":"hello"}"#.into(), "no action_name"),
            (
                r#"{"action_name": 3}"#.into(),
                "must be a string, not a number",
            ),
            (
                r#"{"action_name": ["north"]}"#.into(),
                "must be a string, not an array",
            ),
            (
                r#"{"action_name": "fly"}"#.into(),
                "unknown action \"fly\"; use one of: north, south, east, west, skip",
            ),
            (r#"{"action_name": "move north"}"#.into(), "unknown action"),
            (
                r#"{"action_name": "pick"}"#.into(),
                "pick is not an action in this task",
            ),
            (
                r#"{"action_name": "north", "message": 5}"#.into(),
                "message must be a string, not a number",
            ),
            (
                r#"{"action_name": "north", "action_parameters": "none"}"#.into(),
                "action_parameters must be an object",
            ),
            (
                format!(r#"{{"action_name": "north", "message": "{huge}"}}"#),
                "message was 5000 characters",
            ),
            (
                format!(r#"{{"action_name": "north", "rationale": "{huge}"}}"#),
                "rationale was 5000 characters",
            ),
            (
                format!(r#"{{"action_name": "north", "add_memory": "{huge}"}}"#),
                "add_memory was 5000",
            ),
            ("y".repeat(20_000), "limit is 8000"),
            ("[\"north\"]".into(), "no JSON object"),
            (
                r#"{"reflection": "x", "rationale": true, "action_name": "east"}"#.into(),
                "rationale must be a string, not a boolean",
            ),
            ("{\"action_name\": \"north\"".into(), "never closed"),
            ("}{".into(), "never closed"),
        ];
        assert!(cases.len() >= 15);
        for (text, want) in cases {
            let err = parse_reply(&text, &m).expect_err(&text[..text.len().min(60)]);
            let msg = err.to_string();
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_strings_never_panic(s in any::<String>()) {
            let _ = parse_reply(&s, &ActionName::ALL);
        }

        #[test]
        fn json_like_strings_never_panic(s in r#"[{}\[\]":,a-z0-9 \\\n]{0,80}"#) {
            let _ = parse_reply(&s, &ActionName::ALL);
        }

        #[test]
        fn mutilated_valid_replies_never_panic(cut in 0usize..120, junk in ".{0,10}") {
            let full = r#"{"reflection":"r","rationale":"At (1,1): so east.","action_name":"east","action_parameters":{},"message":"m","add_memory":"x"}"#;
            let cut = cut.min(full.len());
            let s = format!("{}{}", &full[..cut], junk);
            let _ = parse_reply(&s, &ActionName::ALL);
        }
    }
}
