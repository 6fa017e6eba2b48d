//! A policy backed by any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's
//! server, LM Studio, `teamtune serve`): to collect trajectories from a stronger model.

use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{AgentError, Result};
use crate::policy::{Policy, PolicyReply, TurnRequest};
use crate::schema::{reply_schema, SchemaOptions};

#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Up to and including the version, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub temperature: f64,
    pub max_tokens: usize,
    /// Send the task's reply schema as `response_format` (`json_schema`, strict), so that a
    /// server with structured outputs constrains the reply as our own decoder does.
    pub json_schema: bool,
    pub schema: SchemaOptions,
    /// Attempts per request on connection errors, 429 and 5xx (with doubling back-off).
    pub attempts: usize,
    pub timeout: Duration,
}

impl OpenAiConfig {
    pub fn new(base_url: &str, model: &str) -> Self {
        OpenAiConfig {
            base_url: base_url.trim_end_matches('/').to_owned(),
            model: model.to_owned(),
            api_key: None,
            temperature: 0.0,
            max_tokens: 512,
            json_schema: true,
            schema: SchemaOptions::default(),
            attempts: 3,
            timeout: Duration::from_secs(120),
        }
    }
}

pub struct OpenAiPolicy {
    config: OpenAiConfig,
    agent: ureq::Agent,
}

impl OpenAiPolicy {
    pub fn new(config: OpenAiConfig) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        OpenAiPolicy { config, agent }
    }

    fn url(&self) -> String {
        format!("{}/chat/completions", self.config.base_url)
    }

    /// The request body for one turn.
    pub fn body(&self, request: &TurnRequest<'_>) -> Result<Value> {
        let c = &self.config;
        let mut body = json!({
            "model": c.model,
            "messages": request.messages,
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
            "seed": request.seed,
            "n": 1,
        });
        if c.json_schema {
            let schema = reply_schema(request.task, &c.schema)?;
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema, "strict": true},
            });
        }
        Ok(body)
    }

    fn post(&self, body: &Value) -> Result<Value> {
        let url = self.url();
        let fail = |message: String| AgentError::Endpoint {
            url: url.clone(),
            message,
        };
        let mut wait = Duration::from_millis(500);
        let mut last = String::new();
        for attempt in 1..=self.config.attempts.max(1) {
            let mut req = self
                .agent
                .post(&url)
                .header("Content-Type", "application/json");
            if let Some(key) = &self.config.api_key {
                req = req.header("Authorization", &format!("Bearer {key}"));
            }
            match req.send(body.to_string()) {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text = resp
                        .body_mut()
                        .read_to_string()
                        .map_err(|e| fail(format!("reading the response: {e}")))?;
                    if status == 200 {
                        return serde_json::from_str(&text)
                            .map_err(|e| fail(format!("response is not JSON ({e}): {text:.200}")));
                    }
                    last = format!("HTTP {status}: {text:.300}");
                    if status != 429 && status < 500 {
                        return Err(fail(last));
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if attempt < self.config.attempts {
                tracing::warn!(%url, attempt, error = %last, "retrying");
                std::thread::sleep(wait);
                wait *= 2;
            }
        }
        Err(fail(format!(
            "gave up after {} attempts: {last}",
            self.config.attempts
        )))
    }
}

impl Policy for OpenAiPolicy {
    fn name(&self) -> String {
        format!("openai:{}", self.config.model)
    }

    fn reply(&mut self, requests: &[TurnRequest<'_>]) -> Result<Vec<PolicyReply>> {
        requests
            .iter()
            .map(|r| {
                let answer = self.post(&self.body(r)?)?;
                let text = answer
                    .pointer("/choices/0/message/content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| AgentError::Endpoint {
                        url: self.url(),
                        message: format!("no choices[0].message.content in {answer:.300}"),
                    })?;
                let usage = |k: &str| {
                    answer
                        .pointer(&format!("/usage/{k}"))
                        .and_then(Value::as_u64)
                        .unwrap_or(0) as usize
                };
                Ok(PolicyReply {
                    text: text.to_owned(),
                    prompt_tokens: usage("prompt_tokens"),
                    generated_tokens: usage("completion_tokens"),
                })
            })
            .collect()
    }
}
