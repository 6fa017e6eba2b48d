//! The sampling flags `generate` and `chat` share.

use teamtune_llama::SamplingParams;

use super::policy_args::check_sampling;

#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens of one answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 299792458)]
    pub seed: u64,
}

impl SamplingArgs {
    /// Refuses values that are not numbers or sample from nothing, naming the flag.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.max_tokens == 0 {
            anyhow::bail!("--max-tokens must be at least 1");
        }
        check_sampling(
            self.temperature,
            self.top_k,
            self.top_p,
            Some(self.repetition_penalty),
        )
    }

    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..Default::default()
        }
    }
}
