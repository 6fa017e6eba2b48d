//! Reports on training runs and evaluations: a run's `metrics.jsonl` as typed records
//! ([`metrics`]), its loss curves as PNG and SVG ([`plot`]), several runs side by side in one
//! figure and a table ([`compare`]); `teamtune eval` results ([`eval`]) side by side per task
//! ([`scoreboard`], and as Markdown: [`markdown`]) with the study's published scores as optional reference columns
//! ([`reference`]) and a grouped bar chart ([`bars`]). Text is drawn with the bundled DejaVu
//! Sans ([`font`]): no system fonts.

pub mod bars;
pub mod compare;
pub mod error;
pub mod eval;
pub mod font;
pub mod markdown;
pub mod metrics;
pub mod output;
pub mod plot;
pub mod reference;
pub mod scoreboard;
pub mod summary;

pub use bars::{BarChart, BarSeries};
pub use compare::{detect, table, Comparable, Comparison, InputKind, PALETTE};
pub use error::{ReportError, Result};
pub use eval::{EvalResults, TaskScore, EVAL_FILE, EVAL_FORMAT};
pub use markdown::score_table as markdown_score_table;
pub use metrics::{EvalPoint, RunMetrics, TrainPoint, METRICS_FILE};
pub use output::FigureFiles;
pub use plot::{plot_run, run_chart, Chart, Series, SeriesKind, BASE_LABEL};
pub use reference::{reference, ReferenceColumn, REFERENCE_NAMES, STUDY};
pub use scoreboard::{Scoreboard, MEAN_LABEL, MISSING};
pub use summary::RunSummary;
