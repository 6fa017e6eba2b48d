//! The numbers a comparison shows for one run, computed from its metrics.

use crate::metrics::RunMetrics;

/// The share of the last train steps whose mean loss is a run's final train loss.
pub const FINAL_SHARE: f64 = 0.1;

/// One run in numbers. `None` where the run logged nothing to compute it from.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub name: String,
    /// The last train step.
    pub steps: u64,
    /// Mean train loss over the last 10% of train steps (at least one step).
    pub final_train_loss: Option<f64>,
    /// The step-0 evaluation: the base model's loss.
    pub base_eval_loss: Option<f64>,
    /// The evaluation at the highest step after step 0 (the adapter's last).
    pub last_eval_loss: Option<f64>,
    /// The lowest evaluation after step 0.
    pub best_eval_loss: Option<f64>,
    /// `(last - base) / base` in percent: negative when the adapter lowered the loss.
    pub change_vs_base_pct: Option<f64>,
    /// Mean of the steps' tokens/s.
    pub mean_tokens_per_s: Option<f64>,
    /// The highest `peak_memory_mb` any step logged.
    pub peak_memory_mb: Option<f64>,
    /// Step 0 is the loss of the adapter the run continued, not the base model's.
    pub continued: bool,
}

impl RunSummary {
    pub fn of(run: &RunMetrics) -> Self {
        let mut train: Vec<_> = run.train.iter().collect();
        train.sort_by_key(|p| p.step);
        let k = ((train.len() as f64 * FINAL_SHARE).ceil() as usize).max(1);
        let final_train_loss = (!train.is_empty()).then(|| {
            let tail = &train[train.len().saturating_sub(k)..];
            tail.iter().map(|p| p.loss).sum::<f64>() / tail.len() as f64
        });
        let after_base = || run.eval.iter().filter(|e| e.step > 0);
        let last_eval_loss = after_base().max_by_key(|e| e.step).map(|e| e.eval_loss);
        let best_eval_loss = after_base().map(|e| e.eval_loss).reduce(f64::min);
        let base_eval_loss = run.base_eval_loss();
        let change_vs_base_pct = match (base_eval_loss, last_eval_loss) {
            (Some(b), Some(l)) if b != 0.0 => Some((l - b) / b * 100.0),
            _ => None,
        };
        let tps: Vec<f64> = train.iter().filter_map(|p| p.tokens_per_s).collect();
        let mean_tokens_per_s =
            (!tps.is_empty()).then(|| tps.iter().sum::<f64>() / tps.len() as f64);
        let peak_memory_mb = train
            .iter()
            .filter_map(|p| p.peak_memory_mb)
            .reduce(f64::max);
        RunSummary {
            name: run.name.clone(),
            steps: train.last().map_or(0, |p| p.step),
            final_train_loss,
            base_eval_loss,
            last_eval_loss,
            best_eval_loss,
            change_vs_base_pct,
            mean_tokens_per_s,
            peak_memory_mb,
            continued: run.continued,
        }
    }
}
