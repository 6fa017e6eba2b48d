//! A [`PrepareReport`] for people and for programs: the table `teamtune data stats` prints
//! ([`PrepareReport::render`]) and its JSON form ([`PrepareReport::to_json`]).

use std::fmt::Write as _;

use crate::pipeline::{PrepareReport, TaskCounts};
use crate::stats::{Percentiles, TokenStats};

/// The settings a report's conversations were chosen and encoded with, as the user gave them
/// (they are printed in the report's header line).
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSettings {
    /// The minimum score kept, or `none`.
    pub min_score: String,
    /// What happens to conversations without a score (`drop` or `keep`).
    pub missing_score: String,
    /// `conversation` or `task`.
    pub split_by: String,
    /// The tasks held out for validation (with `split_by` = task); empty: `val_fraction`.
    pub val_tasks: Vec<String>,
    pub val_fraction: f64,
    pub seed: u64,
    pub max_len: usize,
    /// What happens to longer conversations (`drop` or `cut`).
    pub overlong: String,
    /// Which tokens carry loss (`assistant`, `last` or `all`).
    pub train_on: String,
}

fn stats_json(s: &TokenStats) -> serde_json::Value {
    serde_json::json!({
        "conversations": s.conversations,
        "tokens": s.tokens,
        "trained_tokens": s.trained_tokens,
        "trained_share": s.trained_share(),
        "cut": s.cut,
        "length": {
            "min": s.lengths.min, "p50": s.lengths.p50, "p90": s.lengths.p90,
            "p95": s.lengths.p95, "p99": s.lengths.p99, "max": s.lengths.max,
        },
    })
}

fn counts_json(c: &TaskCounts) -> serde_json::Value {
    serde_json::json!({
        "read": c.read,
        "kept": c.kept(),
        "pruned_low_score": c.pruned_low_score,
        "pruned_missing_score": c.pruned_missing_score,
        "pruned_task": c.pruned_task,
        "render_failed": c.render_failed,
        "dropped_overlong": c.dropped_overlong,
        "cut": c.cut,
        "special_text": c.special_text,
        "train": c.train,
        "validation": c.validation,
    })
}

impl PrepareReport {
    /// The report as JSON; `source` says where the tokenizer and template came from.
    pub fn to_json(&self, source: &str) -> serde_json::Value {
        let r = self;
        serde_json::json!({
            "source": source,
            "files": r.read.files,
            "lines": r.read.lines,
            "blank_lines": r.read.blank_lines,
            "invalid_skipped": r.read.invalid,
            "invalid_examples": r.read.invalid_examples.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "render_errors": r.render_errors,
            "per_task": r.per_task.iter().map(|(t, c)| (t.clone(), counts_json(c))).collect::<serde_json::Map<_, _>>(),
            "total": counts_json(&r.totals()),
            "train": stats_json(&r.train),
            "validation": stats_json(&r.validation),
        })
    }

    /// The report as text (what `teamtune data stats` prints): what was read, the settings, a
    /// table of counts per task, token statistics of train and validation, and what was dropped
    /// or cut for length. `source` says where the tokenizer and template came from; `elapsed`
    /// is the preparation's wall time in seconds.
    pub fn render(&self, source: &str, settings: &StatsSettings, elapsed: f64) -> String {
        let mut s = String::new();
        self.write_text(&mut s, source, settings, elapsed)
            .expect("writing into a String cannot fail");
        s
    }

