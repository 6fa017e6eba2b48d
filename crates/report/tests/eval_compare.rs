//! Comparing evaluation results (`teamtune eval` folders and files) on synthetic `eval.json`
//! files: table numbers against the inputs, the mean row recomputed here, missing tasks, the
//! study's published columns, the grouped bar chart's pixels and text, and errors that name the
//! file.

use std::path::{Path, PathBuf};
use teamtune_report::{
    detect, Comparable, Comparison, InputKind, ReportError, EVAL_FORMAT, PALETTE,
};

/// One task's numbers as `teamtune eval` writes them.
#[derive(Clone, Copy)]
struct T {
    task: &'static str,
    mean: f64,
    std: f64,
    success: f64,
    invalid: f64,
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

/// Seven tasks with numbers that differ per task and per `seed`.
fn tasks(seed: f64) -> Vec<T> {
    TASKS
        .iter()
        .enumerate()
        .map(|(i, &task)| {
            let mean = (seed * 7.0 + i as f64 * 13.3) % 100.0;
            T {
                task,
                mean,
                std: (i as f64 * 3.7 + seed) % 40.0,
                success: ((i + seed as usize) % 6) as f64 / 5.0,
                invalid: (i as f64 * 0.013 + seed * 0.01) % 0.3,
            }
        })
        .collect()
}

fn eval_json(policy: &str, tasks: &[T]) -> String {
    let rows: Vec<String> = tasks
        .iter()
        .map(|t| {
            format!(
                "{{\"task\":\"{}\",\"episodes\":5,\"mean_score\":{},\"std_score\":{},\"min_score\":0.0,\
                 \"max_score\":100.0,\"success_rate\":{},\"invalid_reply_rate\":{},\"turns\":50,\
                 \"avg_turns\":10.0,\"generated_tokens\":1610,\"seconds\":29.4}}",
                t.task, t.mean, t.std, t.success, t.invalid
            )
        })
        .collect();
    let mean = tasks.iter().map(|t| t.mean).sum::<f64>() / tasks.len() as f64;
    format!(
        "{{\"format\":\"{EVAL_FORMAT}\",\"policy\":\"{policy}\",\"settings\":{{\"seed\":1,\"model\":\"m\"}},\
         \"tasks\":[{}],\"mean_score\":{mean},\"invalid_reply_rate\":0.0,\"wall_seconds\":812.0}}",
        rows.join(",")
    )
}

/// `dir/name/eval.json` and `dir/name/episodes.jsonl`, as `teamtune eval --out dir/name`.
fn write_eval(dir: &Path, name: &str, policy: &str, tasks: &[T]) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("eval.json"), eval_json(policy, tasks)).unwrap();
    std::fs::write(out.join("episodes.jsonl"), "{}\n").unwrap();
    out
}

/// The table's row `label`: its column groups (split on `|`), each as whitespace tokens.
fn row(table: &str, label: &str) -> Vec<Vec<String>> {
    let line = table
        .lines()
        .find(|l| l.split('|').next().map(str::trim) == Some(label) && l.contains('|'))
        .unwrap_or_else(|| panic!("no row {label} in\n{table}"));
    line.split('|')
        .skip(1)
        .map(|g| g.split_whitespace().map(String::from).collect())
        .collect()
}

/// The task rows' labels, in order.
fn row_labels(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(2)
        .filter(|l| l.contains('|') && !l.starts_with('-'))
        .map(|l| l.split('|').next().unwrap().trim().to_string())
        .collect()
}

/// The group names of the header.
fn groups(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap()
        .split('|')
        .skip(1)
        .map(|g| g.trim().to_string())
        .collect()
}

fn num(cell: &str) -> f64 {
    cell.trim_end_matches(['%', '*'])
        .parse()
        .unwrap_or_else(|_| panic!("{cell}"))
}

