//! Loss-curve figures: a [`Chart`] of loss against step, drawn to PNG and SVG with plotters and
//! the bundled font. [`plot_run`] draws one run: train loss, eval loss (markers) and the step-0
//! evaluation (the base model's loss) as a dashed reference line.

use crate::error::{ReportError, Result};
use crate::font::{ensure_registered, FAMILY};
use crate::metrics::RunMetrics;
use crate::output::{write_atomic, FigureFiles};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// Figure size in pixels.
pub const SIZE: (u32, u32) = (1000, 600);

/// The label of the base-model reference line.
pub const BASE_LABEL: &str = "base (step 0)";
/// The same line in a run that trained an existing adapter further: where that adapter started.
pub const START_LABEL: &str = "start adapter (step 0)";

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SeriesKind {
    /// A solid line (train loss).
    Line,
    /// A thin line with a marker at every point (eval loss).
    Markers,
    /// A dashed horizontal line across the chart at this loss, with a marker at step 0
    /// (the base model's loss).
    Base(f64),
}

/// One labelled series of (step, loss) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub kind: SeriesKind,
    pub points: Vec<(f64, f64)>,
}

/// A loss-against-step figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub series: Vec<Series>,
}

/// Colours of the single-run figure (train, eval, base).
const TRAIN: RGBColor = RGBColor(31, 119, 180);
const EVAL: RGBColor = RGBColor(255, 127, 14);
const BASE: RGBColor = RGBColor(90, 90, 90);

/// The series of one run: train loss, eval loss and, when the run evaluated at step 0, the
/// base line. `prefix` goes before each label (`"{prefix}train loss"`).
pub fn run_series(run: &RunMetrics, prefix: &str, colors: [RGBColor; 3]) -> Vec<Series> {
    let mut out = Vec::new();
    if !run.train.is_empty() {
        out.push(Series {
            label: format!("{prefix}train loss"),
            color: colors[0],
            kind: SeriesKind::Line,
            points: run.train.iter().map(|p| (p.step as f64, p.loss)).collect(),
        });
    }
    if !run.eval.is_empty() {
        out.push(Series {
            label: format!("{prefix}eval loss"),
            color: colors[1],
            kind: SeriesKind::Markers,
            points: run
                .eval
                .iter()
                .map(|p| (p.step as f64, p.eval_loss))
                .collect(),
        });
    }
    if let Some(base) = run.base_eval_loss() {
        out.push(Series {
            label: format!(
                "{prefix}{}",
                if run.continued {
                    START_LABEL
                } else {
                    BASE_LABEL
                }
            ),
            color: colors[2],
            kind: SeriesKind::Base(base),
            points: vec![(0.0, base)],
        });
    }
    out
}

/// The figure of one run, titled with its name.
pub fn run_chart(run: &RunMetrics) -> Chart {
    Chart {
        title: run.name.clone(),
        series: run_series(run, "", [TRAIN, EVAL, BASE]),
    }
}

/// Draws one run's loss curves to `PREFIX.png` and `PREFIX.svg`.
pub fn plot_run(run: &RunMetrics, prefix: &Path) -> Result<FigureFiles> {
    let files = FigureFiles::at(prefix);
    run_chart(run).write(&files)?;
    Ok(files)
}

impl Chart {
    /// Writes the chart as PNG and SVG (each atomically).
    pub fn write(&self, files: &FigureFiles) -> Result<()> {
        ensure_registered();
        write_atomic(&files.png, |tmp| {
            let err = draw_err(&files.png);
            self.draw(BitMapBackend::new(tmp, SIZE).into_drawing_area(), &err)
        })?;
        let mut svg = String::new();
        {
            let err = draw_err(&files.svg);
            self.draw(
                SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(),
                &err,
            )?;
        }
        write_atomic(&files.svg, |tmp| {
            std::fs::write(tmp, svg).map_err(|e| ReportError::Write {
                path: tmp.to_path_buf(),
                why: e.to_string(),
            })
        })
    }

    /// The (step, loss) ranges the chart shows, with a margin above and below.
    fn ranges(&self) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let x_max = pts.clone().map(|p| p.0).fold(0.0, f64::max).max(1.0);
        let ys = pts.map(|p| p.1).filter(|y| y.is_finite());
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
            (lo.min(y), hi.max(y))
        });
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let pad = if hi > lo {
            (hi - lo) * 0.06
        } else {
            (hi.abs() * 0.05).max(0.1)
        };
        (0.0..x_max, (lo - pad)..(hi + pad))
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
        err: &dyn Fn(String) -> ReportError,
    ) -> Result<()> {
        let e = |x: &dyn std::fmt::Debug| err(format!("{x:?}"));
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (xr, yr) = self.ranges();
        let x_end = xr.end;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, (FAMILY, 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(xr, yr)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|x| {
                if x.fract() == 0.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.1}")
                }
            })
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|x| e(&x))?;
        for s in &self.series {
            let c = s.color;
            let pts = s.points.clone();
            match s.kind {
                SeriesKind::Line => {
                    chart
                        .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                        .map_err(|x| e(&x))?
                        .label(&s.label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2))
                        });
                }
                SeriesKind::Markers => {
                    chart
                        .draw_series(LineSeries::new(pts.clone(), c.stroke_width(1)))
                        .map_err(|x| e(&x))?;
                    chart
                        .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                        .map_err(|x| e(&x))?
                        .label(&s.label)
                        .legend(move |(x, y)| {
                            EmptyElement::at((x, y))
                                + PathElement::new(vec![(0, 0), (24, 0)], c.stroke_width(1))
                                + Circle::new((12, 0), 4, c.filled())
                        });
                }
                SeriesKind::Base(y) => {
                    chart
                        .draw_series(DashedLineSeries::new(
                            vec![(0.0, y), (x_end, y)],
                            8,
                            6,
                            c.stroke_width(2),
                        ))
                        .map_err(|x| e(&x))?;
                    chart
                        .draw_series(std::iter::once(TriangleMarker::new(
                            (0.0, y),
                            7,
                            c.filled(),
                        )))
                        .map_err(|x| e(&x))?
                        .label(&s.label)
                        .legend(move |(x, y)| {
                            EmptyElement::at((x, y))
                                + PathElement::new(vec![(0, 0), (8, 0)], c.stroke_width(2))
                                + PathElement::new(vec![(14, 0), (22, 0)], c.stroke_width(2))
                        });
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font((FAMILY, 14))
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
        Ok(())
    }
}

/// Turns a drawing error into one that names the file being drawn.
fn draw_err(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |why| ReportError::Write {
        path: path.to_path_buf(),
        why,
    }
}
