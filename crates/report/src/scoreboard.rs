//! Evaluations side by side: one row per task (and a mean row), one column group per
//! evaluation (score ± std, success, invalid replies) and per published reference column
//! (score), as a plain-text table and as a grouped bar chart.

use crate::bars::{BarChart, BarSeries};
use crate::eval::{mean, EvalResults};
use crate::reference::ReferenceColumn;
use plotters::style::RGBColor;
use std::fmt::Write as _;

/// The label of the mean row and of the chart's last group.
pub const MEAN_LABEL: &str = "mean";

/// A missing value (a task a column has no result for).
pub const MISSING: &str = "-";

/// Reference columns are drawn in greys, darkest last.
pub const REFERENCE_COLORS: [RGBColor; 4] = [
    RGBColor(190, 190, 190),
    RGBColor(140, 140, 140),
    RGBColor(95, 95, 95),
    RGBColor(60, 60, 60),
];

/// One task's numbers in one column; a published column only has the score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    pub score: f64,
    pub std: Option<f64>,
    /// Share 0..1.
    pub success: Option<f64>,
    /// Share 0..1.
    pub invalid: Option<f64>,
}

/// One column group: an evaluation or a published reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub color: RGBColor,
    /// Published numbers (score only) rather than an evaluation of ours.
    pub published: bool,
    /// One per task of the scoreboard, `None` where the column has no result.
    pub cells: Vec<Option<Cell>>,
    /// Policy and file of an evaluation, for the notes under the table.
    pub source: Option<String>,
}

impl Column {
    /// The mean row: each number averaged over the tasks this column has (each task weighs
    /// the same); `None` when it has none.
    pub fn mean(&self) -> Option<Cell> {
        let present: Vec<&Cell> = self.cells.iter().flatten().collect();
        if present.is_empty() {
            return None;
        }
        let avg = |f: &dyn Fn(&Cell) -> Option<f64>| {
            let v: Vec<f64> = present.iter().filter_map(|c| f(c)).collect();
            (v.len() == present.len()).then(|| mean(v.into_iter()))
        };
        Some(Cell {
            score: mean(present.iter().map(|c| c.score)),
            std: None,
            success: avg(&|c| c.success),
            invalid: avg(&|c| c.invalid),
        })
    }

    /// How many tasks this column has a result for.
    pub fn present(&self) -> usize {
        self.cells.iter().flatten().count()
    }
}

/// Tasks (rows) and columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Scoreboard {
    pub tasks: Vec<String>,
    pub columns: Vec<Column>,
}

impl Scoreboard {
    /// Rows: the tasks in the order of the first evaluation, then tasks only later evaluations
    /// have, then tasks only the reference has. Columns: the evaluations in order (colours from
    /// `palette`), then the reference columns.
    pub fn new(
        evals: &[&EvalResults],
        references: &[ReferenceColumn],
        palette: &[RGBColor],
    ) -> Self {
        let mut tasks: Vec<String> = Vec::new();
        let mut add = |t: &str| {
            if !tasks.iter().any(|x| x == t) {
                tasks.push(t.to_string());
            }
        };
        for e in evals {
            e.tasks.iter().for_each(|t| add(&t.task));
        }
        for r in references {
            r.scores.iter().for_each(|(t, _)| add(t));
        }
        let mut columns: Vec<Column> = evals
            .iter()
            .enumerate()
            .map(|(i, e)| Column {
                name: e.name.clone(),
                color: palette[i % palette.len()],
                published: false,
                cells: tasks
                    .iter()
                    .map(|t| {
                        e.task(t).map(|r| Cell {
                            score: r.mean_score,
                            std: Some(r.std_score),
                            success: Some(r.success_rate),
                            invalid: Some(r.invalid_reply_rate),
                        })
                    })
                    .collect(),
                source: Some(format!("{} ({})", e.policy, e.path.display())),
            })
            .collect();
        columns.extend(references.iter().enumerate().map(|(j, r)| {
            Column {
                name: r.name.to_string(),
                color: REFERENCE_COLORS[j % REFERENCE_COLORS.len()],
                published: true,
                cells: tasks
                    .iter()
                    .map(|t| {
                        r.score(t).map(|score| Cell {
                            score,
                            std: None,
                            success: None,
                            invalid: None,
                        })
                    })
                    .collect(),
                source: None,
            }
        }));
        Scoreboard { tasks, columns }
    }