fn close(cell: &str, want: f64, decimals: i32) {
    let tol = 0.5 * 10f64.powi(-decimals) + 1e-9;
    assert!((num(cell) - want).abs() <= tol, "{cell} vs {want}");
}

/// A measured group's cells: score, std, success %, invalid %.
fn check_cells(g: &[String], t: &T) {
    assert_eq!(g.len(), 5, "{g:?}");
    close(&g[0], t.mean, 1);
    assert_eq!(g[1], "±");
    close(&g[2], t.std, 1);
    assert!(g[3].ends_with('%') && g[4].ends_with('%'), "{g:?}");
    close(&g[3], 100.0 * t.success, 0);
    close(&g[4], 100.0 * t.invalid, 1);
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn table_numbers_equal_the_inputs_and_the_mean_row_is_the_mean_of_task_means() {
    let dir = tempfile::tempdir().unwrap();
    let a_tasks = tasks(3.0);
    // the second input lists its tasks in another order: rows follow the first input
    let mut b_tasks = tasks(8.0);
    b_tasks.reverse();
    let a = write_eval(dir.path(), "base-8b", "model:default", &a_tasks);
    let b = write_eval(
        dir.path(),
        "tuned-8b",
        "model:default+run/adapter",
        &b_tasks,
    );
    let cmp = Comparison::detect_all(&[a, b.join("eval.json")]).unwrap();
    assert_eq!(cmp.kind(), InputKind::Evals);
    let table = cmp.table();
    assert_eq!(groups(&table), ["base-8b", "tuned-8b"], "\n{table}");
    let mut want_rows: Vec<String> = TASKS.iter().map(|t| t.to_string()).collect();
    want_rows.push("mean".into());
    assert_eq!(row_labels(&table), want_rows, "\n{table}");
    for (gi, ts) in [&a_tasks, &b_tasks].into_iter().enumerate() {
        for t in ts {
            check_cells(&row(&table, t.task)[gi], t);
        }
        let m = &row(&table, "mean")[gi];
        assert_eq!(m.len(), 3, "the mean row has no std: {m:?}");
        assert!(!m[0].ends_with('*'), "every task present: {m:?}");
        close(&m[0], mean(ts.iter().map(|t| t.mean)), 1);
        close(&m[1], 100.0 * mean(ts.iter().map(|t| t.success)), 0);
        close(&m[2], 100.0 * mean(ts.iter().map(|t| t.invalid)), 1);
    }
    assert!(table.contains("base-8b: model:default ("), "\n{table}");
}

#[test]
fn a_task_missing_from_an_input_shows_a_dash() {
    let dir = tempfile::tempdir().unwrap();
    let a_tasks = tasks(1.0);
    let mut b_tasks: Vec<T> = tasks(2.0)
        .into_iter()
        .filter(|t| t.task != "multi_pick")
        .collect();
    b_tasks.push(T {
        task: "extra_task",
        mean: 55.0,
        std: 5.0,
        success: 0.2,
        invalid: 0.1,
    });
    let a = write_eval(dir.path(), "a", "expert", &a_tasks);
    let b = write_eval(dir.path(), "b", "expert", &b_tasks);
    let table = Comparison::detect_all(&[a, b]).unwrap().table();
    let labels = row_labels(&table);
    assert_eq!(labels[6], "permission_pick", "\n{table}");
    assert_eq!(
        labels[7], "extra_task",
        "first input's tasks, then the rest\n{table}"
    );
    assert_eq!(row(&table, "multi_pick")[1], ["-", "-", "-"], "\n{table}");
    assert_eq!(row(&table, "extra_task")[0], ["-", "-", "-"], "\n{table}");
    check_cells(&row(&table, "extra_task")[1], &b_tasks[6]);
    // each column's mean is over the tasks it has, marked as partial
    let m = row(&table, "mean");
    assert!(m[0][0].ends_with('*') && m[1][0].ends_with('*'), "{m:?}");
    close(&m[0][0], mean(a_tasks.iter().map(|t| t.mean)), 1);
    close(&m[1][0], mean(b_tasks.iter().map(|t| t.mean)), 1);
    assert!(table.contains("* = over fewer tasks"), "\n{table}");
}

/// GRIDWORLD.md, "Results to reproduce (score, mean of 10 runs)", copied here by hand so that
/// a change to the crate's copy fails this test.
const GRIDWORLD_MD: [(&str, [f64; 3]); 7] = [
    ("single_nav", [80.0, 90.0, 100.0]),
    ("corners", [37.5, 72.5, 80.0]),
    ("alphabetical", [7.5, 62.5, 77.5]),
    ("random_points", [45.0, 35.0, 25.0]),
    ("single_pick", [20.0, 90.0, 60.0]),
    ("multi_pick", [2.5, 81.7, 55.6]),
    ("permission_pick", [3.3, 75.0, 10.0]),
];

#[test]
fn reference_columns_are_the_studys_published_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_eval(dir.path(), "mine", "expert", &tasks(4.0)[..3]);
    let mut cmp = Comparison::detect_all(&[a]).unwrap();
    cmp.set_reference("study").unwrap();
    let table = cmp.table();
    assert_eq!(
        groups(&table),
        [
            "mine",
            "study: base 8B",
            "study: base 70B",
            "study: fine-tuned 8B"
        ],
        "\n{table}"
    );
    // the reference brings its seven tasks even where the evaluation played only three
    assert_eq!(row_labels(&table).len(), 8, "\n{table}");
    for (task, scores) in GRIDWORLD_MD {
        let r = row(&table, task);
        for (k, s) in scores.iter().enumerate() {
            assert_eq!(r[1 + k].len(), 1, "published: score only {r:?}");
            close(&r[1 + k][0], *s, 1);
        }
    }
    let m = row(&table, "mean");
    for k in 0..3 {
        close(&m[1 + k][0], mean(GRIDWORLD_MD.iter().map(|r| r.1[k])), 1);
    }
    assert_eq!(row(&table, "multi_pick")[0], ["-", "-", "-"]);
    assert!(table.contains("GRIDWORLD.md"), "\n{table}");

    // and in the chart: the same numbers as bars, the mean as the last group
    let chart = cmp.scoreboard().bar_chart();
    assert_eq!(chart.categories.len(), 8);
    assert_eq!(chart.categories[7], "mean");
    for k in 0..3 {
        let s = &chart.series[1 + k];
        for (i, (task, scores)) in GRIDWORLD_MD.iter().enumerate() {
            assert_eq!(chart.categories[i], *task);
            assert_eq!(s.values[i], Some(scores[k]), "{}", s.label);
        }
    }

    // a reference needs evaluations, and a known name
    assert!(cmp
        .set_reference("paper")
        .unwrap_err()
        .to_string()
        .contains("study"));
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\":1,\"loss\":1.0}\n").unwrap();
    let mut runs = Comparison::detect_all(&[run]).unwrap();
    let err = runs.set_reference("study").unwrap_err().to_string();
    assert!(err.contains("training runs"), "{err}");
}

