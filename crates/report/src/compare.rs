//! Comparing runs: what each input is ([`detect`]), one figure with every run (one colour per
//! run: train solid, eval with markers, its base line dashed) and a plain-text table.

use crate::error::{ReportError, Result};
use crate::metrics::{RunMetrics, METRICS_FILE};
use crate::output::FigureFiles;
use crate::plot::{run_series, Chart};
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
    // Evaluation results (`teamtune eval` JSON files, a later issue) become a variant here,
    // recognised in `detect_file`, with their own columns in the table.
}

impl Comparable {
    pub fn name(&self) -> &str {
        match self {
            Comparable::Run(r) => &r.name,
        }
    }

    fn set_name(&mut self, name: String) {
        match self {
            Comparable::Run(r) => r.name = name,
        }
    }

    /// The file or folder this input came from, to tell apart inputs of the same name.
    fn source(&self) -> PathBuf {
        match self {
            Comparable::Run(r) => match r.path.file_name() {
                Some(f) if f == METRICS_FILE => r.path.parent().unwrap_or(&r.path).to_path_buf(),
                _ => r.path.clone(),
            },
        }
    }
}

/// Recognises and reads what `path` is: a run folder (it has `metrics.jsonl`) or a metrics
/// `.jsonl` file. Anything else is a [`ReportError::NotComparable`] saying what was expected.
pub fn detect(path: &Path) -> Result<Comparable> {
    let not = |why: &str| ReportError::NotComparable {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    if path.is_dir() {
        if path.join(METRICS_FILE).is_file() {
            return Ok(Comparable::Run(RunMetrics::read(path)?));
        }
        return Err(not(
            "a folder without metrics.jsonl: not a training run (expected a run folder or a metrics .jsonl file)",
        ));
    }
    if path.is_file() {
        return detect_file(path);
    }
    Err(not("no such file or folder"))
}

/// Recognises a file by its name.
fn detect_file(path: &Path) -> Result<Comparable> {
    let not = |why: &str| ReportError::NotComparable {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => Ok(Comparable::Run(RunMetrics::read(path)?)),
        // Evaluation results: recognise their JSON here and return their variant.
        Some("json") => Err(not(
            "a JSON file: evaluation results cannot be compared yet (expected a run folder or a metrics .jsonl file)",
        )),
        _ => Err(not(
            "not a run folder (with metrics.jsonl) or a metrics .jsonl file",
        )),
    }
}

/// Several inputs side by side.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub items: Vec<Comparable>,
}

/// One colour per run (Tableau 10).
const PALETTE: [RGBColor; 10] = [
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
    pub fn detect_all(paths: &[PathBuf]) -> Result<Self> {
        let items = paths
            .iter()
            .map(|p| detect(p))
            .collect::<Result<Vec<_>>>()?;
        let mut count: HashMap<String, usize> = HashMap::new();
        for it in &items {
            *count.entry(it.name().to_string()).or_default() += 1;
        }
        let mut c = Comparison { items };
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

    pub fn runs(&self) -> impl Iterator<Item = &RunMetrics> {
        self.items.iter().map(|it| match it {
            Comparable::Run(r) => r,
        })
    }

    pub fn summaries(&self) -> Vec<RunSummary> {
        self.runs().map(RunSummary::of).collect()
    }

    /// The comparison table (see [`table`]).
    pub fn table(&self) -> String {
        table(&self.summaries())
    }

    /// Every run in one chart, one colour each.
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

    /// Writes the comparison figure to `PREFIX.png` and `PREFIX.svg`.
    pub fn write_figure(&self, prefix: &Path) -> Result<FigureFiles> {
        let files = FigureFiles::at(prefix);
        self.chart().write(&files)?;
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
    out
}
