//! Reports on training runs: a run's `metrics.jsonl` as typed records ([`metrics`]), its loss
//! curves as PNG and SVG ([`plot`]), and several runs side by side in one figure and a table
//! ([`compare`]). Text is drawn with the bundled DejaVu Sans ([`font`]): no system fonts.

pub mod compare;
pub mod error;
pub mod font;
pub mod metrics;
pub mod output;
pub mod plot;
pub mod summary;

pub use compare::{detect, table, Comparable, Comparison};
pub use error::{ReportError, Result};
pub use metrics::{EvalPoint, RunMetrics, TrainPoint, METRICS_FILE};
pub use output::FigureFiles;
pub use plot::{plot_run, run_chart, Chart, Series, SeriesKind, BASE_LABEL};
pub use summary::RunSummary;
