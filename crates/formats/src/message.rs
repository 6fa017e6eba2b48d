//! The chat message, as every OpenAI-style format and chat template writes it.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The role of a message. `tool` is a function's result, answering an assistant message's
/// `tool_calls` (its `tool_call_id` among the extra fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message of a conversation: `{"role": ..., "content": ..., ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Other fields of the message (for example `name`), passed on to the chat template; written
    /// after `role` and `content`, and not at all when there are none.
    #[serde(flatten, skip_serializing_if = "Map::is_empty", default)]
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            extra: Map::new(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// The message as the JSON object a template sees: `role`, `content`, then the extra fields.
    pub fn to_json(&self) -> Value {
        let mut m = Map::with_capacity(2 + self.extra.len());
        m.insert("role".into(), Value::String(self.role.as_str().into()));
        m.insert("content".into(), Value::String(self.content.clone()));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_message_is_role_and_content_only() {
        let m = Message::user("hi");
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"role":"user","content":"hi"}"#
        );
        let back: Message = serde_json::from_str(r#"{"role":"user","content":"hi"}"#).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn extra_fields_round_trip_after_role_and_content() {
        let text = r#"{"role":"assistant","content":"ok","name":"agent_1"}"#;
        let m: Message = serde_json::from_str(text).unwrap();
        assert_eq!(m.extra.get("name"), Some(&Value::String("agent_1".into())));
        assert_eq!(serde_json::to_string(&m).unwrap(), text);
        assert_eq!(m.to_json(), serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn unknown_roles_are_refused() {
        assert!(serde_json::from_str::<Message>(r#"{"role":"robot","content":""}"#).is_err());
        assert_eq!(Role::parse("ipython"), None);
        let tool: Message =
            serde_json::from_str(r#"{"role":"tool","content":"21 C","tool_call_id":"c1"}"#)
                .unwrap();
        assert_eq!(tool.role, Role::Tool);
        for r in [Role::System, Role::User, Role::Assistant, Role::Tool] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }
}