/// (width, height), whether flat, and how many pixels have each colour.
fn png_colours(path: &Path, colours: &[[u8; 3]]) -> Vec<usize> {
    let img = image::open(path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1200, 600));
    let first = *img.get_pixel(0, 0);
    assert!(img.pixels().any(|p| *p != first), "a flat image");
    colours
        .iter()
        .map(|c| img.pixels().filter(|p| p.0 == *c).count())
        .collect()
}

fn svg_texts(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| {
            n.descendants()
                .filter(|t| t.is_text())
                .filter_map(|t| t.text())
                .collect::<String>()
                .trim()
                .to_string()
        })
        .collect()
}

fn rgb(c: plotters::style::RGBColor) -> [u8; 3] {
    [c.0, c.1, c.2]
}

#[test]
fn bar_chart_draws_each_input_in_its_colour_with_bars_to_scale() {
    let dir = tempfile::tempdir().unwrap();
    let flat = |score: f64| -> Vec<T> {
        TASKS
            .iter()
            .map(|&task| T {
                task,
                mean: score,
                std: 0.0,
                success: 0.0,
                invalid: 0.0,
            })
            .collect()
    };
    let a = write_eval(dir.path(), "high", "expert", &flat(80.0));
    let b = write_eval(dir.path(), "low", "expert", &flat(40.0));
    let cmp = Comparison::detect_all(&[a, b]).unwrap();
    let files = cmp.write_figure(&dir.path().join("figs/cmp")).unwrap();
    let n = png_colours(&files.png, &[rgb(PALETTE[0]), rgb(PALETTE[1])]);
    assert!(n[0] > 2000 && n[1] > 1000, "{n:?}");
    // bars are as high as the scores: twice the score, twice the area
    let ratio = n[0] as f64 / n[1] as f64;
    assert!((1.8..2.2).contains(&ratio), "{n:?}: ratio {ratio}");
    let texts = svg_texts(&files.svg);
    for want in ["high", "low", "mean", "score", "task"]
        .iter()
        .chain(&TASKS)
    {
        assert!(texts.iter().any(|t| t == want), "no `{want}` in {texts:?}");
    }
}

