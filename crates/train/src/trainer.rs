//! The loop: epochs of micro-batches, accumulation windows, clipping, AdamW, evaluation,
//! metrics, checkpoints and resume.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use teamtune_data::Batch;
use teamtune_llama::Llama;

use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::error::{io_err, Result, TrainError};
use crate::memory;
use crate::metrics::MetricsLog;
use crate::optim::{clip_grad_norm, grad_norm, AdamW};
use crate::schedule::Schedule;
use crate::step::{accumulate, evaluate};

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub last_loss: Option<f64>,
    pub eval_losses: Vec<(usize, f64)>,
    pub last_checkpoint: Option<PathBuf>,
}

/// For people: `8 steps, last loss 0.2435; validation loss 2.0276 at step 0, 0.4125 at step 8`.
impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = if self.steps == 1 { "" } else { "s" };
        write!(f, "{} step{plural}", self.steps)?;
        if let Some(loss) = self.last_loss {
            write!(f, ", last loss {loss:.4}")?;
        }
        if !self.eval_losses.is_empty() {
            let evals: Vec<String> = self
                .eval_losses
                .iter()
                .map(|(step, loss)| format!("{loss:.4} at step {step}"))
                .collect();
            write!(f, "; validation loss {}", evals.join(", "))?;
        }
        Ok(())
    }
}

/// Gives the micro-batches of an epoch; must be deterministic for exact resume.
pub type BatchSource<'a> = dyn FnMut(usize) -> Result<Vec<Batch>> + 'a;

pub struct Trainer {
    pub config: TrainConfig,
    pub out_dir: PathBuf,
}

impl Trainer {
    pub fn new(config: TrainConfig, out_dir: impl Into<PathBuf>) -> Result<Self> {
        if config.accumulation == 0 || config.loss_chunk == 0 {
            return Err(TrainError::Config(
                "accumulation and loss_chunk must be positive".into(),
            ));
        }
        Ok(Trainer {
            config,
            out_dir: out_dir.into(),
        })
    }

