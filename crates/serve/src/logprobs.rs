//! `logprobs` / `top_logprobs`: the log-probability of each reply token, and of the most likely
//! alternatives, under the model's own distribution (the raw logits: before a schema's mask,
//! temperature or top-p). A token a schema forced (the only one its grammar allowed, appended
//! without a forward) has log-probability 0.

use serde_json::{json, Value};
use teamtune_guide::TokenVocab;

/// Most alternatives per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

struct Entry {
    token: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

/// The log-probabilities of one reply, token by token.
pub struct TokenLogprobs {
    top: usize,
    /// The raw logits the next sampled token is drawn from, and their log-sum-exp.
    pending: Option<(Vec<f32>, f32)>,
    entries: Vec<Entry>,
}

impl TokenLogprobs {
    /// `top` alternatives per token (0 to [`MAX_TOP_LOGPROBS`]).
    pub fn new(top: usize) -> Self {
        TokenLogprobs {
            top: top.min(MAX_TOP_LOGPROBS),
            pending: None,
            entries: Vec::new(),
        }
    }

    /// The logits of the step, before anything masks them.
    pub fn observe(&mut self, logits: &[f32]) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max + sum.ln() as f32;
        self.pending = Some((logits.to_vec(), lse));
    }

    /// The token appended: sampled from the observed logits, or forced (log-probability 0).
    pub fn record(&mut self, token: u32) {
        let entry = match self.pending.take() {
            Some((logits, lse)) => {
                let mut top: Vec<(u32, f32)> = Vec::new();
                if self.top > 0 {
                    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
                    let k = self.top.min(order.len());
                    order.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
                        logits[b as usize].total_cmp(&logits[a as usize])
                    });
                    order.truncate(k);
                    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
                    top = order
                        .iter()
                        .map(|&t| (t, logits[t as usize] - lse))
                        .collect();
                }
                let logprob = logits
                    .get(token as usize)
                    .map_or(f32::NEG_INFINITY, |l| l - lse);
                Entry {
                    token,
                    logprob,
                    top,
                }
            }
            None => Entry {
                token,
                logprob: 0.0,
                top: Vec::new(),
            },
        };
        self.entries.push(entry);
    }

    /// OpenAI's `choices[i].logprobs`: `{"content": [{"token", "logprob", "bytes",
    /// "top_logprobs"}]}`, for the tokens whose text is within the reply's first `text_len`
    /// bytes (a stop sequence cuts the reply, and its tokens with it).
    pub fn to_json(&self, vocab: &TokenVocab, text_len: usize) -> Value {
        // A token's own bytes (part of a character, for byte-level pieces) and its text.
        let piece = |t: u32| vocab.token_bytes(t).len();
        let item = |t: u32, lp: f32| {
            let bytes = vocab.token_bytes(t);
            // A finite number (JSON has no -inf): a token the model gave no weight.
            let lp = if lp.is_finite() { lp } else { -9999.0 };
            json!({"token": String::from_utf8_lossy(bytes), "logprob": lp, "bytes": bytes})
        };
        let mut content = Vec::new();
        let mut at = 0;
        for e in &self.entries {
            if at >= text_len {
                break;
            }
            at += piece(e.token);
            let mut v = item(e.token, e.logprob);
            v["top_logprobs"] = Value::Array(e.top.iter().map(|&(t, lp)| item(t, lp)).collect());
            content.push(v);
        }
        json!({"content": content})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_the_raw_logits_and_the_top_alternatives() {
        let mut lp = TokenLogprobs::new(2);
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        lp.observe(&logits);
        lp.record(2);
        lp.record(0); // forced: no logits observed
        let lse = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln() as f32;
        let e = &lp.entries[0];
        assert!((e.logprob - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(e.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((e.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.entries[1].logprob, 0.0);
        assert!(lp.entries[1].top.is_empty());
    }
}
