//! teamtune-train: the LoRA training loop.
//!
//! [`Trainer::run`] trains the active adapter of a [`Llama`] with our own [`AdamW`] (state saved),
//! a warm-up + cosine [`Schedule`], global gradient-norm clipping and gradient accumulation in
//! which every micro-batch's summed token loss is divided by the trained tokens of the whole
//! accumulation window (so accumulated gradients equal one big batch's). It evaluates at step 0
//! and every N steps, logs metrics as JSON Lines, writes checkpoints atomically and resumes from
//! them exactly.

pub mod error;
pub mod loss;
pub mod optim;
pub mod schedule;

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{backprop::GradStore, Tensor, Var};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use teamtune_data::Batch;
use teamtune_llama::{Llama, Mode};

pub use error::{Result, TrainError};
pub use loss::{batch_inputs, masked_nll_sum};
pub use optim::{clip_grad_norm, grad_norm, AdamW, AdamWParams};
pub use schedule::Schedule;

use error::io_err;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The adapter to train (must already be added to the model).
    pub adapter: String,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub optimizer: AdamWParams,
    /// Global gradient-norm limit; `None`: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Evaluate every this many steps (and at step 0); `None`: at step 0 and at the end only.
    pub eval_every: Option<usize>,
    /// Checkpoint every this many steps (and at the end); `None`: at the end only.
    pub checkpoint_every: Option<usize>,
    /// Positions per LM-head chunk in the loss.
    pub loss_chunk: usize,
    /// Safe target id for untrained positions.
    pub pad_id: u32,
    /// Seed of the data order (recorded in checkpoints).
    pub seed: u64,
    pub progress: bool,
}

impl TrainConfig {
    /// The study's recipe (lr 5e-5, warm-up 0.15, min ratio 0.05, wd 0.03, clip 0.3, 6 epochs).
    pub fn study(adapter: &str, pad_id: u32) -> Self {
        TrainConfig {
            adapter: adapter.to_owned(),
            epochs: 6,
            max_steps: None,
            accumulation: 1,
            lr: 5e-5,
            warmup_ratio: 0.15,
            min_lr_ratio: 0.05,
            optimizer: AdamWParams::default(),
            max_grad_norm: Some(0.3),
            eval_every: None,
            checkpoint_every: None,
            loss_chunk: 1024,
            pad_id,
            seed: 0,
            progress: true,
        }
    }
}