    /// Trains `config.adapter` of `model`. With `resume` (a checkpoint folder, or a run folder
    /// whose latest checkpoint is taken) it continues from there.
    pub fn run(
        &self,
        model: &mut Llama,
        data: &mut BatchSource<'_>,
        eval: &[Batch],
        resume: Option<&Path>,
    ) -> Result<TrainSummary> {
        let cfg = &self.config;
        std::fs::create_dir_all(&self.out_dir).map_err(io_err(&self.out_dir))?;
        model.set_active_adapter(Some(&cfg.adapter))?;
        let vars = model
            .adapter(&cfg.adapter)
            .map(|a| a.named_vars())
            .unwrap_or_default();
        let mut total_steps = 0;
        for e in 0..cfg.epochs {
            total_steps += data(e)?.len().div_ceil(cfg.accumulation);
        }
        if let Some(m) = cfg.max_steps {
            total_steps = total_steps.min(m);
        }
        let schedule = Schedule {
            lr: cfg.lr,
            warmup_ratio: cfg.warmup_ratio,
            min_lr_ratio: cfg.min_lr_ratio,
            total_steps,
        };
        let mut opt = AdamW::new(vars.clone(), cfg.optimizer)?;
        let mut state = TrainerState {
            step: 0,
            total_steps,
            epoch: 0,
            batch_in_epoch: 0,
            seed: cfg.seed,
            schedule,
            last_loss: None,
        };
        let mut last_checkpoint = None;
        if let Some(path) = resume {
            let dir = checkpoint::resolve(path)?;
            state = checkpoint::load(&dir, &vars, &mut opt, model)?;
            if state.total_steps != total_steps || state.seed != cfg.seed {
                return Err(TrainError::State {
                    path: dir,
                    message: format!(
                        "checkpoint was made for {} steps with seed {}, this run has {total_steps} with seed {}",
                        state.total_steps, state.seed, cfg.seed
                    ),
                });
            }
            tracing::info!(step = state.step, dir = %dir.display(), "resumed");
            last_checkpoint = Some(dir);
        }
        let mut log = MetricsLog::open(
            &self.out_dir.join(teamtune_formats::METRICS_FILE),
            resume.map(|_| state.step),
        )?;
        let bar = progress_bar(total_steps, cfg.progress);
        bar.set_position(state.step as u64);
        let mut eval_losses = Vec::new();
        if state.step == 0 && !eval.is_empty() && cfg.continues_adapter {
            // Where a continued adapter starts: its own loss, not the base model's.
            let l = evaluate(model, eval, cfg.pad_id, cfg.loss_chunk)?;
            tracing::info!(
                eval_loss = l,
                "step 0 evaluation (the adapter it continues)"
            );
            // Readers of metrics.jsonl take step 0 as the base model unless told otherwise.
            log.write(
                serde_json::json!({"step": 0, "epoch": 0.0, "eval_loss": l, "start": "adapter"}),
            )?;
            eval_losses.push((0, l));
        } else if state.step == 0 && !eval.is_empty() {
            // The base model's loss (adapter disabled), the reference of the comparison plot.
            model.set_active_adapter(None)?;
            let l = evaluate(model, eval, cfg.pad_id, cfg.loss_chunk);
            model.set_active_adapter(Some(&cfg.adapter))?;
            let l = l?;
            tracing::info!(eval_loss = l, "step 0 evaluation (base model)");
            log.write(serde_json::json!({"step": 0, "epoch": 0.0, "eval_loss": l}))?;
            eval_losses.push((0, l));
        }
        while state.epoch < cfg.epochs && state.step < total_steps {
            let batches = data(state.epoch)?;
            let n = batches.len();
            while state.batch_in_epoch < n && state.step < total_steps {
                let end = (state.batch_in_epoch + cfg.accumulation).min(n);
                let window = &batches[state.batch_in_epoch..end];
                let started = Instant::now();
                let measured = memory::reset_peak();
                let (loss, mut grads) = accumulate(model, window, &vars, cfg, state.step)?;
                let step_no = state.step + 1;
                if !loss.is_finite() {
                    return Err(TrainError::NonFinite {
                        step: step_no,
                        loss,
                        last_checkpoint,
                    });
                }
                let norm = match cfg.max_grad_norm {
                    Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
                    None => grad_norm(&grads, &vars)?,
                };
                let lr = schedule.lr_at(state.step);
                opt.step(&grads, lr)?;
                drop(grads);
                let peak = measured.then(memory::peak_rss_mib).flatten();
                state.step = step_no;
                state.batch_in_epoch = end;
                state.last_loss = Some(loss);
                let trained: usize = window.iter().map(Batch::trained_tokens).sum();
                let processed: usize = window.iter().map(Batch::real_tokens).sum();
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                let epoch_f = state.epoch as f64 + end as f64 / n as f64;
                let mut record = serde_json::json!({
                    "step": step_no, "epoch": epoch_f, "loss": loss, "lr": lr,
                    "grad_norm": norm, "trained_tokens": trained,
                    "tokens": processed, "tokens_per_s": processed as f64 / secs,
                    "trained_tokens_per_s": trained as f64 / secs,
                });
                if let Some(mb) = peak {
                    record["peak_memory_mb"] = serde_json::json!(mb);
                }
                log.write(record)?;
                tracing::debug!(step = step_no, loss, lr, grad_norm = norm, "step");
                bar.set_position(step_no as u64);
                bar.set_message(format!(
                    "loss {loss:.4} {:.0} tok/s",
                    processed as f64 / secs
                ));
                let last = step_no == total_steps;
                if !eval.is_empty() && (last || every(step_no, cfg.eval_every)) {
                    let l = evaluate(model, eval, cfg.pad_id, cfg.loss_chunk)?;
                    log.write(
                        serde_json::json!({"step": step_no, "epoch": epoch_f, "eval_loss": l}),
                    )?;
                    eval_losses.push((step_no, l));
                }
                if last || every(step_no, cfg.checkpoint_every) {
                    let mut s = state.clone();
                    if s.batch_in_epoch >= n {
                        s.epoch += 1;
                        s.batch_in_epoch = 0;
                    }
                    last_checkpoint = Some(checkpoint::save(
                        &self.out_dir,
                        model,
                        &cfg.adapter,
                        &opt,
                        &s,
                    )?);
                }
            }
            state.epoch += 1;
            state.batch_in_epoch = 0;
        }
        bar.finish_and_clear();
        model.save_adapter(&cfg.adapter, &self.out_dir.join("adapter"))?;
        Ok(TrainSummary {
            steps: state.step,
            last_loss: state.last_loss,
            eval_losses,
            last_checkpoint,
        })
    }
}

fn progress_bar(total_steps: usize, enabled: bool) -> ProgressBar {
    let bar = ProgressBar::new(total_steps as u64);
    if !enabled || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
            .expect("static template"),
    );
    bar
}

/// Whether `step` is a multiple of a positive `k`.
fn every(step: usize, k: Option<usize>) -> bool {
    k.and_then(|k| step.checked_rem(k)) == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_reads_as_text_without_debug_forms() {
        let s = TrainSummary {
            steps: 8,
            last_loss: Some(0.243_51),
            eval_losses: vec![(0, 2.027_63), (8, 0.412_5)],
            last_checkpoint: None,
        };
        assert_eq!(
            s.to_string(),
            "8 steps, last loss 0.2435; validation loss 2.0276 at step 0, 0.4125 at step 8"
        );
        let none = TrainSummary {
            steps: 1,
            last_loss: None,
            eval_losses: vec![],
            last_checkpoint: None,
        };
        assert_eq!(none.to_string(), "1 step");
    }
}
