//! `teamtune plot` and `teamtune compare` on two synthetic runs and on two synthetic
//! evaluations (no model involved).

use crate::util::{output_ok, run_ok, teamtune};
use std::path::{Path, PathBuf};

/// A run folder whose metrics.jsonl has a step-0 eval (base), `steps` train steps and an eval
/// every 5 steps; losses fall from `start`.
fn write_run(dir: &Path, name: &str, steps: u64, start: f64) -> (PathBuf, Vec<f64>, Vec<f64>) {
    let run = dir.join(name);
    std::fs::create_dir_all(&run).unwrap();
    let (mut train, mut eval) = (Vec::new(), vec![start + 0.5]);
    let mut text = format!("{{\"step\":0,\"epoch\":0.0,\"eval_loss\":{}}}\n", eval[0]);
    for s in 1..=steps {
        let loss = start / (1.0 + s as f64 * 0.1);
        train.push(loss);
        text += &format!(
            "{{\"step\":{s},\"epoch\":0.1,\"loss\":{loss},\"lr\":1e-4,\"grad_norm\":0.2,\"trained_tokens\":100,\"tokens_per_s\":{}}}\n",
            200.0 + s as f64
        );
        if s % 5 == 0 {
            let e = start / (1.0 + s as f64 * 0.05) + 0.3;
            eval.push(e);
            text += &format!("{{\"step\":{s},\"epoch\":0.1,\"eval_loss\":{e}}}\n");
        }
    }
    std::fs::write(run.join("metrics.jsonl"), text).unwrap();
    (run, train, eval)
}

/// `prefix`.png is a PNG and `prefix`.svg an SVG with these texts.
fn assert_figure(prefix: &Path, texts: &[&str]) {
    let (png, svg) = (prefix.with_extension("png"), prefix.with_extension("svg"));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", png.display());
    assert!(bytes.len() > 5000, "a tiny PNG: {} bytes", bytes.len());
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for t in texts {
        assert!(svg.contains(t), "no `{t}` in the SVG");
    }
}

/// `teamtune compare ARGS` fails, saying the text given, for each case.
fn assert_compare_refuses(cases: &[(Vec<&str>, &str)]) {
    for (args, want) in cases {
        let out = teamtune().arg("compare").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn plot_writes_loss_figures_into_the_run_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let (run, _, _) = write_run(dir.path(), "lora-r8", 20, 2.0);
    let out = run_ok(&["plot", run.to_str().unwrap()]);
    let (png, svg) = (run.join("loss.png"), run.join("loss.svg"));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [png.to_str().unwrap(), svg.to_str().unwrap()]
    );
    assert_figure(
        &run.join("loss"),
        &["lora-r8", "train loss", "eval loss", "base (step 0)"],
    );

    let prefix = dir.path().join("figs/custom");
    let out = run_ok(&[
        "plot",
        run.join("metrics.jsonl").to_str().unwrap(),
        "--out",
        prefix.to_str().unwrap(),
    ]);
    assert!(
        out.contains("figs/custom.png") && out.contains("figs/custom.svg"),
        "{out}"
    );
    assert_figure(&prefix, &["lora-r8"]);
}

