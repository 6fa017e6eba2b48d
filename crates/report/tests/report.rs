//! The report crate end to end on synthetic metrics: figures that decode and carry their labels,
//! table numbers recomputed here from the input, and errors that name file and line.

use std::path::{Path, PathBuf};
use teamtune_report::{
    detect, plot_run, Comparable, Comparison, ReportError, RunMetrics, BASE_LABEL,
};

/// A synthetic run: train loss per step, eval losses at some steps (step 0 = base).
struct Synth {
    train: Vec<(u64, f64, f64, Option<f64>)>, // step, loss, tokens/s, peak MB
    eval: Vec<(u64, f64)>,
}

fn synth(steps: u64, start: f64, speed: f64, memory: bool) -> Synth {
    let train = (1..=steps)
        .map(|s| {
            let loss = start * (-(s as f64) / 15.0).exp() + 0.4 + 0.03 * ((s * 7 % 5) as f64);
            let mem = memory.then_some(500.0 + (s % 9) as f64 * 3.5);
            (s, loss, speed + (s % 4) as f64, mem)
        })
        .collect();
    let eval = (0..=steps)
        .step_by(10)
        .map(|s| (s, start * 1.1 * (-(s as f64) / 20.0).exp() + 0.6))
        .collect();
    Synth { train, eval }
}

/// Writes `dir/name/metrics.jsonl` the way the trainer does (eval after the step's record).
fn write_run(dir: &Path, name: &str, s: &Synth) -> PathBuf {
    let run = dir.join(name);
    std::fs::create_dir_all(run.join("adapter")).unwrap();
    let mut text = String::new();
    for &(step, l) in s.eval.iter().filter(|e| e.0 == 0) {
        text += &format!("{{\"step\":{step},\"epoch\":0.0,\"eval_loss\":{l}}}\n");
    }
    for &(step, loss, tps, mem) in &s.train {
        let mem = mem.map_or(String::new(), |m| format!(",\"peak_memory_mb\":{m}"));
        text += &format!(
            "{{\"step\":{step},\"epoch\":{:.3},\"loss\":{loss},\"lr\":5e-5,\"grad_norm\":0.25,\"trained_tokens\":640,\"tokens_per_s\":{tps}{mem}}}\n",
            step as f64 / 10.0
        );
        for &(es, l) in s.eval.iter().filter(|e| e.0 == step) {
            text += &format!("{{\"step\":{es},\"epoch\":1.0,\"eval_loss\":{l}}}\n");
        }
    }
    std::fs::write(run.join("metrics.jsonl"), text).unwrap();
    run
}

fn assert_png(path: &Path, colors: &[[u8; 3]]) {
    let img = image::open(path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1000, 600));
    let first = *img.get_pixel(0, 0);
    assert!(img.pixels().any(|p| *p != first), "a flat image");
    for c in colors {
        let n = img.pixels().filter(|p| p.0 == *c).count();
        assert!(n > 50, "colour {c:?} drawn on {n} pixels only");
    }
}

/// All the text an SVG shows (after checking that it is well-formed XML with an `svg` root).
fn svg_texts(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| {
            let t: String = n
                .descendants()
                .filter(|t| t.is_text())
                .filter_map(|t| t.text())
                .collect();
            t.trim().to_string()
        })
        .collect()
}

#[test]
fn plot_writes_png_and_svg_with_curves_legend_and_title() {
    let dir = tempfile::tempdir().unwrap();
    let run = write_run(dir.path(), "run-alpha", &synth(40, 2.0, 100.0, false));
    let metrics = RunMetrics::read(&run).unwrap();
    assert_eq!(metrics.name, "run-alpha");
    assert_eq!((metrics.train.len(), metrics.eval.len()), (40, 5));
    let files = plot_run(&metrics, &run.join("loss")).unwrap();
    assert_eq!(files.png, run.join("loss.png"));
    assert_eq!(files.svg, run.join("loss.svg"));
    // train blue, eval orange, base grey: each really drawn
    assert_png(&files.png, &[[31, 119, 180], [255, 127, 14], [90, 90, 90]]);
    let texts = svg_texts(&files.svg);
    for want in [
        "run-alpha",
        "train loss",
        "eval loss",
        BASE_LABEL,
        "step",
        "loss",
    ] {
        assert!(texts.iter().any(|t| t == want), "no `{want}` in {texts:?}");
    }
    // no temporary files left beside them
    let mut names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter", "loss.png", "loss.svg", "metrics.jsonl"]);
}

