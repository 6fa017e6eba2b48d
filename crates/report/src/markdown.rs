//! Evaluations as Markdown tables (what `teamtune demo` writes into its report.md): one row per
//! task and a mean row, one score column per evaluation, the change from the first evaluation
//! to the last, each evaluation's invalid-reply rate, and published reference columns.

use std::fmt::Write as _;

use crate::eval::{mean, EvalResults};
use crate::reference::ReferenceColumn;
use crate::scoreboard::{MEAN_LABEL, MISSING};

/// A Markdown table of `evals` (named by `names`, in order) side by side per task, tasks in
/// the first-seen order over the evaluations; `reference` columns follow. Scores have one
/// decimal; the change column (present with two or more evaluations) is last minus first, with
/// a sign. The mean row averages each column over the tasks it has (each task weighs the same).
pub fn score_table(
    evals: &[&EvalResults],
    names: &[&str],
    reference: &[ReferenceColumn],
) -> String {
    let mut tasks: Vec<&str> = Vec::new();
    for e in evals {
        for t in &e.tasks {
            if !tasks.contains(&t.task.as_str()) {
                tasks.push(&t.task);
            }
        }
    }
    let name = |k: usize| names.get(k).copied().unwrap_or(evals[k].name.as_str());
    let change = evals.len() >= 2;
    let mut header: Vec<String> = vec!["task".into()];
    header.extend((0..evals.len()).map(|k| name(k).to_owned()));
    if change {
        header.push(format!("change ({} - {})", name(evals.len() - 1), name(0)));
    }
    header.extend((0..evals.len()).map(|k| format!("{} invalid %", name(k))));
    header.extend(reference.iter().map(|r| r.name.to_owned()));
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(
        s,
        "|{}",
        header
            .iter()
            .enumerate()
            .map(|(k, _)| if k == 0 { "---|" } else { "---:|" })
            .collect::<String>()
    );
    let fmt = |v: Option<f64>| v.map_or(MISSING.to_owned(), |v| format!("{v:.1}"));
    let signed = |v: Option<f64>| v.map_or(MISSING.to_owned(), |v| format!("{v:+.1}"));
    let row = |label: &str,
               score: &dyn Fn(&EvalResults) -> Option<f64>,
               invalid: &dyn Fn(&EvalResults) -> Option<f64>,
               published: &dyn Fn(&ReferenceColumn) -> Option<f64>| {
        let mut cells: Vec<String> = vec![label.to_owned()];
        let scores: Vec<Option<f64>> = evals.iter().map(|e| score(e)).collect();
        cells.extend(scores.iter().map(|&v| fmt(v)));
        if change {
            let d = match (scores[0], scores[scores.len() - 1]) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            cells.push(signed(d));
        }
        cells.extend(evals.iter().map(|e| fmt(invalid(e).map(|v| 100.0 * v))));
        cells.extend(reference.iter().map(|r| fmt(published(r))));
        format!("| {} |\n", cells.join(" | "))
    };
    for task in &tasks {
        s += &row(
            task,
            &|e| e.task(task).map(|t| t.mean_score),
            &|e| e.task(task).map(|t| t.invalid_reply_rate),
            &|r| r.score(task),
        );
    }
    let over = |e: &EvalResults, f: &dyn Fn(&crate::eval::TaskScore) -> f64| {
        let v: Vec<f64> = tasks.iter().filter_map(|t| e.task(t)).map(f).collect();
        (!v.is_empty()).then(|| mean(v.into_iter()))
    };
    s += &row(
        MEAN_LABEL,
        &|e| over(e, &|t| t.mean_score),
        &|e| over(e, &|t| t.invalid_reply_rate),
        &|r| {
            let v: Vec<f64> = tasks.iter().filter_map(|t| r.score(t)).collect();
            (!v.is_empty()).then(|| mean(v.into_iter()))
        },
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::STUDY;
    use std::path::Path;

    fn eval(name: &str, scores: &[(&str, f64)]) -> EvalResults {
        let tasks: Vec<serde_json::Value> = scores
            .iter()
            .map(|(t, s)| {
                serde_json::json!({"task": t, "episodes": 2, "mean_score": s, "std_score": 0.0,
                    "success_rate": 0.0, "invalid_reply_rate": 0.25})
            })
            .collect();
        let v = serde_json::json!({"format": crate::eval::EVAL_FORMAT, "policy": name,
            "tasks": tasks});
        let mut e = EvalResults::from_value(&v, Path::new("x/eval.json")).unwrap();
        e.name = name.into();
        e
    }

    #[test]
    fn rows_per_task_a_change_column_and_a_mean_row() {
        let base = eval("base", &[("single_nav", 20.0), ("corners", 50.0)]);
        let tuned = eval("tuned", &[("single_nav", 70.0), ("corners", 25.0)]);
        let t = score_table(&[&base, &tuned], &["base", "tuned"], &STUDY);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2 + 2 + 1, "{t}");
        assert!(lines[0].starts_with("| task | base | tuned | change (tuned - base) |"));
        assert!(lines[0].contains("study: base 8B"), "{t}");
        assert_eq!(
            lines[2],
            "| single_nav | 20.0 | 70.0 | +50.0 | 25.0 | 25.0 | 80.0 | 90.0 | 100.0 |"
        );
        assert!(
            lines[3].starts_with("| corners | 50.0 | 25.0 | -25.0 |"),
            "{t}"
        );
        // Mean of the two tasks only, the reference columns too.
        assert_eq!(
            lines[4],
            "| mean | 35.0 | 47.5 | +12.5 | 25.0 | 25.0 | 58.8 | 81.2 | 90.0 |"
        );
    }

    #[test]
    fn a_task_one_evaluation_lacks_is_a_dash() {
        let base = eval("base", &[("single_nav", 20.0)]);
        let tuned = eval("tuned", &[("single_nav", 30.0), ("corners", 25.0)]);
        let t = score_table(&[&base, &tuned], &[], &[]);
        assert!(t.contains("| corners | - | 25.0 | - | - | 25.0 |"), "{t}");
    }
}
