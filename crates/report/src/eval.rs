//! Evaluation results (`teamtune eval --out DIR` writes `DIR/eval.json`) as typed records.
//!
//! The file is the contract (as `metrics.jsonl` is for runs), so this crate reads it on its own
//! rather than depending on the agent runtime:
//!
//! ```json
//! {"format": "teamtune-eval/1", "policy": "model:default+run/adapter", "settings": {...},
//!  "tasks": [{"task": "single_nav", "episodes": 5, "mean_score": 40.0, "std_score": 54.8,
//!             "min_score": 0.0, "max_score": 100.0, "success_rate": 0.4,
//!             "invalid_reply_rate": 0.0, "turns": 50, "avg_turns": 10.0,
//!             "generated_tokens": 1610, "seconds": 29.4}, ...],
//!  "mean_score": 31.2, "invalid_reply_rate": 0.0, "wall_seconds": 812.0}
//! ```
//!
//! Required: `format` (exactly [`EVAL_FORMAT`]), `policy`, `tasks`, and per task `task`,
//! `episodes`, `mean_score`, `std_score`, `success_rate`, `invalid_reply_rate`. The other known
//! fields may be missing or `null`; unknown fields are ignored.

use crate::error::{ReportError, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The file `teamtune eval --out DIR` writes its per-task results to, inside `DIR`.
pub const EVAL_FILE: &str = "eval.json";

/// The version tag an evaluation file must carry in its `format` field.
pub use teamtune_formats::EVAL_FORMAT;

/// One task's results.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskScore {
    pub task: String,
    pub episodes: u64,
    /// Mean final score over the episodes (0..100).
    pub mean_score: f64,
    /// Sample standard deviation of the scores.
    pub std_score: f64,
    /// Share (0..1) of episodes that reached 100.
    pub success_rate: f64,
    /// Share (0..1) of turns whose reply the world could not use.
    pub invalid_reply_rate: f64,
    pub min_score: Option<f64>,
    pub max_score: Option<f64>,
    pub turns: Option<u64>,
    pub avg_turns: Option<f64>,
    pub generated_tokens: Option<u64>,
    pub seconds: Option<f64>,
}

/// One evaluation: who played and how each task went, tasks in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResults {
    /// What the evaluation is called in figures and tables (by default its folder's name).
    pub name: String,
    /// The `eval.json` (or other `.json`) file it was read from.
    pub path: PathBuf,
    /// Who played (`expert`, `model:<name>[+adapter]`, `openai:<model>`).
    pub policy: String,
    /// Free-form settings of the evaluation (`null` when absent).
    pub settings: Value,
    pub tasks: Vec<TaskScore>,
    /// The file's own mean over tasks, as written.
    pub mean_score: Option<f64>,
    pub invalid_reply_rate: Option<f64>,
    pub wall_seconds: Option<f64>,
}