    /// The table: a header of column-group names and their sub-columns, a row per task and the
    /// mean row, groups separated by `|`, [`MISSING`] where a column has no result; notes
    /// follow.
    pub fn table(&self) -> String {
        // each group: its sub-column headings and, per row (tasks then mean), its cells
        struct Group {
            name: String,
            heads: Vec<&'static str>,
            rows: Vec<Vec<String>>,
        }
        let ntask = self.tasks.len();
        let mut any_partial = false;
        let groups: Vec<Group> = self
            .columns
            .iter()
            .map(|col| {
                let mean = col.mean();
                let partial = col.present() < ntask;
                any_partial |= partial && mean.is_some();
                let mut rows: Vec<(Option<Cell>, bool)> =
                    col.cells.iter().map(|c| (*c, false)).collect();
                rows.push((mean, true));
                // score: mean right-aligned, then " ± std" left-aligned, so means line up
                let means: Vec<String> = rows
                    .iter()
                    .map(|(c, _)| c.map_or(MISSING.to_string(), |c| format!("{:.1}", c.score)))
                    .collect();
                // after the mean: " ± std", or "*" on a mean over fewer tasks than the rows
                let stds: Vec<String> = rows
                    .iter()
                    .map(|(c, is_mean)| match c {
                        Some(_) if *is_mean && partial => "*".to_string(),
                        Some(c) => c.std.map_or(String::new(), |s| format!(" ± {s:.1}")),
                        None => String::new(),
                    })
                    .collect();
                let (wm, ws) = (width(&means), width(&stds));
                let score: Vec<String> = means
                    .iter()
                    .zip(&stds)
                    .map(|(m, s)| format!("{m:>wm$}{s:<ws$}"))
                    .collect();
                let pct = |v: Option<f64>, p: usize| {
                    v.map_or(MISSING.to_string(), |v| format!("{:.p$}%", 100.0 * v))
                };
                if col.published {
                    Group {
                        name: col.name.clone(),
                        heads: vec!["score"],
                        rows: score.into_iter().map(|s| vec![s]).collect(),
                    }
                } else {
                    Group {
                        name: col.name.clone(),
                        heads: vec!["score ± std", "success", "invalid"],
                        rows: score
                            .into_iter()
                            .zip(&rows)
                            .map(|(s, (c, _))| {
                                vec![
                                    s,
                                    pct(c.and_then(|c| c.success), 0),
                                    pct(c.and_then(|c| c.invalid), 1),
                                ]
                            })
                            .collect(),
                    }
                }
            })
            .collect();

        let labels: Vec<String> = self
            .tasks
            .iter()
            .cloned()
            .chain([MEAN_LABEL.to_string()])
            .collect();
        let w0 = width(&labels).max("task".len());
        // per group: sub-column widths, then the group's width (at least its name's)
        let layout: Vec<(Vec<usize>, usize)> = groups
            .iter()
            .map(|g| {
                let subs: Vec<usize> = (0..g.heads.len())
                    .map(|k| {
                        g.rows
                            .iter()
                            .map(|r| r[k].chars().count())
                            .chain([g.heads[k].chars().count()])
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                let content = subs.iter().sum::<usize>() + 2 * (subs.len() - 1);
                (subs, content.max(g.name.chars().count()))
            })
            .collect();
        let line = |first: &str, cells: &dyn Fn(usize) -> String| {
            let mut s = format!("{first:<w0$}");
            for (gi, (_, gw)) in layout.iter().enumerate() {
                let _ = write!(s, " | {:>gw$}", cells(gi));
            }
            s.trim_end().to_string() + "\n"
        };
        let sub_line = |gi: usize, cells: &[String]| {
            let (subs, _) = &layout[gi];
            let parts: Vec<String> = cells
                .iter()
                .zip(subs)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect();
            parts.join("  ")
        };
        let rule = {
            let mut s = "-".repeat(w0);
            for (_, gw) in &layout {
                s += "-+-";
                s += &"-".repeat(*gw);
            }
            s + "\n"
        };

        let mut out = String::new();
        out += &line("", &|gi| {
            let gw = layout[gi].1;
            format!("{:<gw$}", groups[gi].name)
        });
        out += &line("task", &|gi| {
            let heads: Vec<String> = groups[gi].heads.iter().map(|h| h.to_string()).collect();
            sub_line(gi, &heads)
        });
        out += &rule;
        for (r, label) in labels.iter().enumerate() {
            if r == ntask {
                out += &rule;
            }
            out += &line(label, &|gi| sub_line(gi, &groups[gi].rows[r]));
        }
        out +=
            "\nscore: mean final score (0-100) ± sample std over the episodes; success: episodes \
                that reached 100; invalid: share of turns whose reply the world could not use\n";
        out += "mean: each column's mean over its tasks (each task weighs the same)";
        if any_partial {
            out += "; * = over fewer tasks than the table has";
        }
        out += "\n";
        for c in &self.columns {
            if let Some(src) = &c.source {
                let _ = writeln!(out, "{}: {src}", c.name);
            }
        }
        if self.columns.iter().any(|c| c.published) {
            out += "study: the study's published scores (mean of 10 runs; the mean row computed here), GRIDWORLD.md \
                    \"Results to reproduce\"\n";
        }
        out
    }

    /// The grouped bar chart: a group per task and one for the mean, a bar per column, error
    /// bars of ± std where an evaluation has it.
    pub fn bar_chart(&self) -> BarChart {
        let names: Vec<&str> = self
            .columns
            .iter()
            .filter(|c| !c.published)
            .map(|c| c.name.as_str())
            .collect();
        let mut title = format!("score by task: {}", names.join(" vs "));
        if self.columns.iter().any(|c| c.published) {
            title += " (grey: the study's published scores)";
        }
        BarChart {
            title,
            categories: self
                .tasks
                .iter()
                .cloned()
                .chain([MEAN_LABEL.to_string()])
                .collect(),
            series: self
                .columns
                .iter()
                .map(|c| {
                    let mean = c.mean();
                    BarSeries {
                        label: c.name.clone(),
                        color: c.color,
                        values: c
                            .cells
                            .iter()
                            .chain([&mean])
                            .map(|x| x.map(|x| x.score))
                            .collect(),
                        errors: c
                            .cells
                            .iter()
                            .chain([&mean])
                            .map(|x| x.and_then(|x| x.std))
                            .collect(),
                    }
                })
                .collect(),
            x_desc: "task".into(),
            y_desc: "score".into(),
            y_range: (0.0, 100.0),
            last_apart: Some(self.tasks.len()),
        }
    }
}

fn width(v: &[String]) -> usize {
    v.iter().map(|s| s.chars().count()).max().unwrap_or(0)
}
