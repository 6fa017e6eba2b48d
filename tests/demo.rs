//! `teamtune demo` end to end on a tiny random Llama (the tiny-llama31 fixture with a toy
//! tokenizer and a chat template) with tiny numbers: every report file is written, the report's
//! score table matches the evaluations, the base model's validation loss is at step 0, one phase
//! re-runs alone from the folder's files, and the same seed gives the same tables.

use std::path::Path;

use crate::util::{run_ok as teamtune, teamtune as command, tiny_model};
use serde_json::Value;

fn demo_args<'a>(model: &'a str, out: &'a str, seed: &'a str) -> Vec<&'a str> {
    vec![
        "demo",
        "--model",
        model,
        "--out",
        out,
        "--seed",
        seed,
        "--budget-minutes",
        "1",
        "--collect-episodes",
        "4",
        "--collect-episodes-single",
        "5",
        "--eval-episodes",
        "1",
        "--unconstrained-episodes",
        "1",
        "--max-new-tokens",
        "12",
        "--unconstrained-max-new-tokens",
        "6",
        "--parallel",
        "7",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--max-len",
        "4096",
        "--task",
        "single_nav,random_points,single_pick",
    ]
}

/// Three of the seven tasks keep the test short (the tiny model's toy tokenizer makes long
/// prompts); the demo's default is all seven.
const TASKS: [&str; 3] = ["single_nav", "random_points", "single_pick"];

/// The report's score table: task -> its cells (base, tuned, change, ...), mean row included.
fn score_rows(report: &str) -> Vec<(String, Vec<String>)> {
    let section = report
        .split("## Scores")
        .nth(1)
        .expect("a Scores section")
        .split("\n## ")
        .next()
        .unwrap();
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect();
    assert!(rows.len() >= 3, "{section}");
    assert_eq!(rows[0][..3], ["task", "base", "tuned"], "{section}");
    rows[2..]
        .iter()
        .map(|r| (r[0].clone(), r[1..].to_vec()))
        .collect()
}