#[test]
fn base_line_is_dashed_across_the_chart() {
    let dir = tempfile::tempdir().unwrap();
    let run = write_run(dir.path(), "r", &synth(30, 1.0, 50.0, false));
    let files = plot_run(&RunMetrics::read(&run).unwrap(), &dir.path().join("x")).unwrap();
    let svg = std::fs::read_to_string(&files.svg).unwrap();
    // the dashes are separate segments in the base colour
    let dashes = svg.matches("stroke=\"#5A5A5A\"").count();
    assert!(dashes > 20, "{dashes} base-colour strokes");
}

#[test]
fn a_run_without_evaluations_plots_without_base_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = synth(12, 1.0, 50.0, false);
    s.eval.clear();
    let run = write_run(dir.path(), "noeval", &s);
    let files = plot_run(&RunMetrics::read(&run).unwrap(), &run.join("loss")).unwrap();
    let texts = svg_texts(&files.svg);
    assert!(texts.iter().any(|t| t == "train loss"));
    assert!(!texts.iter().any(|t| t == BASE_LABEL || t == "eval loss"));
    assert_png(&files.png, &[[31, 119, 180]]);
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The table's row for `name`, split on whitespace (names and values have no spaces).
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"));
    line.split_whitespace().collect()
}

fn close(cell: &str, want: f64, decimals: i32) {
    let got: f64 = cell.trim_end_matches('%').parse().unwrap();
    let tol = 0.5 * 10f64.powi(-decimals) + 1e-9;
    assert!((got - want).abs() <= tol, "{cell} vs {want}");
}

#[test]
fn table_numbers_equal_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let a = synth(40, 2.0, 100.0, false);
    let b = synth(25, 1.5, 300.0, true);
    let ra = write_run(dir.path(), "alpha", &a);
    let rb = write_run(dir.path(), "beta", &b);
    let cmp = Comparison::detect_all(&[ra, rb.join("metrics.jsonl")]).unwrap();
    let table = cmp.table();
    let header = table.lines().next().unwrap();
    for col in [
        "run",
        "steps",
        "final train loss",
        "base eval (step 0)",
        "last vs base",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        header.contains("peak memory MB"),
        "beta logged memory: {header}"
    );
    for (name, s) in [("alpha", &a), ("beta", &b)] {
        let r = row(&table, name);
        assert_eq!(r.len(), 9, "{r:?}");
        let losses: Vec<f64> = s.train.iter().map(|t| t.1).collect();
        let k = losses.len().div_ceil(10); // ceil(10%)
        let final_loss = mean(&losses[losses.len() - k..]);
        let base = s.eval[0].1;
        let after: Vec<f64> = s.eval[1..].iter().map(|e| e.1).collect();
        let last = *after.last().unwrap();
        let best = after.iter().cloned().fold(f64::INFINITY, f64::min);
        let tps = mean(&s.train.iter().map(|t| t.2).collect::<Vec<_>>());
        assert_eq!(r[1], s.train.last().unwrap().0.to_string());
        close(r[2], final_loss, 4);
        close(r[3], base, 4);
        close(r[4], last, 4);
        close(r[5], best, 4);
        close(r[6], (last - base) / base * 100.0, 2);
        close(r[7], tps, 1);
        match s.train[0].3 {
            Some(_) => {
                let peak = s.train.iter().filter_map(|t| t.3).fold(0.0, f64::max);
                close(r[8], peak, 1);
            }
            None => assert_eq!(r[8], "-"),
        }
    }
}

#[test]
fn table_has_no_memory_column_when_no_run_logged_it() {
    let dir = tempfile::tempdir().unwrap();
    let ra = write_run(dir.path(), "a", &synth(10, 1.0, 10.0, false));
    let rb = write_run(dir.path(), "b", &synth(20, 1.0, 10.0, false));
    let table = Comparison::detect_all(&[ra, rb]).unwrap().table();
    assert!(!table.contains("peak memory"), "{table}");
    assert_eq!(row(&table, "a").len(), 8);
}

