//! Learning-rate schedule: linear warm-up, then cosine decay to `min_lr_ratio * lr`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub lr: f64,
    /// Fraction of the total steps spent warming up.
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub total_steps: usize,
}

impl Schedule {
    /// The study's defaults (lr 5e-5, warm-up 0.15, minimum ratio 0.05).
    pub fn study(total_steps: usize) -> Self {
        Schedule {
            lr: 5e-5,
            warmup_ratio: 0.15,
            min_lr_ratio: 0.05,
            total_steps,
        }
    }

    pub fn warmup_steps(&self) -> usize {
        (self.warmup_ratio * self.total_steps as f64).ceil() as usize
    }

    /// The learning rate of optimizer step `step` (0-based): `lr * (step + 1) / warmup` during
    /// warm-up, then a half cosine from `lr` down to `min_lr_ratio * lr` at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        let warm = self.warmup_steps();
        if step < warm {
            return self.lr * (step + 1) as f64 / warm as f64;
        }
        let min = self.lr * self.min_lr_ratio;
        let decay = self.total_steps.saturating_sub(warm);
        if decay <= 1 {
            return self.lr;
        }
        let progress = ((step - warm) as f64 / (decay - 1) as f64).min(1.0);
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-12)
    }

    #[test]
    fn schedule_warms_up_linearly_then_cosine_to_min() {
        let s = Schedule::study(100);
        assert_eq!(s.warmup_steps(), 15);
        assert!(close(s.lr_at(0), 5e-5 / 15.0));
        assert!(close(s.lr_at(7), 5e-5 * 8.0 / 15.0));
        assert!(close(s.lr_at(14), 5e-5));
        assert!(close(s.lr_at(15), 5e-5));
        // Midpoint of the cosine: half way between lr and min.
        let min = 5e-5 * 0.05;
        let mid = s.lr_at(15 + 42);
        assert!(close(mid, min + 0.5 * (5e-5 - min)), "{mid}");
        assert!(close(s.lr_at(99), min));
        assert!(close(s.lr_at(500), min));
        for i in 15..99 {
            assert!(s.lr_at(i + 1) <= s.lr_at(i));
        }
    }

    #[test]
    fn schedule_without_warmup_or_steps() {
        let s = Schedule {
            lr: 1.0,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
            total_steps: 3,
        };
        assert!(close(s.lr_at(0), 1.0));
        assert!(close(s.lr_at(1), 0.5));
        assert!(s.lr_at(2).abs() < 1e-15);
        let one = Schedule {
            total_steps: 1,
            ..s
        };
        assert!(close(one.lr_at(0), 1.0));
    }
}
