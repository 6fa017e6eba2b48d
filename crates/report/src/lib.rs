//! teamtune-report: reports on training runs and evaluations.
//!
//! It owns the files runs and evaluations leave, as types: a run's `metrics.jsonl`
//! ([`metrics`]) and `teamtune eval` results ([`eval`]); the figures drawn from them: loss curves
//! as PNG and SVG ([`plot`]), several runs side by side in one figure and a table ([`compare`]),
//! evaluations side by side per task ([`scoreboard`]) with the study's published scores as
//! optional reference columns ([`reference`]) and a grouped bar chart ([`bars`]); and the
//! Markdown written from them: comparison tables ([`markdown`]) and `teamtune demo`'s report.md
//! ([`demo`], from a plain [`DemoReport`] the cli fills); and `teamtune improve`'s record,
//! improve.json, with its per-round table and report.md ([`improve`]). Text is drawn with the
//! bundled DejaVu Sans ([`font`]): no system fonts.
//!
//! It must not own, or depend on, models, training, grid worlds or command-line parsing: no
//! `teamtune-llama`, `-train`, `-agents` or `-gridworld` dependency. What it reports arrives
//! as files it reads or as plain input structs.

mod bars;
mod compare;
mod demo;
mod error;
mod eval;
mod font;
mod improve;
mod markdown;
mod metrics;
mod output;
mod plot;
mod reference;
mod scoreboard;
mod summary;

pub use bars::{BarChart, BarSeries, ERROR_BAR};
pub use compare::{detect, table, Comparable, Comparison, InputKind, PALETTE};
pub use demo::{
    DemoAssumptions, DemoEpisode, DemoRecipe, DemoReport, DemoTraining, DemoUnconstrained,
};
pub use error::{ReportError, Result};
pub use eval::{EvalResults, TaskScore, EVAL_FILE, EVAL_FORMAT};
pub use improve::{
    ImproveLog, ImproveRound, RoundEval, RoundTask, TaskMean, IMPROVE_FILE, IMPROVE_FORMAT,
};
pub use markdown::score_table as markdown_score_table;
pub use metrics::{EvalPoint, RunMetrics, TrainPoint, METRICS_FILE};
pub use output::FigureFiles;
pub use plot::{plot_run, run_chart, Chart, Series, SeriesKind, BASE_LABEL, START_LABEL};
pub use reference::{reference, ReferenceColumn, REFERENCE_NAMES, STUDY};
pub use scoreboard::{Scoreboard, MEAN_LABEL, MISSING};
pub use summary::RunSummary;