#[test]
fn comparison_figure_has_every_run_and_its_base_line() {
    let dir = tempfile::tempdir().unwrap();
    let ra = write_run(dir.path(), "one", &synth(30, 2.0, 100.0, false));
    let rb = write_run(dir.path(), "two", &synth(30, 1.0, 100.0, false));
    let mut cmp = Comparison::detect_all(&[ra, rb]).unwrap();
    cmp.rename(&["first".into(), "second".into()]).unwrap();
    let files = cmp.write_figure(&dir.path().join("out/cmp")).unwrap();
    assert_png(&files.png, &[[31, 119, 180], [214, 39, 40]]);
    let texts = svg_texts(&files.svg);
    for want in [
        "first vs second",
        "first: train loss",
        "first: eval loss",
        "second: train loss",
        "second: base (step 0)",
    ] {
        assert!(texts.iter().any(|t| t == want), "no `{want}` in {texts:?}");
    }
    let err = cmp.rename(&["x".into()]).unwrap_err();
    assert!(matches!(
        err,
        ReportError::NameCount {
            names: 1,
            inputs: 2
        }
    ));
}

#[test]
fn same_named_runs_are_told_apart_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let ra = write_run(&dir.path().join("x"), "run", &synth(10, 1.0, 10.0, false));
    let rb = write_run(&dir.path().join("y"), "run", &synth(10, 1.0, 10.0, false));
    let cmp = Comparison::detect_all(&[ra.clone(), rb.clone()]).unwrap();
    let names: Vec<&str> = cmp.items.iter().map(Comparable::name).collect();
    assert_eq!(names, [ra.to_str().unwrap(), rb.to_str().unwrap()]);
}

#[test]
fn detect_knows_what_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let run = write_run(dir.path(), "myrun", &synth(10, 1.0, 10.0, false));
    let Comparable::Run(r) = detect(&run).unwrap() else {
        panic!("not a run")
    };
    assert_eq!(r.name, "myrun");
    let Comparable::Run(r) = detect(&run.join("metrics.jsonl")).unwrap() else {
        panic!("not a run")
    };
    assert_eq!((r.name.as_str(), r.train.len()), ("myrun", 10));

    let not = |p: &Path, why: &str| {
        let err = detect(p).unwrap_err();
        assert!(matches!(err, ReportError::NotComparable { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains(why),
            "{msg}"
        );
    };
    not(&run.join("adapter"), "without metrics.jsonl");
    let json = dir.path().join("eval.json");
    std::fs::write(&json, "{}").unwrap();
    not(&json, "evaluation results");
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    not(&txt, "not a run folder");
    not(&dir.path().join("missing"), "no such file");
}

#[test]
fn malformed_metrics_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = "{\"step\":0,\"epoch\":0.0,\"eval_loss\":2.0}\n{\"step\":1,\"loss\":1.9}\n";
    let cases: [(&str, String, Option<usize>, &str); 9] = [
        (
            "json",
            format!("{good}{{\"step\":2,\"loss\":1.8\n"),
            Some(3),
            "not valid JSON",
        ),
        ("array", format!("{good}[1,2]\n"), Some(3), "JSON object"),
        (
            "nostep",
            format!("{good}\n{{\"loss\":1.8}}\n"),
            Some(4),
            "missing field `step`",
        ),
        (
            "strloss",
            "{\"step\":1,\"loss\":\"high\"}\n".to_string(),
            Some(1),
            "`loss`",
        ),
        (
            "nullloss",
            format!("{good}{{\"step\":2,\"loss\":null}}\n"),
            Some(3),
            "`loss`",
        ),
        (
            "evalstr",
            format!("{good}{{\"step\":2,\"eval_loss\":[1]}}\n"),
            Some(3),
            "`eval_loss`",
        ),
        (
            "negstep",
            "{\"step\":-1,\"loss\":1.0}\n".to_string(),
            Some(1),
            "`step`",
        ),
        ("empty", String::new(), None, "empty"),
        ("blank", "\n  \n".to_string(), None, "empty"),
    ];
    for (name, text, line, why) in cases {
        let path = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&path, text).unwrap();
        let err = RunMetrics::read(&path).unwrap_err().to_string();
        let at = match line {
            Some(l) => format!("{}:{l}: ", path.display()),
            None => format!("{}: ", path.display()),
        };
        assert!(err.starts_with(&at), "{name}: {err}");
        assert!(err.contains(why), "{name}: {err}");
        // the same error through the comparison input
        assert_eq!(detect(&path).unwrap_err().to_string(), err);
    }
    let missing = dir.path().join("nope");
    std::fs::create_dir(&missing).unwrap();
    let err = RunMetrics::read(&missing).unwrap_err();
    assert!(matches!(err, ReportError::Read { .. }));
    assert!(err
        .to_string()
        .contains(&missing.join("metrics.jsonl").display().to_string()));
}
