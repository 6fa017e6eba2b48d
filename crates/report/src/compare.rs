//! Comparing runs or evaluations: what each input is ([`detect`]). Runs: one figure with every
//! run (one colour per run: train solid, eval with markers, its base line dashed) and a
//! plain-text table. Evaluations: a per-task table side by side and a grouped bar chart
//! ([`Scoreboard`]), optionally with published reference columns ([`crate::reference`]).

use crate::error::{ReportError, Result};
use crate::eval::{check_format, EvalResults, EVAL_FILE};
use crate::metrics::{RunMetrics, METRICS_FILE};
use crate::output::FigureFiles;
use crate::plot::{run_series, Chart};
use crate::reference::{reference, ReferenceColumn, REFERENCE_NAMES};
use crate::scoreboard::Scoreboard;
use crate::summary::RunSummary;
use plotters::style::RGBColor;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One input of a comparison, as recognised by [`detect`].
#[derive(Debug, Clone, PartialEq)]
pub enum Comparable {
    /// A training run: its folder (with `metrics.jsonl`) or that file itself.
    Run(RunMetrics),
    /// Evaluation results: a `teamtune eval --out` folder (with `eval.json`) or a JSON file of
    /// format `teamtune-eval/1`.
    Eval(EvalResults),
}

/// What a comparison compares (all its inputs are of one kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Runs,
    Evals,
}

impl Comparable {
    pub fn name(&self) -> &str {
        match self {
            Comparable::Run(r) => &r.name,
            Comparable::Eval(e) => &e.name,
        }
    }

    fn set_name(&mut self, name: String) {
        match self {
            Comparable::Run(r) => r.name = name,
            Comparable::Eval(e) => e.name = name,
        }
    }

    /// The file or folder this input came from, to tell apart inputs of the same name.
    fn source(&self) -> PathBuf {
        match self {
            Comparable::Run(r) => match r.path.file_name() {
                Some(f) if f == METRICS_FILE => r.path.parent().unwrap_or(&r.path).to_path_buf(),
                _ => r.path.clone(),
            },
            Comparable::Eval(e) => match e.path.file_name() {
                Some(f) if f == EVAL_FILE => e.path.parent().unwrap_or(&e.path).to_path_buf(),
                _ => e.path.clone(),
            },
        }
    }

    /// The file or folder this input came from.
    pub fn path(&self) -> &Path {
        match self {
            Comparable::Run(r) => &r.path,
            Comparable::Eval(e) => &e.path,
        }
    }

    pub fn kind(&self) -> InputKind {
        match self {
            Comparable::Run(_) => InputKind::Runs,
            Comparable::Eval(_) => InputKind::Evals,
        }
    }
}

/// Recognises and reads what `path` is: a run folder (it has `metrics.jsonl`), a metrics
/// `.jsonl` file, an evaluation folder (it has `eval.json`) or an evaluation `.json` file (by
/// its `format` field). Anything else is a [`ReportError::NotComparable`] saying what was
/// expected.
pub fn detect(path: &Path) -> Result<Comparable> {
    let not = |why: &str| ReportError::NotComparable {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    if path.is_dir() {
        let (run, eval) = (
            path.join(METRICS_FILE).is_file(),
            path.join(EVAL_FILE).is_file(),
        );
        return match (run, eval) {
            (true, true) => Err(not(
                "a folder with both metrics.jsonl and eval.json: give the file to compare",
            )),
            (true, false) => Ok(Comparable::Run(RunMetrics::read(path)?)),
            (false, true) => Ok(Comparable::Eval(EvalResults::read(path)?)),
            (false, false) => Err(not(
                "a folder without metrics.jsonl or eval.json: not a training run or evaluation \
                 results (expected a run folder, a metrics .jsonl file, an eval folder or an \
                 eval .json file)",
            )),
        };
    }
    if path.is_file() {
        return detect_file(path);
    }
    Err(not("no such file or folder"))
}

/// Recognises a file by its name and, for JSON, its `format` field.
fn detect_file(path: &Path) -> Result<Comparable> {
    let not = |why: &str| ReportError::NotComparable {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => Ok(Comparable::Run(RunMetrics::read(path)?)),
        Some("json") => {
            let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| ReportError::Json {
                    path: path.to_path_buf(),
                    line: source.line(),
                    source,
                })?;
            let obj = value.as_object().ok_or_else(|| {
                not("a JSON file that is not an object: not evaluation results (expected format teamtune-eval/1)")
            })?;
            check_format(obj).map_err(|why| not(&why))?;
            Ok(Comparable::Eval(EvalResults::from_value(&value, path)?))
        }
        _ => Err(not(
            "not a run folder (with metrics.jsonl), a metrics .jsonl file, an eval folder (with \
             eval.json) or an eval .json file",
        )),
    }
}