impl EvalResults {
    /// Reads an evaluation given its folder (with `eval.json`) or the JSON file itself; the name
    /// is the folder's name (see [`default_eval_name`]).
    pub fn read(input: &Path) -> Result<Self> {
        let path = if input.is_dir() {
            input.join(EVAL_FILE)
        } else {
            input.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses evaluation JSON; `path` names the source in errors and in `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| ReportError::Json {
            path: path.to_path_buf(),
            line: source.line(),
            source,
        })?;
        Self::from_value(&value, path)
    }

    /// Reads already-parsed evaluation JSON.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let bad = |why: String| ReportError::BadEval {
            path: path.to_path_buf(),
            why,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| bad("evaluation results must be a JSON object".into()))?;
        check_format(obj).map_err(bad)?;
        let f = Fields { obj, at: "", path };
        let policy = f.string("policy")?;
        let tasks_value = obj
            .get("tasks")
            .ok_or_else(|| bad("missing field `tasks`".into()))?;
        let list = tasks_value.as_array().ok_or_else(|| {
            bad(format!(
                "field `tasks` must be an array, found {}",
                kind(tasks_value)
            ))
        })?;
        if list.is_empty() {
            return Err(bad("no task results (`tasks` is empty)".into()));
        }
        let mut tasks: Vec<TaskScore> = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let at = format!("tasks[{i}].");
            let obj = t.as_object().ok_or_else(|| {
                bad(format!(
                    "`tasks[{i}]` must be a JSON object, found {}",
                    kind(t)
                ))
            })?;
            let f = Fields { obj, at: &at, path };
            let task = f.string("task")?;
            if tasks.iter().any(|s| s.task == task) {
                return Err(bad(format!("task `{task}` appears twice in `tasks`")));
            }
            tasks.push(TaskScore {
                episodes: f.count("episodes")?.ok_or_else(|| f.missing("episodes"))?,
                mean_score: f.number("mean_score")?,
                std_score: f.number("std_score")?,
                success_rate: f.number("success_rate")?,
                invalid_reply_rate: f.number("invalid_reply_rate")?,
                min_score: f.opt_number("min_score")?,
                max_score: f.opt_number("max_score")?,
                turns: f.count("turns")?,
                avg_turns: f.opt_number("avg_turns")?,
                generated_tokens: f.count("generated_tokens")?,
                seconds: f.opt_number("seconds")?,
                task,
            });
        }
        Ok(EvalResults {
            name: default_eval_name(path, &policy),
            path: path.to_path_buf(),
            policy,
            settings: obj.get("settings").cloned().unwrap_or(Value::Null),
            tasks,
            mean_score: f.opt_number("mean_score")?,
            invalid_reply_rate: f.opt_number("invalid_reply_rate")?,
            wall_seconds: f.opt_number("wall_seconds")?,
        })
    }

    /// The results of `task`, if this evaluation played it.
    pub fn task(&self, task: &str) -> Option<&TaskScore> {
        self.tasks.iter().find(|t| t.task == task)
    }

    /// The unweighted mean over tasks of the per-task mean score (each task weighs the same).
    pub fn mean_over_tasks(&self) -> f64 {
        mean(self.tasks.iter().map(|t| t.mean_score))
    }
}

/// Whether parsed JSON claims to be evaluation results of the supported format: `Err(why)`
/// for a JSON object with another (or no) `format`.
pub(crate) fn check_format(obj: &Map<String, Value>) -> std::result::Result<(), String> {
    match obj.get("format") {
        Some(Value::String(s)) if s == EVAL_FORMAT => Ok(()),
        Some(Value::String(s)) => Err(format!(
            "format `{s}` is not supported (expected evaluation results of format \
             `{EVAL_FORMAT}`, written by `teamtune eval`)"
        )),
        Some(v) => Err(format!(
            "field `format` must be the string `{EVAL_FORMAT}`, found {}",
            kind(v)
        )),
        None => Err(format!(
            "no `format` field: not evaluation results (expected format `{EVAL_FORMAT}`, \
             written by `teamtune eval`)"
        )),
    }
}

/// The default name of an evaluation: the folder of an `eval.json`, the stem of another JSON
/// file, or the policy when neither gives a name.
pub fn default_eval_name(path: &Path, policy: &str) -> String {
    let from = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty() && n != "." && n != "..")
    };
    let name = if path.file_name().is_some_and(|n| n == EVAL_FILE) {
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => {
                from(dir).or_else(|| dir.canonicalize().ok().as_deref().and_then(from))
            }
            _ => std::env::current_dir().ok().as_deref().and_then(from),
        }
    } else {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
    };
    name.unwrap_or_else(|| policy.to_string())
}

pub(crate) fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// What a JSON value is, for error messages.
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Typed access to one JSON object's fields, errors naming file and field (`tasks[2].std_score`).
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    at: &'a str,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, why: String) -> ReportError {
        ReportError::BadEval {
            path: self.path.to_path_buf(),
            why,
        }
    }

    fn missing(&self, field: &str) -> ReportError {
        self.err(format!("missing field `{}{field}`", self.at))
    }

    fn wrong(&self, field: &str, expected: &str, v: &Value) -> ReportError {
        self.err(format!(
            "field `{}{field}` must be {expected}, found {}",
            self.at,
            kind(v)
        ))
    }

    fn string(&self, field: &str) -> Result<String> {
        match self.obj.get(field) {
            None => Err(self.missing(field)),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.wrong(field, "a string", v)),
        }
    }

    fn number(&self, field: &str) -> Result<f64> {
        self.opt_number(field)?
            .ok_or_else(|| match self.obj.get(field) {
                None => self.missing(field),
                Some(v) => self.wrong(field, "a number", v),
            })
    }

    /// `None` when missing or `null`.
    fn opt_number(&self, field: &str) -> Result<Option<f64>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64().filter(|x| x.is_finite()) {
                Some(x) => Ok(Some(x)),
                None => Err(self.wrong(field, "a number", v)),
            },
        }
    }

    /// A non-negative integer; `None` when missing or `null`.
    fn count(&self, field: &str) -> Result<Option<u64>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(field, "a non-negative integer", v)),
        }
    }
}