#[test]
fn compare_prints_the_table_and_writes_one_figure() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ta, ea) = write_run(dir.path(), "a", 30, 2.0);
    let (b, tb, eb) = write_run(dir.path(), "b", 20, 3.0);
    // default output: compare.png/.svg in the current folder
    let out = output_ok(
        teamtune()
            .current_dir(dir.path())
            .args(["compare", a.to_str().unwrap(), b.to_str().unwrap()])
            .args(["--names", "small,big"]),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("run "), "{stdout}");
    assert!(stdout.contains("final train loss") && stdout.contains("last vs base"));
    assert!(
        !stdout.contains("peak memory"),
        "no run logged memory: {stdout}"
    );
    for (name, steps, train, eval) in [("small", 30, &ta, &ea), ("big", 20, &tb, &eb)] {
        let row: Vec<&str> = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name}: {stdout}"))
            .split_whitespace()
            .collect();
        let k = train.len().div_ceil(10);
        let fin = train[train.len() - k..].iter().sum::<f64>() / k as f64;
        let (base, last) = (eval[0], *eval.last().unwrap());
        let best = eval[1..].iter().cloned().fold(f64::INFINITY, f64::min);
        let tps = (1..=steps).map(|s| 200.0 + s as f64).sum::<f64>() / steps as f64;
        assert_eq!(row[1], steps.to_string());
        assert_eq!(row[2], format!("{fin:.4}"));
        assert_eq!(row[3], format!("{base:.4}"));
        assert_eq!(row[4], format!("{last:.4}"));
        assert_eq!(row[5], format!("{best:.4}"));
        assert_eq!(row[6], format!("{:+.2}%", (last - base) / base * 100.0));
        assert_eq!(row[7], format!("{tps:.1}"));
    }
    assert!(stdout.contains("compare.png") && stdout.contains("compare.svg"));
    assert_figure(
        &dir.path().join("compare"),
        &[
            "small vs big",
            "small: train loss",
            "big: eval loss",
            "big: base (step 0)",
        ],
    );

    // --out, and inputs given as metrics files
    let prefix = dir.path().join("cmp/ab");
    run_ok(&[
        "compare",
        a.join("metrics.jsonl").to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        prefix.to_str().unwrap(),
    ]);
    assert_figure(&prefix, &["a vs b"]);
}

#[test]
fn compare_refuses_what_it_cannot_compare() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _, _) = write_run(dir.path(), "a", 10, 2.0);
    let other = dir.path().join("results.json");
    std::fs::write(&other, "{}").unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"step\":0,\"eval_loss\":1}\n{\"loss\":1}\n").unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![a.to_str().unwrap(), other.to_str().unwrap()],
            "results.json",
        ),
        (
            vec![a.to_str().unwrap(), bad.to_str().unwrap()],
            "bad.jsonl:2: missing field `step`",
        ),
        (
            vec![a.to_str().unwrap(), a.to_str().unwrap(), "--names", "x"],
            "1 names given for 2 inputs",
        ),
        (vec![a.to_str().unwrap()], "required"),
    ];
    assert_compare_refuses(&cases);
}

const TASKS: [&str; 7] = [
    "single_nav",
    "corners",
    "alphabetical",
    "random_points",
    "single_pick",
    "multi_pick",
    "permission_pick",
];

/// An eval folder as `teamtune eval --out` writes it: per task (name, mean, std, success,
/// invalid).
fn write_eval(dir: &Path, name: &str, tasks: &[(&str, f64, f64, f64, f64)]) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let rows: Vec<String> = tasks
        .iter()
        .map(|(t, m, s, ok, inv)| {
            format!(
                "{{\"task\":\"{t}\",\"episodes\":5,\"mean_score\":{m},\"std_score\":{s},\"min_score\":0.0,\
                 \"max_score\":100.0,\"success_rate\":{ok},\"invalid_reply_rate\":{inv},\"turns\":50,\
                 \"avg_turns\":10.0,\"generated_tokens\":1610,\"seconds\":29.4}}"
            )
        })
        .collect();
    std::fs::write(
        out.join("eval.json"),
        format!(
            "{{\"format\":\"teamtune-eval/1\",\"policy\":\"model:{name}\",\"settings\":{{\"seed\":0}},\
             \"tasks\":[{}],\"mean_score\":0.0,\"invalid_reply_rate\":0.0,\"wall_seconds\":812.0}}",
            rows.join(",")
        ),
    )
    .unwrap();
    std::fs::write(out.join("episodes.jsonl"), "").unwrap();
    out
}