/// Several inputs side by side: all runs or all evaluations.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub items: Vec<Comparable>,
    /// Published columns shown beside evaluations (see [`Comparison::set_reference`]).
    pub references: Vec<ReferenceColumn>,
}

/// One colour per input (Tableau 10).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
];

impl Comparison {
    /// Detects every path. Inputs that would share a name are named by their path instead.
    /// Runs and evaluations cannot be mixed: that is a [`ReportError::Mixed`].
    pub fn detect_all(paths: &[PathBuf]) -> Result<Self> {
        let items = paths
            .iter()
            .map(|p| detect(p))
            .collect::<Result<Vec<_>>>()?;
        let first = |k: InputKind| items.iter().find(|it| it.kind() == k).map(|it| it.source());
        if let (Some(run), Some(eval)) = (first(InputKind::Runs), first(InputKind::Evals)) {
            return Err(ReportError::Mixed { run, eval });
        }
        let mut count: HashMap<String, usize> = HashMap::new();
        for it in &items {
            *count.entry(it.name().to_string()).or_default() += 1;
        }
        let mut c = Comparison {
            items,
            references: Vec::new(),
        };
        for it in &mut c.items {
            if count[it.name()] > 1 {
                let src = it.source().display().to_string();
                it.set_name(src);
            }
        }
        Ok(c)
    }

    /// Names the inputs in order (one name per input).
    pub fn rename(&mut self, names: &[String]) -> Result<()> {
        if names.len() != self.items.len() {
            return Err(ReportError::NameCount {
                names: names.len(),
                inputs: self.items.len(),
            });
        }
        for (it, n) in self.items.iter_mut().zip(names) {
            it.set_name(n.clone());
        }
        Ok(())
    }

    /// What the inputs are (runs when there are none).
    pub fn kind(&self) -> InputKind {
        self.items.first().map_or(InputKind::Runs, Comparable::kind)
    }

    /// Adds the published columns of reference `name` (`study`) beside the evaluations. Only
    /// for evaluations; an unknown name is an error listing the known ones.
    pub fn set_reference(&mut self, name: &str) -> Result<()> {
        let cols = reference(name).ok_or_else(|| ReportError::Usage {
            why: format!(
                "unknown reference `{name}` (known: {})",
                REFERENCE_NAMES.join(", ")
            ),
        })?;
        if self.kind() != InputKind::Evals {
            return Err(ReportError::Usage {
                why: "a reference adds published evaluation scores: it needs evaluation \
                      results to compare, not training runs"
                    .into(),
            });
        }
        self.references = cols.to_vec();
        Ok(())
    }

    pub fn runs(&self) -> impl Iterator<Item = &RunMetrics> {
        self.items.iter().filter_map(|it| match it {
            Comparable::Run(r) => Some(r),
            Comparable::Eval(_) => None,
        })
    }

    pub fn evals(&self) -> impl Iterator<Item = &EvalResults> {
        self.items.iter().filter_map(|it| match it {
            Comparable::Eval(e) => Some(e),
            Comparable::Run(_) => None,
        })
    }

