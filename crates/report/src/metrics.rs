//! A run's `metrics.jsonl` (written by `teamtune-train`) as typed records.
//!
//! Train steps: `{"step","epoch","loss","lr","grad_norm","trained_tokens","tokens_per_s"}` (every
//! real token of the step per second; runs before 2026-12-06 counted trained tokens only) and
//! optionally `"peak_memory_mb"`; evaluations: `{"step","epoch","eval_loss"}`. The step-0
//! evaluation is the base model's loss (adapter disabled), or, in a run that trained an existing
//! adapter further, that adapter's (the record then says `"start": "adapter"`). Only `step` and the loss are required;
//! other known fields may be missing (or `null`), unknown fields are ignored, and a record with
//! neither `loss` nor `eval_loss` (a record kind this reader does not know) is skipped.

use crate::error::{ReportError, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The file a training run writes its metrics to, inside the run folder.
pub use teamtune_formats::METRICS_FILE;

/// One optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPoint {
    pub step: u64,
    pub epoch: Option<f64>,
    pub loss: f64,
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    pub trained_tokens: Option<u64>,
    pub tokens_per_s: Option<f64>,
    pub peak_memory_mb: Option<f64>,
}

/// One evaluation on the held-out set.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPoint {
    pub step: u64,
    pub epoch: Option<f64>,
    pub eval_loss: f64,
}

/// Everything a run logged, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct RunMetrics {
    /// What the run is called in figures and tables (by default its folder's name).
    pub name: String,
    /// The metrics file it was read from.
    pub path: PathBuf,
    pub train: Vec<TrainPoint>,
    pub eval: Vec<EvalPoint>,
    /// The run trained an existing adapter further: its step-0 evaluation is that adapter's
    /// loss, not the base model's.
    pub continued: bool,
}

impl RunMetrics {
    /// Reads a run given its folder (with `metrics.jsonl`) or the metrics file itself; the name
    /// is the run folder's name.
    pub fn read(run: &Path) -> Result<Self> {
        let path = metrics_path(run);
        let name = default_name(&path);
        Self::read_file(&path, name)
    }

    /// Reads a metrics file under the given run name.
    pub fn read_file(path: &Path, name: impl Into<String>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut run = Self::parse(&text, path)?;
        run.name = name.into();
        Ok(run)
    }

    /// Parses metrics text; `path` is only used to name the source in errors and in `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut run = RunMetrics {
            name: default_name(path),
            path: path.to_path_buf(),
            train: Vec::new(),
            eval: Vec::new(),
            continued: false,
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec = Record {
                path,
                line: i + 1,
                obj: match serde_json::from_str::<Value>(line) {
                    Ok(Value::Object(obj)) => obj,
                    Ok(_) => {
                        return Err(ReportError::NotObject {
                            path: path.to_path_buf(),
                            line: i + 1,
                        })
                    }
                    Err(source) => {
                        return Err(ReportError::Json {
                            path: path.to_path_buf(),
                            line: i + 1,
                            source,
                        })
                    }
                },
            };
            let step = rec.step()?;
            let epoch = rec.opt_f64("epoch")?;
            if let Some(loss) = rec.opt_f64("loss")? {
                run.train.push(TrainPoint {
                    step,
                    epoch,
                    loss,
                    lr: rec.opt_f64("lr")?,
                    grad_norm: rec.opt_f64("grad_norm")?,
                    trained_tokens: rec.opt_u64("trained_tokens")?,
                    tokens_per_s: rec.opt_f64("tokens_per_s")?,
                    peak_memory_mb: rec.opt_f64("peak_memory_mb")?,
                });
            } else if rec.obj.contains_key("loss") {
                return Err(rec.bad("loss", "a number", rec.obj.get("loss")));
            }
            if let Some(eval_loss) = rec.opt_f64("eval_loss")? {
                if step == 0 && rec.obj.get("start").and_then(Value::as_str) == Some("adapter") {
                    run.continued = true;
                }
                run.eval.push(EvalPoint {
                    step,
                    epoch,
                    eval_loss,
                });
            } else if rec.obj.contains_key("eval_loss") {
                return Err(rec.bad("eval_loss", "a number", rec.obj.get("eval_loss")));
            }
        }
        if run.train.is_empty() && run.eval.is_empty() {
            return Err(ReportError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(run)
    }

    /// The loss the run started from: the evaluation at step 0, if the run evaluated (the base
    /// model's, or the continued adapter's when [`Self::continued`]).
    pub fn base_eval_loss(&self) -> Option<f64> {
        self.eval.iter().find(|e| e.step == 0).map(|e| e.eval_loss)
    }

    /// The last step the run logged (train or eval).
    pub fn last_step(&self) -> u64 {
        let t = self.train.iter().map(|p| p.step);
        let e = self.eval.iter().map(|p| p.step);
        t.chain(e).max().unwrap_or(0)
    }
}

