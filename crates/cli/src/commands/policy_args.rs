//! Flags that choose who plays the grid-world (`eval`, `collect`) and build that policy.

use std::path::PathBuf;

use anyhow::{bail, Context};
use teamtune_agents::{
    ExpertPolicy, ModelPolicy, ModelPolicyOptions, OpenAiConfig, OpenAiPolicy, Policy,
};
use teamtune_llama::SamplingParams;

use super::model_args::{chat_template, ModelArgs};

#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A LoRA adapter folder (PEFT layout) applied on the model (`--policy model`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Decode replies freely instead of under the task's JSON schema (to measure how often
    /// the model fails on its own).
    #[arg(long)]
    pub unconstrained: bool,
    /// Sampling temperature; 0 is greedy. Sampling is seeded per turn from --seed.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Longest reply in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Keep the system message and the last N messages of each conversation (the study kept
    /// 8; 1 is the current user message alone); default: the whole conversation. `collect`
    /// writes its training conversations cut to the same window.
    #[arg(long)]
    pub history: Option<usize>,
    /// Episodes in play at once: their waiting agents decode as one batch.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// OpenAI-compatible endpoint, up to the version (`--policy openai`).
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "http://127.0.0.1:8000/v1"
    )]
    pub openai_url: String,
    /// Model name sent to the endpoint.
    #[arg(long, env = "OPENAI_MODEL")]
    pub openai_model: Option<String>,
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_key: Option<String>,
    /// Do not send the reply schema as `response_format` (for servers without structured
    /// outputs).
    #[arg(long)]
    pub openai_no_schema: bool,
}

/// Most episodes in play at once (`--parallel`): each holds a decoding row and its cache.
pub const MAX_PARALLEL: usize = 1024;
/// Most episodes per task (`--episodes`).
pub const MAX_EPISODES: u64 = 1_000_000;

/// Refuses episode counts that play nothing or more than any machine holds, before any work.
pub fn check_episodes(episodes: u64) -> anyhow::Result<()> {
    if !(1..=MAX_EPISODES).contains(&episodes) {
        bail!("--episodes must be between 1 and {MAX_EPISODES} (got {episodes})");
    }
    Ok(())
}

/// Refuses sampling settings that are not numbers or sample from nothing, naming the flag
/// (before any model loads).
pub fn check_sampling(
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    repetition_penalty: Option<f32>,
) -> anyhow::Result<()> {
    if !(temperature >= 0.0 && temperature.is_finite()) {
        bail!("--temperature must be a number of at least 0 (got {temperature}); 0 is greedy");
    }
    if top_k == Some(0) {
        bail!("--top-k must be at least 1 (leave it out to keep every token)");
    }
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be above 0 and at most 1 (got {p})");
        }
    }
    if let Some(r) = repetition_penalty {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--repetition-penalty must be a positive number (got {r}); 1 turns it off");
        }
    }
    Ok(())
}

impl PolicyArgs {
    /// Refuses settings that would crash or silently play nothing, naming the flag.
    pub fn check(&self) -> anyhow::Result<()> {
        check_sampling(self.temperature, None, self.top_p, None)?;
        if !(1..=MAX_PARALLEL).contains(&self.parallel) {
            bail!(
                "--parallel must be between 1 and {MAX_PARALLEL} episodes at once (got {})",
                self.parallel
            );
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        Ok(())
    }

    /// The policy named `which` (`model`, `expert`, `openai`), and settings for the record.
    pub fn build(
        &self,
        which: &str,
        seed: u64,
    ) -> anyhow::Result<(Box<dyn Policy>, serde_json::Value)> {
        match which {
            "expert" => Ok((Box::new(ExpertPolicy::default()), serde_json::json!({}))),
            "openai" => {
                let Some(model) = &self.openai_model else {
                    bail!("--policy openai needs --openai-model (or OPENAI_MODEL)");
                };
                let mut config = OpenAiConfig::new(&self.openai_url, model);
                config.api_key = self.openai_key.clone();
                config.temperature = self.temperature;
                config.max_tokens = self.max_new_tokens;
                config.json_schema = !self.openai_no_schema;
                let settings = serde_json::json!({
                    "url": self.openai_url, "model": model, "temperature": self.temperature,
                    "json_schema": config.json_schema,
                });
                Ok((Box::new(OpenAiPolicy::new(config)), settings))
            }
            "model" => {
                let (mut loaded, path) = self.model.load_for_inference()?;
                let template = chat_template(&loaded.assets)?;
                let mut name = if self.model.model.is_empty() {
                    "model:default".to_owned()
                } else {
                    format!("model:{}", self.model.model)
                };
                if let Some(dir) = &self.adapter {
                    loaded
                        .model
                        .load_adapter("agent", dir)
                        .with_context(|| format!("loading the adapter {}", dir.display()))?;
                    loaded.model.set_active_adapter(Some("agent"))?;
                    name += &format!("+{}", dir.display());
                }
                let options = ModelPolicyOptions {
                    constrained: !self.unconstrained,
                    sampling: SamplingParams {
                        temperature: self.temperature,
                        top_p: self.top_p,
                        seed,
                        ..SamplingParams::default()
                    },
                    max_new_tokens: self.max_new_tokens,
                    history: self.history,
                    name: name.clone(),
                    ..ModelPolicyOptions::default()
                };
                let settings = serde_json::json!({
                    "model": loaded.files.describe(), "adapter": self.adapter,
                    "constrained": options.constrained, "temperature": self.temperature,
                    "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                    "history": self.history, "parallel": self.parallel,
                    "quantize": path.quantize, "kv_cache": path.kv_cache,
                    "dtype": self.model.dtype,
                });
                let policy = ModelPolicy::new(loaded.model, &loaded.assets, template, options)?;
                Ok((Box::new(policy), settings))
            }
            other => bail!("unknown policy `{other}` (use model, expert or openai)"),
        }
    }
}