    fn write_text(
        &self,
        w: &mut String,
        description: &str,
        args: &StatsSettings,
        elapsed: f64,
    ) -> std::fmt::Result {
        let r = self;
        let t = r.totals();
        writeln!(w, "source: {description}")?;
        writeln!(
            w,
            "read: {} file(s), {} lines ({} blank), {} conversations, {} invalid skipped ({:.2} s)",
            r.read.files.len(),
            r.read.lines,
            r.read.blank_lines,
            r.read.conversations,
            r.read.invalid,
            elapsed
        )?;
        for e in &r.read.invalid_examples {
            writeln!(w, "  skipped {e}")?;
        }
        if r.read.invalid as usize > r.read.invalid_examples.len() {
            writeln!(
                w,
                "  ... and {} more",
                r.read.invalid as usize - r.read.invalid_examples.len()
            )?;
        }
        for e in &r.render_errors {
            writeln!(w, "  not rendered: {e}")?;
        }
        writeln!(
            w,
            "pruning: min score {}, missing score {}; split by {} ({} validation, seed {}); max length {} ({}), train on {}",
            args.min_score,
            args.missing_score,
            args.split_by,
            if args.val_tasks.is_empty() {
                format!("{}", args.val_fraction)
            } else {
                args.val_tasks.join(",")
            },
            args.seed,
            args.max_len,
            args.overlong,
            args.train_on,
        )?;
        writeln!(w)?;
        let width = r
            .per_task
            .keys()
            .map(|k| k.len().max(9))
            .max()
            .unwrap_or(9)
            .max(5);
        writeln!(
            w,
            "{:<width$} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>5}",
            "task",
            "read",
            "kept",
            "low-score",
            "no-score",
            "filtered",
            "failed",
            "too-long",
            "cut",
            "train",
            "val"
        )?;
        let row = |w: &mut String, name: &str, c: &TaskCounts| {
            writeln!(
                w,
                "{:<width$} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>5}",
                name,
                c.read,
                c.kept(),
                c.pruned_low_score,
                c.pruned_missing_score,
                c.pruned_task,
                c.render_failed,
                c.dropped_overlong,
                c.cut,
                c.train,
                c.validation
            )
        };
        for (task, c) in &r.per_task {
            row(w, if task.is_empty() { "(no task)" } else { task }, c)?;
        }
        row(w, "total", &t)?;
        writeln!(w)?;
        writeln!(w, "{:<14} {:>12} {:>12}", "tokens", "train", "validation")?;
        let line = |w: &mut String, name: &str, a: String, b: String| {
            writeln!(w, "{name:<14} {a:>12} {b:>12}")
        };
        let (tr, va) = (&r.train, &r.validation);
        line(
            w,
            "conversations",
            tr.conversations.to_string(),
            va.conversations.to_string(),
        )?;
        line(w, "total", tr.tokens.to_string(), va.tokens.to_string())?;
        line(
            w,
            "trained",
            tr.trained_tokens.to_string(),
            va.trained_tokens.to_string(),
        )?;
        line(
            w,
            "trained share",
            format!("{:.1}%", 100.0 * tr.trained_share()),
            format!("{:.1}%", 100.0 * va.trained_share()),
        )?;
        for (name, f) in [
            (
                "length min",
                (|p: &Percentiles| p.min) as fn(&Percentiles) -> usize,
            ),
            ("length p50", |p| p.p50),
            ("length p90", |p| p.p90),
            ("length p95", |p| p.p95),
            ("length p99", |p| p.p99),
            ("length max", |p| p.max),
        ] {
            line(
                w,
                name,
                f(&tr.lengths).to_string(),
                f(&va.lengths).to_string(),
            )?;
        }
        writeln!(w)?;
        writeln!(
            w,
            "over {} tokens: {} dropped, {} cut at a turn boundary",
            args.max_len, t.dropped_overlong, t.cut
        )?;
        if t.special_text > 0 {
            writeln!(
                w,
                "{} kept conversations quote special-token text (such as <|im_start|>) in a \
                 message; it is tokenised as plain text, not as control tokens",
                t.special_text
            )?;
        }
        if t.read > 0 && t.pruned_missing_score == t.read {
            writeln!(
                w,
                "note: no conversation has a score; --missing-score keep uses them all"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> StatsSettings {
        StatsSettings {
            min_score: "50".into(),
            missing_score: "drop".into(),
            split_by: "conversation".into(),
            val_tasks: Vec::new(),
            val_fraction: 0.1,
            seed: 0,
            max_len: 4096,
            overlong: "drop".into(),
            train_on: "assistant".into(),
        }
    }

    #[test]
    fn render_and_json_show_the_counts() {
        let mut report = PrepareReport::default();
        report.per_task.insert(
            "single_nav".into(),
            TaskCounts {
                read: 3,
                pruned_low_score: 1,
                train: 2,
                ..Default::default()
            },
        );
        let text = report.render("toy", &settings(), 0.5);
        assert!(
            text.starts_with("source: toy\nread: 0 file(s), 0 lines"),
            "{text}"
        );
        assert!(
            text.contains("split by conversation (0.1 validation, seed 0)"),
            "{text}"
        );
        let row = text.lines().find(|l| l.starts_with("single_nav")).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "single_nav",
                "3",
                "2",
                "1",
                "0",
                "0",
                "0",
                "0",
                "0",
                "2",
                "0"
            ]
        );
        assert!(text.lines().any(|l| l.starts_with("total ")), "{text}");
        assert!(
            text.ends_with("over 4096 tokens: 0 dropped, 0 cut at a turn boundary\n"),
            "{text}"
        );
        let json = report.to_json("toy");
        assert_eq!(json["total"]["kept"], 2);
        assert_eq!(json["per_task"]["single_nav"]["pruned_low_score"], 1);

        // Conversations quoting special-token text are counted in a line of their own.
        report.per_task.get_mut("single_nav").unwrap().special_text = 1;
        let text = report.render("toy", &settings(), 0.5);
        assert!(
            text.ends_with(
                "1 kept conversations quote special-token text (such as <|im_start|>) in a \
                 message; it is tokenised as plain text, not as control tokens\n"
            ),
            "{text}"
        );
        assert_eq!(report.to_json("toy")["total"]["special_text"], 1);
    }
}
