//! Function calling, as OpenAI defines it: `tools` and `tool_choice` in, `message.tool_calls`
//! out.
//!
//! The model's own chat template shows the functions when it has a tool format (Llama-3.1's
//! puts them in the first user turn); for a template without one (ChatML, SmolLM2's) they go
//! into the system message ([`fallback_system_text`]). Either way the model calls a function
//! by answering only `{"name": ..., "parameters": {...}}`, Llama-3.1's form:
//!
//! - `tool_choice: "required"` or a named function: the reply is decoded under a JSON schema of
//!   exactly that form (the function's `parameters` schema inside), so it is always a valid
//!   call;
//! - `"auto"` (the default with tools): free text, read as a call when the whole reply is such
//!   an object naming one of the functions (vLLM's `llama3_json` parser does the same);
//! - `"none"`: the functions are not shown and the reply is text.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use teamtune_data::{Message, Role};

use crate::error::{Result, ServeError};

/// Most functions a request may define.
pub const MAX_TOOLS: usize = 128;

#[derive(Debug, Deserialize)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Option<FunctionIn>,
}

#[derive(Debug, Deserialize)]
pub struct FunctionIn {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
    #[allow(dead_code)]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode, or `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Named { function: NamedFunction },
}

#[derive(Debug, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

/// How the reply may use the functions.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

/// One checked function definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    /// The JSON schema of its arguments (an object schema).
    pub parameters: Value,
}

/// The functions of a request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    /// The definitions as OpenAI writes them, for the chat template.
    pub definitions: Value,
}

/// A function call read from (or decoded as) a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON object.
    pub arguments: Value,
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks `tools` and `tool_choice`; `None` when the request defines no function.
pub fn check(tools: Option<Vec<ToolIn>>, choice: Option<ToolChoiceIn>) -> Result<Option<Tools>> {
    let tools = tools.unwrap_or_default();
    if tools.is_empty() {
        return match choice {
            None => Ok(None),
            Some(ToolChoiceIn::Mode(m)) if m == "none" || m == "auto" => Ok(None),
            Some(_) => Err(ServeError::invalid_value(
                "tool_choice asks for a function call, but `tools` defines none",
                "tool_choice",
            )),
        };
    }
    if tools.len() > MAX_TOOLS {
        return Err(ServeError::invalid_value(
            format!("{} tools: at most {MAX_TOOLS} are allowed", tools.len()),
            "tools",
        ));
    }
    let mut functions = Vec::with_capacity(tools.len());
    let mut definitions = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        let at = |field: &str| format!("tools[{i}]{field}");
        if t.kind != "function" {
            return Err(ServeError::invalid_value(
                format!("tools[{i}].type `{}`: only `function` is supported", t.kind),
                &at(".type"),
            ));
        }
        let Some(f) = t.function else {
            return Err(ServeError::invalid_value(
                format!("tools[{i}] has no `function`"),
                &at(".function"),
            ));
        };
        if !valid_name(&f.name) {
            return Err(ServeError::invalid_value(
                format!(
                    "tools[{i}].function.name {:?}: 1 to 64 letters, digits, `_` or `-`",
                    f.name
                ),
                &at(".function.name"),
            ));
        }
        if functions.iter().any(|g: &Function| g.name == f.name) {
            return Err(ServeError::invalid_value(
                format!("tools[{i}]: the function `{}` is defined twice", f.name),
                &at(".function.name"),
            ));
        }
        let parameters = match f.parameters {
            None => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p,
            Some(other) => {
                return Err(ServeError::invalid_value(
                    format!(
                        "tools[{i}].function.parameters must be a JSON schema object, not {other}"
                    ),
                    &at(".function.parameters"),
                ))
            }
        };
        let mut def = Map::new();
        def.insert("name".into(), Value::String(f.name.clone()));
        if let Some(d) = f.description {
            def.insert("description".into(), Value::String(d));
        }
        def.insert("parameters".into(), parameters.clone());
        definitions.push(json!({"type": "function", "function": Value::Object(def)}));
        functions.push(Function {
            name: f.name,
            parameters,
        });
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(ToolChoiceIn::Mode(m)) => match m.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(ServeError::invalid_value(
                    format!(
                    "tool_choice `{other}` is not one of auto, none, required, or a named function"
                ),
                    "tool_choice",
                ))
            }
        },
        Some(ToolChoiceIn::Named { function }) => {
            if !functions.iter().any(|f| f.name == function.name) {
                return Err(ServeError::invalid_value(
                    format!(
                        "tool_choice names `{}`, which `tools` does not define",
                        function.name
                    ),
                    "tool_choice.function.name",
                ));
            }
            ToolChoice::Named(function.name)
        }
    };
    Ok(Some(Tools {
        functions,
        choice,
        definitions: Value::Array(definitions),
    }))
}