/// Where training stands; saved in each checkpoint as `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Current epoch and the index of its next micro-batch (data position).
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// The data order is a pure function of (seed, epoch): this is the RNG state.
    pub seed: u64,
    pub schedule: Schedule,
    pub last_loss: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub last_loss: Option<f64>,
    pub eval_losses: Vec<(usize, f64)>,
    pub last_checkpoint: Option<PathBuf>,
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

    fn checkpoints_dir(&self) -> PathBuf {
        self.out_dir.join("checkpoints")
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
            let dir = self.resolve_checkpoint(path)?;
            state = self.load_checkpoint(&dir, &vars, &mut opt, model)?;
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
        let metrics_path = self.out_dir.join("metrics.jsonl");
        if resume.is_some() {
            truncate_metrics(&metrics_path, state.step)?;
        }
        let mut metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io_err(&metrics_path))?;
        let mut log = |record: serde_json::Value| -> Result<()> {
            writeln!(metrics, "{record}").map_err(io_err(&metrics_path))
        };
        let bar = ProgressBar::new(total_steps as u64);
        if !cfg.progress || !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
                .expect("static template"),
        );
        bar.set_position(state.step as u64);
        let mut eval_losses = Vec::new();
        if state.step == 0 && !eval.is_empty() {
            // The base model's loss (adapter disabled), the reference of the comparison plot.
            model.set_active_adapter(None)?;
            let l = evaluate(model, eval, cfg.pad_id, cfg.loss_chunk);
            model.set_active_adapter(Some(&cfg.adapter))?;
            let l = l?;
            tracing::info!(eval_loss = l, "step 0 evaluation (base model)");
            log(serde_json::json!({"step": 0, "epoch": 0.0, "eval_loss": l}))?;
            eval_losses.push((0, l));
        }
        while state.epoch < cfg.epochs && state.step < total_steps {
            let batches = data(state.epoch)?;
            let n = batches.len();
            while state.batch_in_epoch < n && state.step < total_steps {
                let end = (state.batch_in_epoch + cfg.accumulation).min(n);
                let window = &batches[state.batch_in_epoch..end];
                let started = Instant::now();
                // Dropout masks come from the device RNG: seeded per step where the device
                // allows it (CUDA), so that a resumed run draws the same masks. The CPU RNG cannot
                // be seeded; exact resume on CPU needs dropout 0.
                let _ = model
                    .device()
                    .set_seed(cfg.seed.wrapping_add(state.step as u64));
                let (loss, mut grads) = accumulate(model, window, &vars, cfg)?;
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
                state.step = step_no;
                state.batch_in_epoch = end;
                state.last_loss = Some(loss);
                let trained: usize = window.iter().map(Batch::trained_tokens).sum();
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                let epoch_f = state.epoch as f64 + end as f64 / n as f64;
                log(serde_json::json!({
                    "step": step_no, "epoch": epoch_f, "loss": loss, "lr": lr,
                    "grad_norm": norm, "trained_tokens": trained,
                    "tokens_per_s": trained as f64 / secs,
                }))?;
                tracing::debug!(step = step_no, loss, lr, grad_norm = norm, "step");
                bar.set_position(step_no as u64);
                bar.set_message(format!("loss {loss:.4} {:.0} tok/s", trained as f64 / secs));
                let last = step_no == total_steps;
                if !eval.is_empty() && (last || every(step_no, cfg.eval_every)) {
                    let l = evaluate(model, eval, cfg.pad_id, cfg.loss_chunk)?;
                    log(serde_json::json!({"step": step_no, "epoch": epoch_f, "eval_loss": l}))?;
                    eval_losses.push((step_no, l));
                }
                if last || every(step_no, cfg.checkpoint_every) {
                    let mut s = state.clone();
                    if s.batch_in_epoch >= n {
                        s.epoch += 1;
                        s.batch_in_epoch = 0;
                    }
                    last_checkpoint = Some(self.save_checkpoint(model, &opt, &s)?);
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

    fn resolve_checkpoint(&self, path: &Path) -> Result<PathBuf> {
        if path.join("trainer_state.json").is_file() {
            return Ok(path.to_owned());
        }
        let latest = path.join("checkpoints").join("latest");
        let name = std::fs::read_to_string(&latest).map_err(io_err(&latest))?;
        Ok(path.join("checkpoints").join(name.trim()))
    }

    /// Writes `checkpoints/step-NNNNNN/{adapter/, optimizer.*, trainer_state.json}` into a
    /// temporary folder and renames it into place, then points `checkpoints/latest` at it.
    fn save_checkpoint(&self, model: &Llama, opt: &AdamW, state: &TrainerState) -> Result<PathBuf> {
        let root = self.checkpoints_dir();
        let name = format!("step-{:06}", state.step);
        let tmp = root.join(format!(".tmp-{name}"));
        let dir = root.join(&name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        model.save_adapter(&self.config.adapter, &tmp.join("adapter"))?;
        opt.save(&tmp)?;
        let sp = tmp.join("trainer_state.json");
        std::fs::write(&sp, serde_json::to_vec_pretty(state)?).map_err(io_err(&sp))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        let latest = root.join("latest");
        let latest_tmp = root.join(".latest.tmp");
        std::fs::write(&latest_tmp, &name).map_err(io_err(&latest_tmp))?;
        std::fs::rename(&latest_tmp, &latest).map_err(io_err(&latest))?;
        tracing::info!(step = state.step, dir = %dir.display(), "checkpoint");
        Ok(dir)
    }

    fn load_checkpoint(
        &self,
        dir: &Path,
        vars: &[(String, Var)],
        opt: &mut AdamW,
        model: &Llama,
    ) -> Result<TrainerState> {
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read(&sp).map_err(io_err(&sp))?;
        let state: TrainerState = serde_json::from_slice(&text)?;
        let wpath = dir.join("adapter").join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&wpath, model.device())?;
        for (name, var) in vars {
            let t = tensors.get(name).ok_or_else(|| TrainError::State {
                path: wpath.clone(),
                message: format!("missing {name}"),
            })?;
            if t.dims() != var.dims() {
                return Err(TrainError::State {
                    path: wpath.clone(),
                    message: format!("{name}: shape {:?} != {:?}", t.dims(), var.dims()),
                });
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        opt.load(dir, model.device())?;
        Ok(state)
    }
}

/// Drops the records after `step` (written after the checkpoint a run resumes from), so that the
/// log reads as one uninterrupted run. Atomic (temporary file and rename).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let mut kept = String::new();
    for line in text.lines() {
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|r| r.get("step").and_then(serde_json::Value::as_u64))
            .is_some_and(|s| s as usize <= step);
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Whether `step` is a multiple of a positive `k`.
fn every(step: usize, k: Option<usize>) -> bool {
    k.and_then(|k| step.checked_rem(k)) == Some(0)
}

/// Forward and backward over the micro-batches of one accumulation window. Each micro-batch's
/// loss is its summed token NLL divided by the trained tokens of the whole window, so the summed
/// gradients are those of the window as one batch. Returns the window's mean token loss and
/// the summed gradients.
pub fn accumulate(
    model: &Llama,
    window: &[Batch],
    vars: &[(String, Var)],
    cfg: &TrainConfig,
) -> Result<(f64, GradStore)> {
    let trained: usize = window.iter().map(Batch::trained_tokens).sum();
    let denom = trained.max(1) as f64;
    let mut acc: Option<GradStore> = None;
    let mut loss = 0f64;
    for batch in window {
        if batch.trained_tokens() == 0 {
            continue;
        }
        let (ids, layout) = batch_inputs(batch, model.device())?;
        let hidden = model.forward_hidden(&ids, &layout, None, Mode::Training)?;
        let (targets, weights) = batch.next_token_targets(cfg.pad_id);
        let nll = masked_nll_sum(model, &hidden, &targets, &weights, cfg.loss_chunk)?;
        let l = (nll / denom)?;
        loss += l.to_scalar::<f32>()? as f64;
        let g = l.backward()?;
        acc = Some(match acc {
            None => g,
            Some(mut a) => {
                for (_, var) in vars {
                    if let Some(gv) = g.get(var.as_tensor()) {
                        let sum = match a.get(var.as_tensor()) {
                            Some(prev) => (prev + gv)?,
                            None => gv.clone(),
                        };
                        a.insert(var.as_tensor(), sum);
                    }
                }
                a
            }
        });
    }
    let grads = match acc {
        Some(g) => g,
        None => Tensor::zeros((), candle_core::DType::F32, model.device())?.backward()?,
    };
    Ok((loss, grads))
}

/// Mean token loss of `batches` (summed NLL over all their trained tokens).
pub fn evaluate(model: &Llama, batches: &[Batch], pad_id: u32, chunk: usize) -> Result<f64> {
    let mut sum = 0f64;
    let mut count = 0usize;
    for batch in batches {
        if batch.trained_tokens() == 0 {
            continue;
        }
        let (ids, layout) = batch_inputs(batch, model.device())?;
        let hidden = model
            .forward_hidden(&ids, &layout, None, Mode::Inference)?
            .detach();
        let (targets, weights) = batch.next_token_targets(pad_id);
        sum +=
            masked_nll_sum(model, &hidden, &targets, &weights, chunk)?.to_scalar::<f32>()? as f64;
        count += batch.trained_tokens();
    }
    Ok(sum / count.max(1) as f64)
}