/// The metrics file of a run folder, or `run` itself when it is a file.
pub fn metrics_path(run: &Path) -> PathBuf {
    if run.is_dir() {
        run.join(METRICS_FILE)
    } else {
        run.to_path_buf()
    }
}

/// A run's default name: the name of the folder its metrics file is in.
fn default_name(metrics: &Path) -> String {
    let dir = match metrics.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| metrics.display().to_string())
}

/// One parsed line, for field access with errors that name file and line.
struct Record<'a> {
    path: &'a Path,
    line: usize,
    obj: Map<String, Value>,
}

impl Record<'_> {
    fn bad(&self, field: &'static str, expected: &'static str, v: Option<&Value>) -> ReportError {
        let mut found = v.map_or_else(|| "nothing".to_string(), Value::to_string);
        if found.len() > 40 {
            let cut = (0..=40)
                .rev()
                .find(|&k| found.is_char_boundary(k))
                .unwrap_or(0);
            found.truncate(cut);
            found.push_str("...");
        }
        ReportError::BadField {
            path: self.path.to_path_buf(),
            line: self.line,
            field,
            expected,
            found,
        }
    }

    fn step(&self) -> Result<u64> {
        match self.obj.get("step") {
            None => Err(ReportError::MissingField {
                path: self.path.to_path_buf(),
                line: self.line,
                field: "step",
            }),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.bad("step", "a non-negative integer", Some(v))),
        }
    }

    /// A number field that may be missing or `null` (serde_json writes NaN as `null`).
    fn opt_f64(&self, field: &'static str) -> Result<Option<f64>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(field, "a number", Some(v))),
        }
    }

    fn opt_u64(&self, field: &'static str) -> Result<Option<u64>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad(field, "a non-negative integer", Some(v))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_and_eval_records_with_optional_and_unknown_fields() {
        let text = r#"{"step":0,"epoch":0.0,"eval_loss":2.5}
{"step":1,"epoch":0.5,"loss":2.4,"lr":1e-5,"grad_norm":0.3,"trained_tokens":100,"tokens_per_s":50.0,"peak_memory_mb":812.5,"new_field":"x"}
{"step":2,"loss":2.2}

{"step":2,"epoch":1.0,"eval_loss":2.3}
{"step":3,"note":"a future record kind"}
"#;
        let run = RunMetrics::parse(text, Path::new("r/metrics.jsonl")).unwrap();
        assert_eq!(run.train.len(), 2);
        assert_eq!(run.eval.len(), 2);
        assert_eq!(run.train[0].peak_memory_mb, Some(812.5));
        assert_eq!(run.train[0].trained_tokens, Some(100));
        assert_eq!(run.train[1].lr, None);
        assert_eq!(run.base_eval_loss(), Some(2.5));
        assert_eq!(run.last_step(), 2);
        assert!(!run.continued);
        // A run that trained an existing adapter further says so at step 0.
        let text = "{\"step\":0,\"eval_loss\":1.5,\"start\":\"adapter\"}\n";
        let run = RunMetrics::parse(text, Path::new("m.jsonl")).unwrap();
        assert!(run.continued);
        assert_eq!(run.base_eval_loss(), Some(1.5));
    }

    #[test]
    fn null_loss_is_not_a_number() {
        let err = RunMetrics::parse("{\"step\":1,\"loss\":null}\n", Path::new("m.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("m.jsonl:1: field `loss`"), "{err}");
    }
}