/// The JSON schema of a call of `f`: `{"name": <its name>, "parameters": <its arguments>}`.
pub fn call_schema(f: &Function) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": f.name}, "parameters": f.parameters},
        "required": ["name", "parameters"],
        "additionalProperties": false,
    })
}

impl Tools {
    /// Whether the model is shown the functions at all.
    pub fn shown(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The schema the reply is decoded under: one function's call (named, or the only one
    /// when required), any function's (required), or none (auto, none).
    pub fn reply_schema(&self) -> Option<Value> {
        let calls: Vec<Value> = match &self.choice {
            ToolChoice::Auto | ToolChoice::None => return None,
            ToolChoice::Named(name) => self
                .functions
                .iter()
                .filter(|f| &f.name == name)
                .map(call_schema)
                .collect(),
            ToolChoice::Required => self.functions.iter().map(call_schema).collect(),
        };
        match <[Value; 1]>::try_from(calls) {
            Ok([one]) => Some(one),
            Err(many) => Some(json!({"anyOf": many})),
        }
    }

    /// A reply read as a call: the whole text (spaces and Llama-3.1's `<|python_tag|>`
    /// aside) one object naming a defined function, with `parameters` (or `arguments`) an
    /// object.
    pub fn read_call(&self, reply: &str) -> Option<ToolCall> {
        let text = reply.trim();
        let text = text.strip_prefix("<|python_tag|>").unwrap_or(text).trim();
        let Value::Object(mut obj) = serde_json::from_str::<Value>(text).ok()? else {
            return None;
        };
        let name = obj.get("name")?.as_str()?.to_string();
        if !self.functions.iter().any(|f| f.name == name) {
            return None;
        }
        let arguments = obj
            .remove("parameters")
            .or_else(|| obj.remove("arguments"))?;
        arguments
            .is_object()
            .then_some(ToolCall { name, arguments })
    }
}

/// The system-message form of the functions, for templates that do not render `tools`.
pub fn fallback_system_text(tools: &Tools) -> String {
    let mut text = String::from(
        "You can call these functions. To call one, reply with only a JSON object \
         {\"name\": the function's name, \"parameters\": an object of its arguments}. \
         Otherwise reply as usual.\n",
    );
    for d in tools.definitions.as_array().into_iter().flatten() {
        text.push('\n');
        text.push_str(&d["function"].to_string());
    }
    text
}

/// The conversation as the template gets it. With a template that renders `tools`, as given.
/// Without one: the functions join the system message (one is added first if there is none),
/// and an assistant's earlier calls become their JSON text, the form the model answers in.
pub fn messages_for_template(
    messages: &[Message],
    tools: Option<&Tools>,
    template_renders_tools: bool,
) -> Vec<Message> {
    let mut out: Vec<Message> = messages.to_vec();
    if template_renders_tools {
        return out;
    }
    for m in &mut out {
        if let Some(calls) = m.extra.remove("tool_calls") {
            let text: Vec<String> = calls
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    json!({"name": c["function"]["name"], "parameters": c["function"]["arguments"]})
                        .to_string()
                })
                .collect();
            if m.content.is_empty() {
                m.content = text.join("\n");
            }
        }
    }
    if let Some(tools) = tools.filter(|t| t.shown()) {
        let text = fallback_system_text(tools);
        match out.first_mut().filter(|m| m.role == Role::System) {
            Some(system) => system.content = format!("{}\n\n{text}", system.content),
            None => out.insert(0, Message::system(text)),
        }
    }
    out
}