#[test]
fn bar_chart_with_reference_has_legend_names_and_error_bars() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_eval(dir.path(), "base", "model:default", &tasks(2.0));
    let b = write_eval(dir.path(), "tuned", "model:default+a", &tasks(5.0));
    let mut cmp = Comparison::detect_all(&[a, b]).unwrap();
    cmp.rename(&["base 135M".into(), "tuned 135M".into()])
        .unwrap();
    cmp.set_reference("study").unwrap();
    let files = cmp.write_figure(&dir.path().join("cmp")).unwrap();
    let board = cmp.scoreboard();
    let mut colours: Vec<[u8; 3]> = board.columns.iter().map(|c| rgb(c.color)).collect();
    colours.push(rgb(teamtune_report::ERROR_BAR));
    let n = png_colours(&files.png, &colours);
    for (c, k) in colours.iter().zip(&n) {
        assert!(*k > 50, "colour {c:?} on {k} pixels: {n:?}");
    }
    let texts = svg_texts(&files.svg);
    for want in [
        "base 135M",
        "tuned 135M",
        "study: base 8B",
        "study: base 70B",
        "study: fine-tuned 8B",
    ] {
        assert!(texts.iter().any(|t| t == want), "no `{want}` in {texts:?}");
    }
    assert!(
        texts.iter().any(|t| t.contains("base 135M vs tuned 135M")),
        "title: {texts:?}"
    );
}

#[test]
fn names_default_to_the_folder_or_file_and_can_be_given() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_eval(dir.path(), "run-a", "expert", &tasks(1.0));
    // a JSON file of any name is recognised by its format tag
    let b = dir.path().join("baseline.json");
    std::fs::write(&b, eval_json("model:default", &tasks(2.0))).unwrap();
    let Comparable::Eval(e) = detect(&a).unwrap() else {
        panic!("not an eval")
    };
    assert_eq!((e.name.as_str(), e.policy.as_str()), ("run-a", "expert"));
    assert_eq!(e.tasks.len(), 7);
    let Comparable::Eval(e) = detect(&b).unwrap() else {
        panic!("not an eval")
    };
    assert_eq!(e.name, "baseline");
    let Comparable::Eval(e) = detect(&a.join("eval.json")).unwrap() else {
        panic!("not an eval")
    };
    assert_eq!(e.name, "run-a");

    // two folders of the same name are told apart by their paths
    let c = write_eval(&dir.path().join("x"), "run-a", "expert", &tasks(3.0));
    let cmp = Comparison::detect_all(&[a.clone(), c.clone()]).unwrap();
    let names: Vec<&str> = cmp.items.iter().map(Comparable::name).collect();
    assert_eq!(names, [a.to_str().unwrap(), c.to_str().unwrap()]);

    let mut cmp = Comparison::detect_all(&[a, b]).unwrap();
    cmp.rename(&["first".into(), "second".into()]).unwrap();
    assert_eq!(groups(&cmp.table()), ["first", "second"]);
    assert!(matches!(
        cmp.rename(&["one".into()]).unwrap_err(),
        ReportError::NameCount { .. }
    ));
}