/// The stdout table's row `label` as column groups of whitespace tokens.
fn eval_row(table: &str, label: &str) -> Vec<Vec<String>> {
    let line = table
        .lines()
        .find(|l| l.contains('|') && l.split('|').next().unwrap().trim() == label)
        .unwrap_or_else(|| panic!("no row {label} in\n{table}"));
    line.split('|')
        .skip(1)
        .map(|g| g.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn compare_evals_with_the_study_reference() {
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<_> = TASKS
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, 10.0 * i as f64, 5.0 + i as f64, 0.2, 0.05))
        .collect();
    // the tuned eval skipped multi_pick
    let tuned: Vec<_> = TASKS
        .iter()
        .enumerate()
        .filter(|(_, t)| **t != "multi_pick")
        .map(|(i, t)| (*t, 95.0 - 5.0 * i as f64, 2.0, 0.8, 0.0))
        .collect();
    let a = write_eval(dir.path(), "base-135m", &base);
    let b = write_eval(dir.path(), "tuned-135m", &tuned);
    let prefix = dir.path().join("figs/evals");
    let out = run_ok(&[
        "compare",
        a.to_str().unwrap(),
        b.join("eval.json").to_str().unwrap(),
        "--reference",
        "study",
        "--out",
        prefix.to_str().unwrap(),
    ]);
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap()
        .split('|')
        .skip(1)
        .map(str::trim)
        .collect();
    assert_eq!(
        header,
        [
            "base-135m",
            "tuned-135m",
            "study: base 8B",
            "study: base 70B",
            "study: fine-tuned 8B"
        ],
        "{out}"
    );
    for (i, task) in TASKS.iter().enumerate() {
        let r = eval_row(&out, task);
        let (_, m, s, ok, inv) = base[i];
        assert_eq!(
            r[0],
            [
                format!("{m:.1}"),
                "±".into(),
                format!("{s:.1}"),
                format!("{:.0}%", ok * 100.0),
                format!("{:.1}%", inv * 100.0)
            ],
            "{out}"
        );
        if *task == "multi_pick" {
            assert_eq!(r[1], ["-", "-", "-"], "{out}");
        } else {
            assert_eq!(r[1][0], format!("{:.1}", 95.0 - 5.0 * i as f64), "{out}");
        }
    }
    // the study's numbers (GRIDWORLD.md, "Results to reproduce")
    assert_eq!(
        eval_row(&out, "single_nav")[2..],
        [["80.0"], ["90.0"], ["100.0"]]
    );
    assert_eq!(
        eval_row(&out, "multi_pick")[2..],
        [["2.5"], ["81.7"], ["55.6"]]
    );
    assert_eq!(
        eval_row(&out, "permission_pick")[2..],
        [["3.3"], ["75.0"], ["10.0"]]
    );
    // mean row: the mean of the task means
    let mean = eval_row(&out, "mean");
    assert_eq!(mean[0][0], "30.0", "{out}");
    let tuned_mean = tuned.iter().map(|t| t.1).sum::<f64>() / 6.0;
    assert_eq!(mean[1][0], format!("{tuned_mean:.1}*"), "{out}");
    assert!(
        out.contains("evals.png") && out.contains("evals.svg"),
        "{out}"
    );
    assert_figure(
        &prefix,
        &[
            "base-135m",
            "tuned-135m",
            "study: fine-tuned 8B",
            "permission_pick",
            "mean",
        ],
    );

    // one evaluation against the study, named by --names
    let out = output_ok(
        teamtune()
            .current_dir(dir.path())
            .args(["compare", a.to_str().unwrap(), "--reference", "study"])
            .args(["--names", "smol"]),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.lines().next().unwrap().contains("smol"), "{stdout}");
    assert!(dir.path().join("compare.png").is_file());
}

#[test]
fn compare_refuses_mixed_inputs_and_misplaced_references() {
    let dir = tempfile::tempdir().unwrap();
    let (run, _, _) = write_run(dir.path(), "run", 10, 2.0);
    let eval = write_eval(dir.path(), "eval", &[("corners", 50.0, 1.0, 0.5, 0.0)]);
    let wrong = dir.path().join("old.json");
    std::fs::write(&wrong, "{\"format\":\"teamtune-eval/0\",\"tasks\":[]}").unwrap();
    let cases: [(Vec<&str>, &str); 5] = [
        (
            vec![run.to_str().unwrap(), eval.to_str().unwrap()],
            "cannot compare training runs with evaluation results",
        ),
        (
            vec![
                run.to_str().unwrap(),
                run.to_str().unwrap(),
                "--reference",
                "study",
            ],
            "training runs",
        ),
        (
            vec![eval.to_str().unwrap(), "--reference", "paper"],
            "study",
        ),
        (
            vec![eval.to_str().unwrap(), wrong.to_str().unwrap()],
            "old.json: format `teamtune-eval/0` is not supported",
        ),
        (vec![eval.to_str().unwrap()], "required"),
    ];
    assert_compare_refuses(&cases);
}