/// `message.tool_calls` of a response: one call, its arguments as a JSON string.
pub fn calls_json(call: &ToolCall, id: &str) -> Value {
    json!([{
        "id": id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments.to_string()},
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(v: Value, choice: Option<Value>) -> Result<Option<Tools>> {
        check(
            serde_json::from_value(v).unwrap(),
            choice.map(|c| serde_json::from_value(c).unwrap()),
        )
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "noop"}}])
    }

    fn param(e: ServeError) -> Option<String> {
        match e {
            ServeError::InvalidRequest { param, .. } => param,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn checks_definitions_and_choice_naming_the_field() {
        let t = tools(weather(), None).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert_eq!(
            t.functions[1].parameters,
            json!({"type": "object", "properties": {}})
        );
        let named = tools(
            weather(),
            Some(json!({"type": "function", "function": {"name": "noop"}})),
        );
        assert_eq!(
            named.unwrap().unwrap().choice,
            ToolChoice::Named("noop".into())
        );
        let cases = [
            (json!([{"type": "retrieval"}]), None, "tools[0].type"),
            (json!([{"type": "function"}]), None, "tools[0].function"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                None,
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                None,
                "tools[0].function.parameters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                None,
                "tools[1].function.name",
            ),
            (weather(), Some(json!("sometimes")), "tool_choice"),
            (
                weather(),
                Some(json!({"type": "function", "function": {"name": "other"}})),
                "tool_choice.function.name",
            ),
            (json!([]), Some(json!("required")), "tool_choice"),
        ];
        for (t, c, want) in cases {
            let got = param(tools(t.clone(), c).unwrap_err());
            assert_eq!(got.as_deref(), Some(want), "{t}");
        }
        assert_eq!(tools(json!([]), Some(json!("auto"))).unwrap(), None);
    }

    #[test]
    fn reply_schemas_and_reading_calls() {
        let t = tools(weather(), Some(json!("required"))).unwrap().unwrap();
        let s = t.reply_schema().unwrap();
        assert_eq!(s["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(s["anyOf"][0]["properties"]["name"]["const"], "get_weather");
        let named = tools(
            weather(),
            Some(json!({"type": "function", "function": {"name": "noop"}})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            named.reply_schema().unwrap()["properties"]["name"]["const"],
            "noop"
        );
        let auto = tools(weather(), None).unwrap().unwrap();
        assert_eq!(auto.reply_schema(), None);
        let call = auto
            .read_call(" <|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}\n")
            .unwrap();
        assert_eq!(call.arguments, json!({"city": "Oslo"}));
        assert!(auto
            .read_call(r#"{"name": "get_weather", "arguments": {}}"#)
            .is_some());
        for not_a_call in [
            "It is sunny.",
            r#"{"name": "unknown", "parameters": {}}"#,
            r#"{"name": "get_weather", "parameters": "Oslo"}"#,
            r#"{"name": "get_weather"}"#,
            r#"Sure: {"name": "get_weather", "parameters": {}}"#,
        ] {
            assert_eq!(auto.read_call(not_a_call), None, "{not_a_call}");
        }
        let id_json = calls_json(&call, "call_1");
        assert_eq!(id_json[0]["function"]["arguments"], r#"{"city":"Oslo"}"#);
    }

    #[test]
    fn templates_without_tools_get_them_in_the_system_message() {
        let t = tools(weather(), None).unwrap().unwrap();
        let mut call = Message::assistant("");
        call.extra.insert(
            "tool_calls".into(),
            json!([{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]),
        );
        let msgs = vec![Message::user("weather?"), call];
        let out = messages_for_template(&msgs, Some(&t), false);
        assert_eq!(out[0].role, Role::System);
        assert!(
            out[0].content.contains("\"get_weather\""),
            "{}",
            out[0].content
        );
        assert_eq!(
            out[2].content,
            r#"{"name":"get_weather","parameters":{"city":"Oslo"}}"#
        );
        assert!(out[2].extra.is_empty());
        let with_system = [Message::system("Be brief."), Message::user("hi")];
        let out = messages_for_template(&with_system, Some(&t), false);
        assert!(
            out[0].content.starts_with("Be brief.\n\nYou can call"),
            "{}",
            out[0].content
        );
        assert_eq!(out.len(), 2);
        // A template with a tool format gets everything as it is.
        assert_eq!(messages_for_template(&msgs, Some(&t), true), msgs);
    }
}
