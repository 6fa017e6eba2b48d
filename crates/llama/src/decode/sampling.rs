//! Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, seeded.
//! The distributions are candle-transformers' `LogitsProcessor`; this adds the penalty and the
//! stop set.

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 disables it; >1 discourages tokens seen in the last `repeat_last_n`.
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299792458,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    processor: LogitsProcessor,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            let temperature = params.temperature;
            match (params.top_k, params.top_p) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        Sampler {
            processor: LogitsProcessor::from_sampling(params.seed, sampling),
            params,
        }
    }

    /// Picks a token from `logits` (`[vocab]`); `history` are the ids so far (prompt included),
    /// for the repetition penalty.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let mut logits = logits.to_dtype(DType::F32)?;
        if self.params.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(self.params.repeat_last_n);
            logits = candle_transformers::utils::apply_repeat_penalty(
                &logits,
                self.params.repetition_penalty,
                &history[start..],
            )?;
        }
        Ok(self.processor.sample(&logits)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits() -> Tensor {
        Tensor::new(&[0.0f32, 3.0, 2.9, -1.0, 1.0], &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits(), &[]).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits(), &[1]).unwrap(), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_makes_sampling_repeatable() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(s.sample(&logits(), &[]).unwrap(), 1);
        }
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.5,
                seed,
                ..Default::default()
            });
            (0..40)
                .map(|_| s.sample(&logits(), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(
            draw(7)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: Some(0.5),
            seed: 3,
            ..Default::default()
        });
        // Tokens 1 and 2 hold ~0.7 of the mass; with p=0.5 only they can be drawn.
        for _ in 0..50 {
            assert!(matches!(s.sample(&logits(), &[]).unwrap(), 1 | 2));
        }
    }
}
