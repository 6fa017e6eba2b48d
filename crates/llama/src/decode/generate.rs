//! Autoregressive generation of one sequence with a KV cache, streaming each token to a
//! callback, stopping on any EOS id or the token limit.

use candle_core::Tensor;

use crate::decode::sampling::{Sampler, SamplingParams};
use crate::error::Result;
use crate::model::layout::TokenLayout;
use crate::model::llama::Llama;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Eos(u32),
    MaxTokens,
    Callback,
}

#[derive(Debug, Clone)]
pub struct Generated {
    /// New tokens, the stopping EOS token excluded.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Generates after `prompt`. `on_token` sees each new token (not the EOS) and returns false to
/// stop early.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    params: &SamplingParams,
    max_tokens: usize,
    eos_ids: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generated> {
    let mut sampler = Sampler::new(params.clone());
    let mut cache = model.new_cache(1);
    let mut history = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut next_input = prompt.to_vec();
    let mut start = 0u32;
    loop {
        if tokens.len() >= max_tokens {
            return Ok(Generated {
                tokens,
                stop: StopReason::MaxTokens,
            });
        }
        let ids = Tensor::new(next_input.as_slice(), model.device())?.unsqueeze(0)?;
        let layout = TokenLayout::contiguous(1, next_input.len(), start);
        let logits = model
            .forward_last(&ids, &layout, Some(&mut cache))?
            .squeeze(0)?;
        start += next_input.len() as u32;
        let tok = sampler.sample(&logits, &history)?;
        if eos_ids.contains(&tok) {
            return Ok(Generated {
                tokens,
                stop: StopReason::Eos(tok),
            });
        }
        tokens.push(tok);
        history.push(tok);
        if !on_token(tok) {
            return Ok(Generated {
                tokens,
                stop: StopReason::Callback,
            });
        }
        next_input = vec![tok];
    }
}