#[test]
fn bad_eval_files_are_refused_with_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = eval_json("expert", &tasks(1.0));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrongtag",
            good.replace(EVAL_FORMAT, "teamtune-eval/2"),
            "format `teamtune-eval/2` is not supported",
        ),
        (
            "notag",
            good.replace(&format!("\"format\":\"{EVAL_FORMAT}\","), ""),
            "no `format` field",
        ),
        (
            "malformed",
            good[..good.len() - 40].to_string(),
            "not valid JSON",
        ),
        ("array", "[1, 2]".to_string(), "object"),
        (
            "notasks",
            good.replace("\"tasks\":", "\"tusks\":"),
            "missing field `tasks`",
        ),
        (
            "nostd",
            good.replacen("\"std_score\":", "\"spread\":", 1),
            "missing field `tasks[0].std_score`",
        ),
        (
            "strscore",
            good.replacen("\"mean_score\":", "\"mean_score\":\"high\",\"x\":", 1),
            "`tasks[0].mean_score` must be a number",
        ),
        (
            "emptytasks",
            format!("{{\"format\":\"{EVAL_FORMAT}\",\"policy\":\"p\",\"tasks\":[]}}"),
            "no task results",
        ),
    ];
    for (name, text, why) in cases {
        // as an eval folder and as a .json file
        let folder = dir.path().join(name);
        std::fs::create_dir_all(&folder).unwrap();
        let in_folder = folder.join("eval.json");
        std::fs::write(&in_folder, &text).unwrap();
        let file = dir.path().join(format!("{name}.json"));
        std::fs::write(&file, &text).unwrap();
        for (input, named) in [(&folder, &in_folder), (&file, &file)] {
            let err = detect(input).unwrap_err().to_string();
            assert!(
                err.starts_with(&named.display().to_string()),
                "{name}: {err}"
            );
            assert!(err.contains(why), "{name}: {err}");
            // and through the comparison of several inputs
            let good_dir = write_eval(dir.path(), "good", "expert", &tasks(1.0));
            let err2 = Comparison::detect_all(&[good_dir, input.clone()])
                .unwrap_err()
                .to_string();
            assert_eq!(err2, err);
        }
    }
}

#[test]
fn runs_and_evaluations_cannot_be_mixed() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("myrun");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"step\":0,\"eval_loss\":2.0}\n{\"step\":1,\"loss\":1.5}\n",
    )
    .unwrap();
    let eval = write_eval(dir.path(), "myeval", "expert", &tasks(1.0));
    for inputs in [
        vec![run.clone(), eval.clone()],
        vec![eval.join("eval.json"), run.join("metrics.jsonl")],
    ] {
        let err = Comparison::detect_all(&inputs).unwrap_err();
        assert!(matches!(err, ReportError::Mixed { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("cannot compare training runs with evaluation results"),
            "{msg}"
        );
        assert!(
            msg.contains(run.to_str().unwrap()) && msg.contains(eval.to_str().unwrap()),
            "{msg}"
        );
    }
    // a folder with both files is ambiguous
    std::fs::copy(eval.join("eval.json"), run.join("eval.json")).unwrap();
    let err = detect(&run).unwrap_err().to_string();
    assert!(err.contains("both metrics.jsonl and eval.json"), "{err}");
}
