//! Token statistics.

use crate::encode::Example;

/// Length percentiles, in tokens (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Percentiles {
    pub min: usize,
    pub p50: usize,
    pub p90: usize,
    pub p95: usize,
    pub p99: usize,
    pub max: usize,
}

/// The `q`-th percentile (0..=100) of sorted values by the nearest-rank method.
pub fn percentile(sorted: &[usize], q: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Percentiles {
    pub fn of(mut lengths: Vec<usize>) -> Self {
        lengths.sort_unstable();
        Percentiles {
            min: lengths.first().copied().unwrap_or(0),
            p50: percentile(&lengths, 50.0),
            p90: percentile(&lengths, 90.0),
            p95: percentile(&lengths, 95.0),
            p99: percentile(&lengths, 99.0),
            max: lengths.last().copied().unwrap_or(0),
        }
    }
}

/// Token counts of a set of examples.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenStats {
    pub conversations: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    /// Conversations cut at a turn boundary to fit `max_len`.
    pub cut: usize,
    pub lengths: Percentiles,
}

impl TokenStats {
    pub fn of<'a>(examples: impl IntoIterator<Item = &'a Example>) -> Self {
        let mut s = TokenStats::default();
        let mut lengths = Vec::new();
        for e in examples {
            s.conversations += 1;
            s.tokens += e.len();
            s.trained_tokens += e.trained_tokens();
            s.cut += e.cut as usize;
            lengths.push(e.len());
        }
        s.lengths = Percentiles::of(lengths);
        s
    }

    /// Share of tokens that carry loss.
    pub fn trained_share(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.trained_tokens as f64 / self.tokens as f64
        }
    }
}