fn eval_scores(dir: &Path) -> Vec<(String, f64)> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["task"].as_str().unwrap().to_owned(),
                t["mean_score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn demo_writes_the_report_and_the_same_seed_gives_the_same_tables() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();
    let a = dir.path().join("a");
    let said = teamtune(&demo_args(model, a.to_str().unwrap(), "5"));
    assert!(said.contains("report:"), "{said}");

    for f in [
        "report.md",
        "plan.json",
        "timings.json",
        "data/episodes.jsonl",
        "data/conversations.jsonl",
        "data/conversations-single.jsonl",
        "eval-base/eval.json",
        "eval-base/episodes.jsonl",
        "eval-base-unconstrained/eval.json",
        "run/metrics.jsonl",
        "run/train.toml",
        "run/adapter/adapter_config.json",
        "run/adapter/adapter_model.safetensors",
        "eval-tuned/eval.json",
        "eval-tuned/episodes.jsonl",
        "loss.png",
        "loss.svg",
        "scores.png",
        "scores.svg",
        "episode.png",
    ] {
        let p = a.join(f);
        assert!(
            p.is_file() && p.metadata().unwrap().len() > 0,
            "{} missing",
            p.display()
        );
    }
    for png in ["loss.png", "scores.png", "episode.png"] {
        let bytes = std::fs::read(a.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }

    // The score table: every task and a mean row, base and tuned as in the eval files.
    let report = std::fs::read_to_string(a.join("report.md")).unwrap();
    let rows = score_rows(&report);
    let names: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    let mut expected: Vec<&str> = TASKS.to_vec();
    expected.push("mean");
    assert_eq!(names, expected, "{report}");
    let base = eval_scores(&a.join("eval-base"));
    let tuned = eval_scores(&a.join("eval-tuned"));
    for (k, (task, cells)) in rows.iter().take(TASKS.len()).enumerate() {
        assert_eq!(base[k].0, *task);
        assert_eq!(cells[0], format!("{:.1}", base[k].1), "{task}");
        assert_eq!(cells[1], format!("{:.1}", tuned[k].1), "{task}");
        let change: f64 = cells[2].parse().unwrap();
        assert!((change - (tuned[k].1 - base[k].1)).abs() < 0.051, "{task}");
        // The study's published columns sit beside ours (base 8B, base 70B, fine-tuned 8B).
        assert_eq!(cells.len(), 3 + 2 + 3, "{cells:?}");
    }
    assert_eq!(rows[0].1[5..], ["80.0", "90.0", "100.0"]);
    // Same base and tuned seeds: the plan evaluates both on the same episodes.
    let seeds = |d: &str| -> Vec<(String, u64)> {
        teamtune_gridworld::read_records(&a.join(d).join("episodes.jsonl"))
            .unwrap()
            .iter()
            .map(|r| (r.task.clone(), r.seed))
            .collect()
    };
    assert_eq!(seeds("eval-base"), seeds("eval-tuned"));
    // The training episodes use other seeds than the evaluation.
    let collected = teamtune_gridworld::read_records(&a.join("data/episodes.jsonl")).unwrap();
    assert!(collected
        .iter()
        .all(|r| r.seed >= 1_000_000 && r.final_score >= 50.0));
    // Single-agent tasks are played --collect-episodes-single times (before pruning), the
    // multi-agent ones --collect-episodes times.
    let played = |task: &str| collected.iter().filter(|r| r.task == task).count();
    assert_eq!(played("single_nav"), 5);
    assert!(played("random_points") <= 4);
    let plan: Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["unconstrained_task"], "single_nav,single_pick");
    let unconstrained = eval_scores(&a.join("eval-base-unconstrained"));
    let tasks: Vec<&str> = unconstrained.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tasks, ["single_nav", "single_pick"]);

    // The base model's validation loss is logged at step 0, before any update, and training
    // lowered it.
    let metrics: Vec<Value> = std::fs::read_to_string(a.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics[0]["step"], 0, "{:?}", metrics[0]);
    let base_loss = metrics[0]["eval_loss"].as_f64().unwrap();
    let evals: Vec<f64> = metrics
        .iter()
        .filter_map(|m| m["eval_loss"].as_f64())
        .collect();
    assert!(evals.len() >= 2, "{evals:?}");
    assert!(
        *evals.last().unwrap() < base_loss,
        "validation loss {evals:?}"
    );
    assert!(report.contains("| validation, step 0 (base model) |"));
    assert!(report.contains(&format!("{base_loss:.4}")), "{report}");
    // The report lists the plain commands of every phase.
    for c in [
        "teamtune collect --policy expert --task random_points --episodes 4",
        "teamtune collect --policy expert --task single_nav,single_pick --episodes 5",
        "teamtune eval --policy model",
        "--unconstrained",
        "teamtune train --model",
        "--max-steps 3",
        "teamtune plot",
        "teamtune compare",
        "--reference study",
        "teamtune replay",
    ] {
        assert!(report.contains(c), "{c} not in the report:\n{report}");
    }

    // One phase alone, from the folder's files: the report again, the same table.
    teamtune(&["demo", "--out", a.to_str().unwrap(), "--only", "report"]);
    let again = std::fs::read_to_string(a.join("report.md")).unwrap();
    assert_eq!(score_rows(&again), rows);
    // A phase whose inputs are missing says which file and which phase to run.
    let empty = dir.path().join("empty");
    let out = command()
        .args([
            "demo",
            "--model",
            model,
            "--out",
            empty.to_str().unwrap(),
            "--only",
            "eval-tuned",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("adapter") && err.contains("--only train"),
        "{err}"
    );

    // The same seed again, into another folder: the same tables.
    let b = dir.path().join("b");
    teamtune(&demo_args(model, b.to_str().unwrap(), "5"));
    let report_b = std::fs::read_to_string(b.join("report.md")).unwrap();
    assert_eq!(score_rows(&report_b), rows);
    assert_eq!(eval_scores(&b.join("eval-base")), base);
    assert_eq!(eval_scores(&b.join("eval-tuned")), tuned);
    let loss_rows = |r: &str| -> Vec<String> {
        r.lines()
            .filter(|l| l.starts_with("| validation") || l.starts_with("| train,"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(loss_rows(&report_b), loss_rows(&report));
    assert_eq!(loss_rows(&report).len(), 4);
}
