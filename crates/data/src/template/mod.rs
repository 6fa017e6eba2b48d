//! Chat templates rendered with minijinja the way transformers renders them with Jinja2.
//!
//! transformers compiles a model's `chat_template` in an `ImmutableSandboxedEnvironment` with
//! `trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension and its own
//! `{% generation %}` tag, and adds `raise_exception`, `strftime_now`, a `tojson` that is Python's
//! `json.dumps` (no HTML escaping, `", "`/`": "` separators, `indent`, `ensure_ascii`,
//! `sort_keys`, `separators`), `dict` and `namespace`. The context holds `messages`, `tools` and
//! `documents` (both `none` unless given), `add_generation_prompt` and the special tokens
//! (`bos_token`, `eos_token`, ...). This module does the same with minijinja, plus the pycompat
//! string/dict/list methods (`.strip()`, `.items()`, `.startswith()`, ...).
//!
//! Differences from transformers on purpose:
//! - `strftime_now` formats a fixed date ([`FixedDate`], default 26 Jul 2024, the Llama-3.1
//!   default) so that the same data always gives the same tokens.
//! - `{% generation %}...{% endgeneration %}` is rewritten to a filter block, keeping its whitespace
//!   control; [`ChatTemplate::render_with_generation_spans`] reports the byte spans it produced.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind, State};

use crate::conversation::Message;
use crate::error::{DataError, Result};

mod content_spans;
mod date;
mod python;

pub use content_spans::ContentSpans;
pub use date::FixedDate;
use python::{py_float_repr, py_title, py_tojson};

/// The Llama-3.1 Instruct chat template as shipped in meta-llama/Llama-3.1-8B-Instruct's
/// tokenizer_config.json.
pub const LLAMA31_TEMPLATE: &str = include_str!("../templates/llama31.jinja");
/// The plain ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`).
pub const CHATML_TEMPLATE: &str = include_str!("../templates/chatml.jinja");

/// Templates built into the crate, for models that ship none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplate {
    Llama31,
    ChatMl,
}

impl BuiltinTemplate {
    pub fn source(self) -> &'static str {
        match self {
            BuiltinTemplate::Llama31 => LLAMA31_TEMPLATE,
            BuiltinTemplate::ChatMl => CHATML_TEMPLATE,
        }
    }
    /// The BOS and EOS strings the template expects.
    pub fn default_special_tokens(self) -> (Option<&'static str>, Option<&'static str>) {
        match self {
            BuiltinTemplate::Llama31 => (Some("<|begin_of_text|>"), Some("<|eot_id|>")),
            BuiltinTemplate::ChatMl => (None, Some("<|im_end|>")),
        }
    }
    pub fn parse(name: &str) -> Option<Self> {
        match name
            .to_ascii_lowercase()
            .replace(['-', '_', '.'], "")
            .as_str()
        {
            "llama31" | "llama3" | "llama" => Some(BuiltinTemplate::Llama31),
            "chatml" => Some(BuiltinTemplate::ChatMl),
            _ => None,
        }
    }
    /// Guesses a built-in template from the tokenizer's special tokens: Llama-3 header tokens give
    /// Llama-3.1, `<|im_start|>` gives ChatML.
    pub fn guess(has_token: impl Fn(&str) -> bool) -> Option<Self> {
        if has_token("<|start_header_id|>") && has_token("<|eot_id|>") {
            Some(BuiltinTemplate::Llama31)
        } else if has_token("<|im_start|>") && has_token("<|im_end|>") {
            Some(BuiltinTemplate::ChatMl)
        } else {
            None
        }
    }
}

/// Special tokens and extra variables the template sees, and the date `strftime_now` formats.
#[derive(Debug, Clone, Default)]
pub struct TemplateOptions {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    pub date: FixedDate,
    /// Extra template variables (transformers' `**kwargs` of `apply_chat_template`), for example
    /// `date_string` or `enable_thinking`.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Private-use characters that mark the start and end of a `{% generation %}` block in the output.
pub(crate) const GEN_START: char = '\u{E000}';
pub(crate) const GEN_END: char = '\u{E001}';
const TRACK_VAR: &str = "__teamtune_track_generation";
const GEN_FILTER: &str = "__teamtune_generation";

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: Arc<str>,
    has_generation: bool,
    base_context: BTreeMap<String, Value>,
    options: TemplateOptions,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("has_generation", &self.has_generation)
            .finish()
    }
}

/// Rewrites `{% generation %}`/`{% endgeneration %}` to a filter block with the same whitespace
/// control, so that trim_blocks/lstrip_blocks treat them as the block tags they are in Jinja2.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    use std::sync::OnceLock;
    static START: OnceLock<regex::Regex> = OnceLock::new();
    static END: OnceLock<regex::Regex> = OnceLock::new();
    let start = START.get_or_init(|| {
        regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").expect("valid regex")
    });
    let end = END.get_or_init(|| {
        regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").expect("valid regex")
    });
    if !start.is_match(source) {
        return (source.to_string(), false);
    }
    let s = start.replace_all(source, format!("{{%${{1}} filter {GEN_FILTER} ${{2}}%}}"));
    let s = end.replace_all(&s, "{%${1} endfilter ${2}%}");
    (s.into_owned(), true)
}