    pub fn summaries(&self) -> Vec<RunSummary> {
        self.runs().map(RunSummary::of).collect()
    }

    /// The evaluations (and reference columns) per task.
    pub fn scoreboard(&self) -> Scoreboard {
        let evals: Vec<&EvalResults> = self.evals().collect();
        Scoreboard::new(&evals, &self.references, &PALETTE)
    }

    /// The comparison table: runs as [`table`], evaluations as [`Scoreboard::table`].
    pub fn table(&self) -> String {
        match self.kind() {
            InputKind::Runs => table(&self.summaries()),
            InputKind::Evals => self.scoreboard().table(),
        }
    }

    /// Every run in one chart, one colour each (the figure of runs; evaluations draw
    /// [`Scoreboard::bar_chart`]).
    pub fn chart(&self) -> Chart {
        let names: Vec<&str> = self.items.iter().map(Comparable::name).collect();
        let series = self
            .runs()
            .enumerate()
            .flat_map(|(i, r)| {
                let c = PALETTE[i % PALETTE.len()];
                run_series(r, &format!("{}: ", r.name), [c; 3])
            })
            .collect();
        Chart {
            title: names.join(" vs "),
            series,
        }
    }

    /// Writes the comparison figure to `PREFIX.png` and `PREFIX.svg`: loss curves for runs, a
    /// grouped bar chart of scores per task for evaluations.
    pub fn write_figure(&self, prefix: &Path) -> Result<FigureFiles> {
        let files = FigureFiles::at(prefix);
        match self.kind() {
            InputKind::Runs => self.chart().write(&files)?,
            InputKind::Evals => self.scoreboard().bar_chart().write(&files)?,
        }
        Ok(files)
    }
}

/// The table's column headings, in order; the peak-memory column only appears when a run
/// logged `peak_memory_mb`.
pub const COLUMNS: [&str; 9] = [
    "run",
    "steps",
    "final train loss",
    "base eval (step 0)",
    "last eval",
    "best eval",
    "last vs base",
    "tokens/s",
    "peak memory MB",
];

/// A plain-text table, one row per run, columns as [`COLUMNS`] separated by at least two
/// spaces; `-` where a run has no value. Notes on how the numbers are computed follow it.
pub fn table(rows: &[RunSummary]) -> String {
    let with_memory = rows.iter().any(|r| r.peak_memory_mb.is_some());
    let ncol = if with_memory { 9 } else { 8 };
    let f = |v: Option<f64>, p: usize| v.map_or_else(|| "-".to_string(), |v| format!("{v:.p$}"));
    let mut cells: Vec<Vec<String>> = vec![COLUMNS[..ncol].iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let mut row = vec![
            r.name.clone(),
            r.steps.to_string(),
            f(r.final_train_loss, 4),
            f(r.base_eval_loss, 4),
            f(r.last_eval_loss, 4),
            f(r.best_eval_loss, 4),
            r.change_vs_base_pct
                .map_or_else(|| "-".to_string(), |v| format!("{v:+.2}%")),
            f(r.mean_tokens_per_s, 1),
        ];
        if with_memory {
            row.push(f(r.peak_memory_mb, 1));
        }
        cells.push(row);
    }
    let widths: Vec<usize> = (0..ncol)
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in cells.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let w = widths[c];
            if c == 0 {
                let _ = write!(line, "{cell:<w$}");
            } else {
                let _ = write!(line, "  {cell:>w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (ncol - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out.push_str(
        "final train loss: mean over the last 10% of train steps; last/best eval: evaluations \
         after step 0; last vs base: (last eval - base eval) / base eval\n",
    );
    for r in rows.iter().filter(|r| r.continued) {
        let _ = writeln!(
            out,
            "{}: trained an existing adapter further; its step 0 is that adapter's loss, not \
             the base model's",
            r.name
        );
    }
    out
}
