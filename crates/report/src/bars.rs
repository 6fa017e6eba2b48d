//! Grouped bar charts: one group of bars per category (a task), one bar per series (an
//! evaluation or a published column) with an optional error bar, a legend above the plot.
//! Drawn to PNG and SVG with plotters and the bundled font, like the loss figures.

use crate::error::{ReportError, Result};
use crate::font::{ensure_registered, FAMILY};
use crate::output::{write_atomic, FigureFiles};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Figure size in pixels (wider than the loss figures: eight groups of labels).
pub const BAR_SIZE: (u32, u32) = (1200, 600);

/// The colour of error bars.
pub const ERROR_BAR: RGBColor = RGBColor(40, 40, 40);

/// One series: a value (or none: no bar) per category, and optionally a spread drawn as an
/// error bar of ± that much.
#[derive(Debug, Clone, PartialEq)]
pub struct BarSeries {
    pub label: String,
    pub color: RGBColor,
    pub values: Vec<Option<f64>>,
    pub errors: Vec<Option<f64>>,
}

/// A grouped bar chart.
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub categories: Vec<String>,
    pub series: Vec<BarSeries>,
    pub x_desc: String,
    pub y_desc: String,
    /// The value axis; bars and error bars are clipped to it.
    pub y_range: (f64, f64),
    /// Draws a separating line before this category (e.g. a mean group after the tasks).
    pub last_apart: Option<usize>,
}

/// Written where a series has no value for a category.
pub const NO_VALUE: &str = "n/a";

/// The share of a category's width its bars fill together.
const GROUP_WIDTH: f64 = 0.8;

impl BarChart {
    /// The (left, right) x extent of series `s`'s bar in category `c` (categories are centred on
    /// 0, 1, 2, ...).
    pub fn bar_extent(&self, c: usize, s: usize) -> (f64, f64) {
        let k = self.series.len().max(1) as f64;
        let w = GROUP_WIDTH / k;
        let left = c as f64 - GROUP_WIDTH / 2.0 + s as f64 * w;
        (left, left + w)
    }

    /// Writes the chart as PNG and SVG (each atomically).
    pub fn write(&self, files: &FigureFiles) -> Result<()> {
        ensure_registered();
        let err = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |why: String| ReportError::Write {
                path: path.clone(),
                why,
            }
        };
        write_atomic(&files.png, |tmp| {
            self.draw(
                BitMapBackend::new(tmp, BAR_SIZE).into_drawing_area(),
                &err(&files.png),
            )
        })?;
        let mut svg = String::new();
        self.draw(
            SVGBackend::with_string(&mut svg, BAR_SIZE).into_drawing_area(),
            &err(&files.svg),
        )?;
        write_atomic(&files.svg, |tmp| {
            std::fs::write(tmp, svg).map_err(|e| ReportError::Write {
                path: tmp.to_path_buf(),
                why: e.to_string(),
            })
        })
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
        err: &dyn Fn(String) -> ReportError,
    ) -> Result<()> {
        let e = |x: &dyn std::fmt::Debug| err(format!("{x:?}"));
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let body = root.titled(&self.title, (FAMILY, 24)).map_err(|x| e(&x))?;
        let legend_h = self.draw_legend(&body).map_err(|x| e(&x))?;
        let (_, body) = body.split_vertically(legend_h);

        let n = self.categories.len().max(1);
        let (y0, y1) = self.y_range;
        let mut chart = ChartBuilder::on(&body)
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(56)
            .build_cartesian_2d(CategoryAxis(n), y0..y1)
            .map_err(|x| e(&x))?;
        let cats = &self.categories;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(&self.x_desc)
            .y_desc(&self.y_desc)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    cats.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|x| e(&x))?;

        let clip = |v: f64| v.clamp(y0, y1);
        if let Some(last) = self.last_apart {
            // a thin line sets the last group (the mean) apart
            let x = last as f64 - 0.5;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, y0), (x, y1)],
                    RGBColor(180, 180, 180).stroke_width(1),
                )))
                .map_err(|x| e(&x))?;
        }
        for (s, series) in self.series.iter().enumerate() {
            let c = series.color;
            let bars = series.values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)?;
                let (l, r) = self.bar_extent(i, s);
                Some(Rectangle::new([(l, y0), (r, clip(v))], c.filled()))
            });
            chart.draw_series(bars).map_err(|x| e(&x))?;
            // no result: a small "n/a" where the bar would be (a score of 0 draws nothing)
            let style = TextStyle::from((FAMILY, 10).into_font())
                .color(&c)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            let missing = series.values.iter().enumerate().filter_map(|(i, v)| {
                if v.is_some() {
                    return None;
                }
                let (l, r) = self.bar_extent(i, s);
                Some(Text::new(NO_VALUE, ((l + r) / 2.0, y0), style.clone()))
            });
            chart.draw_series(missing).map_err(|x| e(&x))?;
        }
        // error bars over every bar, so that no neighbour's bar hides one
        for (s, series) in self.series.iter().enumerate() {
            for (i, (v, sd)) in series.values.iter().zip(&series.errors).enumerate() {
                let (Some(v), Some(sd)) = (*v, *sd) else {
                    continue;
                };
                if sd <= 0.0 {
                    continue;
                }
                let (l, r) = self.bar_extent(i, s);
                let (mid, cap) = ((l + r) / 2.0, (r - l) / 4.0);
                let (lo, hi) = (clip(v - sd), clip(v + sd));
                let style = ERROR_BAR.stroke_width(1);
                let lines = [
                    vec![(mid, lo), (mid, hi)],
                    vec![(mid - cap, lo), (mid + cap, lo)],
                    vec![(mid - cap, hi), (mid + cap, hi)],
                ];
                chart
                    .draw_series(lines.into_iter().map(|l| PathElement::new(l, style)))
                    .map_err(|x| e(&x))?;
            }
        }
        root.present().map_err(|x| e(&x))?;
        Ok(())
    }

    /// Draws the legend (a swatch and the label per series, wrapped into rows) at the top of
    /// `area`; returns the height it took.
    fn draw_legend<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<u32, DrawingAreaErrorKind<DB::ErrorType>> {
        const SWATCH: i32 = 14;
        const ROW: i32 = 22;
        const GAP: i32 = 24;
        let style =
            TextStyle::from((FAMILY, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        let (width, _) = area.dim_in_pixel();
        let margin = 72;
        let mut entries = Vec::new();
        let (mut x, mut y) = (margin, ROW / 2 + 4);
        for s in &self.series {
            let (tw, _) = area.estimate_text_size(&s.label, &style)?;
            let w = SWATCH + 6 + tw as i32;
            if x > margin && x + w > width as i32 - 16 {
                x = margin;
                y += ROW;
            }
            entries.push((x, y, s));
            x += w + GAP;
        }
        for (x, y, s) in entries {
            area.draw(&Rectangle::new(
                [(x, y - SWATCH / 2), (x + SWATCH, y + SWATCH / 2)],
                s.color.filled(),
            ))?;
            area.draw(&Text::new(
                s.label.clone(),
                (x + SWATCH + 6, y),
                style.clone(),
            ))?;
        }
        Ok((y + ROW / 2 + 4) as u32)
    }
}

/// The category axis: `n` categories centred on 0, 1, ..., one tick (and label) each.
struct CategoryAxis(usize);

impl Ranged for CategoryAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let r = self.range();
        let t = (value - r.start) / (r.end - r.start);
        limit.0 + (t * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            (0..self.0).map(|i| i as f64).collect()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.0 as f64 - 0.5
    }
}