fn template_error(e: Error) -> DataError {
    DataError::Template(describe_error(&e))
}

/// A one-line description of a minijinja error with its location, and the message of
/// `raise_exception` as it was given.
pub(crate) fn describe_error(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

impl ChatTemplate {
    /// Compiles a template source.
    pub fn new(source: &str, options: TemplateOptions) -> Result<Self> {
        let (rewritten, has_generation) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(template_error)?,
        );
        env.set_unknown_method_callback(|state, value, method, args| {
            // Python's str.title() starts a word after any uncased character (minijinja's after
            // whitespace and brackets, like Jinja2's |title filter, which stays as it is).
            if method == "title" && args.is_empty() {
                if let Some(s) = value.as_str() {
                    return Ok(Value::from(py_title(s)));
                }
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        // Floats print as Python prints them (1e+20, 1e-07).
        env.set_formatter(|out, state, value| {
            if value.is_number() && !value.is_integer() {
                if let Ok(f) = f64::try_from(value.clone()) {
                    return out
                        .write_str(&py_float_repr(f))
                        .map_err(|_| Error::new(ErrorKind::WriteFailure, "write failed"));
                }
            }
            minijinja::escape_formatter(out, state, value)
        });
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, Error> {
                Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("raise_exception: {msg}"),
                ))
            },
        );
        let date = options.date;
        env.add_function(
            "strftime_now",
            move |fmt: String| -> std::result::Result<Value, Error> {
                date.strftime(&fmt)
                    .map(Value::from)
                    .map_err(|m| Error::new(ErrorKind::InvalidOperation, m))
            },
        );
        env.add_filter("tojson", py_tojson);
        env.add_filter(GEN_FILTER, |state: &State, body: String| -> Value {
            let track = state.lookup(TRACK_VAR).is_some_and(|v| v.is_true());
            if track {
                let mut s = String::with_capacity(body.len() + 6);
                s.push(GEN_START);
                s.push_str(&body);
                s.push(GEN_END);
                Value::from_safe_string(s)
            } else {
                Value::from_safe_string(body)
            }
        });
        env.add_template_owned("chat_template", rewritten)
            .map_err(template_error)?;

        let mut base = BTreeMap::new();
        base.insert("tools".to_string(), Value::from(()));
        base.insert("documents".to_string(), Value::from(()));
        for (name, tok) in [
            ("bos_token", &options.bos_token),
            ("eos_token", &options.eos_token),
            ("unk_token", &options.unk_token),
            ("pad_token", &options.pad_token),
        ] {
            if let Some(t) = tok {
                base.insert(name.to_string(), Value::from(t.as_str()));
            }
        }
        for (k, v) in &options.extra {
            base.insert(k.clone(), json_to_value(v));
        }
        Ok(ChatTemplate {
            env: Arc::new(env),
            source: Arc::from(source),
            has_generation,
            base_context: base,
            options,
        })
    }

    /// A built-in template with its usual special tokens unless `options` sets them.
    pub fn builtin(which: BuiltinTemplate, mut options: TemplateOptions) -> Result<Self> {
        let (bos, eos) = which.default_special_tokens();
        if options.bos_token.is_none() {
            options.bos_token = bos.map(str::to_string);
        }
        if options.eos_token.is_none() {
            options.eos_token = eos.map(str::to_string);
        }
        Self::new(which.source(), options)
    }

    /// The template a model should be prompted with: its own `source` when it ships one,
    /// otherwise the built-in one its special tokens point to (`has_token`), which then writes
    /// its own special-token strings whatever `options` says. Errors when there is neither.
    pub fn for_model(
        source: Option<&str>,
        mut options: TemplateOptions,
        has_token: impl Fn(&str) -> bool,
    ) -> Result<(Self, Option<BuiltinTemplate>)> {
        if let Some(src) = source {
            return Ok((Self::new(src, options)?, None));
        }
        let which = BuiltinTemplate::guess(has_token).ok_or_else(|| {
            DataError::Template(
                "the model has no chat template and its special tokens match no built-in one"
                    .into(),
            )
        })?;
        options.bos_token = None;
        options.eos_token = None;
        Ok((Self::builtin(which, options)?, Some(which)))
    }

    /// The source as given (before the `{% generation %}` rewrite).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens and options it was built with.
    pub fn options(&self) -> &TemplateOptions {
        &self.options
    }

    /// Whether the template marks assistant output with `{% generation %}` blocks.
    pub fn has_generation_markers(&self) -> bool {
        self.has_generation
    }

    /// Converts messages into template values once, for repeated rendering of prefixes.
    pub fn message_values(messages: &[Message]) -> Vec<Value> {
        messages.iter().map(message_value).collect()
    }

    fn render_values(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        track: bool,
    ) -> Result<String> {
        let mut ctx = self.base_context.clone();
        ctx.insert("messages".into(), Value::from(messages.to_vec()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        if track {
            ctx.insert(TRACK_VAR.into(), Value::from(true));
        }
        let tmpl = self
            .env
            .get_template("chat_template")
            .map_err(template_error)?;
        tmpl.render(Value::from(ctx)).map_err(template_error)
    }

    /// Renders messages (already converted with [`Self::message_values`]).
    pub fn render_prepared(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_values(messages, add_generation_prompt, false)
    }

    /// Renders with `tools` (OpenAI's list of function definitions) given to the template, as
    /// `apply_chat_template(messages, tools=tools)` does; `None` renders as [`Self::render`].
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_values_with_tools(Self::message_values(messages), tools, add_generation_prompt)
    }

    fn render_values_with_tools(
        &self,
        messages: Vec<Value>,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(tools) = tools else {
            return self.render_values(&messages, add_generation_prompt, false);
        };
        let mut ctx = self.base_context.clone();
        ctx.insert("messages".into(), Value::from(messages));
        ctx.insert("tools".into(), json_to_value(tools));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let tmpl = self
            .env
            .get_template("chat_template")
            .map_err(template_error)?;
        tmpl.render(Value::from(ctx)).map_err(template_error)
    }

    /// Whether the template reads `tools` (Llama-3.1's does; ChatML templates do not), so that
    /// function definitions given to it are shown to the model.
    pub fn renders_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders a conversation like `tokenizer.apply_chat_template(messages, tokenize=False)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_values(
            &Self::message_values(messages),
            add_generation_prompt,
            false,
        )
    }

    /// Renders and returns the byte ranges of the output that `{% generation %}` blocks produced
    /// (empty when the template has none). The messages must not contain the private-use
    /// characters U+E000/U+E001, which mark the blocks while rendering.
    pub fn render_with_generation_spans(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        let raw = self.render_values(messages, add_generation_prompt, self.has_generation)?;
        if !self.has_generation {
            return Ok((raw, Vec::new()));
        }
        let mut out = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut depth = 0usize;
        let mut start = 0usize;
        for c in raw.chars() {
            match c {
                GEN_START => {
                    if depth == 0 {
                        start = out.len();
                    }
                    depth += 1;
                }
                GEN_END => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        spans.push(start..out.len());
                    }
                }
                c => out.push(c),
            }
        }
        Ok((out, spans))
    }
}

/// Converts a JSON value into a template value (maps keep their order).
pub fn json_to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => Value::from(a.iter().map(json_to_value).collect::<Vec<_>>()),
        J::Object(m) => Value::from_pairs(m.iter().map(|(k, v)| (k.as_str(), json_to_value(v)))),
    }
}

fn message_value(m: &Message) -> Value {
    let role = Value::from(m.role.as_str());
    let content = Value::from(m.content.as_str());
    Value::from_pairs(
        [("role", role), ("content", content)]
            .into_iter()
            .chain(m.extra.iter().map(|(k, v)| (k.as_str(), json_to_value(v)))),
    )
}

/// Reads `chat_template`, `bos_token`, `eos_token`, `unk_token` and `pad_token` from a
/// `tokenizer_config.json` (a `chat_template` list takes the entry named `default`; a token may be
/// a string or an object with `content`).
pub fn options_from_tokenizer_config(
    config: &serde_json::Value,
) -> (Option<String>, TemplateOptions) {
    let token = |k: &str| match config.get(k) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    };
    let template = match config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|e| e.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    };
    let options = TemplateOptions {
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
        unk_token: token("unk_token"),
        pad_token: token("pad_token"),
        ..Default::default()
    };
    (template, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123.456, "123.456"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
            (0.1 + 0.2, "0.30000000000000004"),
        ] {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn strftime_fixed_date() {
        let d = FixedDate::default();
        assert_eq!(d.strftime("%d %b %Y").unwrap(), "26 Jul 2024");
        assert_eq!(
            d.strftime("%A %-d %B %y %j %%").unwrap(),
            "Friday 26 July 24 208 %"
        );
        assert!(d.strftime("%Q").is_err());
        assert_eq!(FixedDate::parse("2025-02-29"), None);
        assert!(FixedDate::parse("2024-02-29").is_some());
    }

    #[test]
    fn generation_tags_rewritten_with_whitespace_control() {
        let (s, has) = rewrite_generation_tags("a{%- generation -%}b{% endgeneration %}c");
        assert!(has);
        assert_eq!(
            s,
            format!("a{{%- filter {GEN_FILTER} -%}}b{{% endfilter %}}c")
        );
    }
}
