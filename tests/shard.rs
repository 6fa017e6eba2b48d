//! `eval` and `collect` split over machines: `--shard K/N` plays a slice of the episodes and
//! `--merge` puts the shards' folders back together into exactly what the unsharded run
//! writes; shards of another run, duplicates and missing shards are refused.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{run_ok, teamtune, tiny_model};

/// Task variants the experts cannot finish, so that scores spread (25/50/75, 33.3/66.7) and
/// the merged means and deviations are real arithmetic, beside a task they always finish.
const SHORT_TASKS: &str = r#"
[[task]]
id = "short_corners"
kind = "corners"
width = [6, 7]
height = [6]
agents = [4]
rounds = 2

[[task]]
id = "short_pick"
kind = "carry"
width = [5, 6]
height = [5]
agents = [2]
rounds = 6
items = [3]
"#;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// `teamtune args...` that must fail with exit code 1 and `want` in its error.
fn fails(args: &[String], want: &str) -> String {
    let out = teamtune().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: wanted `{want}` in: {err}");
    err
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// eval.json without its wall-clock figures (the only fields a merge cannot reproduce).
fn eval_json_without_times(dir: &Path) -> Value {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    assert!(o.remove("wall_seconds").unwrap().as_f64().unwrap() >= 0.0);
    for t in o["tasks"].as_array_mut().unwrap() {
        assert!(t.as_object_mut().unwrap().remove("seconds").is_some());
    }
    v
}

/// (task, seed) of every record in `file`, in order.
fn episodes_of(file: &Path) -> Vec<(String, u64)> {
    teamtune_gridworld::read_records(file)
        .unwrap()
        .into_iter()
        .map(|r| (r.task, r.seed))
        .collect()
}

/// Runs `base` unsharded into `dir/full` and as 3 shards into `dir/s0..s2`; returns the shard
/// folders. `out` maps a folder to the command's output flags.
fn whole_and_three_shards(
    dir: &Path,
    base: &[String],
    out: impl Fn(&Path) -> Vec<String>,
) -> Vec<PathBuf> {
    let full = dir.join("full");
    std::fs::create_dir_all(&full).unwrap();
    let mut whole = base.to_vec();
    whole.extend(out(&full));
    run_ok(&whole.iter().map(String::as_str).collect::<Vec<_>>());
    (0..3)
        .map(|k| {
            let shard = dir.join(format!("s{k}"));
            std::fs::create_dir_all(&shard).unwrap();
            let mut one = base.to_vec();
            one.extend(out(&shard));
            one.extend(["--shard".to_owned(), format!("{k}/3")]);
            let said = run_ok(&one.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(
                said.contains(&format!("shard {k}/3: 4 of the run's 12 episodes")),
                "{said}"
            );
            assert!(shard.join("shard.json").is_file());
            shard
        })
        .collect()
}

fn expert_base(dir: &Path, command: &str) -> Vec<String> {
    let tasks = dir.join("short.toml");
    std::fs::write(&tasks, SHORT_TASKS).unwrap();
    args(&[
        command,
        "--policy",
        "expert",
        "--tasks",
        &s(&tasks),
        "--task",
        "short_corners,short_pick,single_nav",
        "--episodes",
        "4",
        "--seed",
        "5",
        "--parallel",
        "3",
    ])
}

#[test]
fn three_expert_eval_shards_merge_into_the_unsharded_eval() {
    let dir = tempfile::tempdir().unwrap();
    let base = expert_base(dir.path(), "eval");
    let shards = whole_and_three_shards(dir.path(), &base, |d| args(&["--out", &s(d)]));
    let full = dir.path().join("full");

    // The shards partition the whole run's episodes, round-robin: each plays every task.
    let whole = episodes_of(&full.join("episodes.jsonl"));
    assert_eq!(whole.len(), 12);
    let mut union = Vec::new();
    for (k, shard) in shards.iter().enumerate() {
        let mine = episodes_of(&shard.join("episodes.jsonl"));
        let want: Vec<_> = whole.iter().skip(k).step_by(3).cloned().collect();
        assert_eq!(mine, want, "shard {k}/3");
        let tasks: std::collections::BTreeSet<_> = mine.iter().map(|(t, _)| t).collect();
        assert_eq!(tasks.len(), 3, "shard {k}/3 plays every task");
        let report = eval_json_without_times(shard);
        assert_eq!(report["settings"]["shard"], format!("{k}/3"));
        union.extend(mine);
    }
    union.sort();
    let mut sorted = whole.clone();
    sorted.sort();
    assert_eq!(union, sorted);

    // Merged in any order: the unsharded files, episodes byte for byte.
    let merged = dir.path().join("merged");
    let said = run_ok(&[
        "eval",
        "--merge",
        &s(&shards[2]),
        &s(&shards[0]),
        &s(&shards[1]),
        "--out",
        &s(&merged),
    ]);
    assert!(said.contains("3 shards merged (12 episodes"), "{said}");
    assert_eq!(
        std::fs::read(merged.join("episodes.jsonl")).unwrap(),
        std::fs::read(full.join("episodes.jsonl")).unwrap()
    );
    let report = eval_json_without_times(&merged);
    assert_eq!(report, eval_json_without_times(&full));
    assert!(report["settings"].get("shard").is_none());
    assert!(!merged.join("shard.json").exists());
    // Not a trivial table: the short tasks' scores spread, and the mean is not a round number.
    let std_of = |t: usize| report["tasks"][t]["std_score"].as_f64().unwrap();
    assert!(std_of(0) > 0.0 && std_of(1) > 0.0, "{report}");
    assert_eq!(report["tasks"][2]["mean_score"], 100.0);
    // The shards' own tables differ from the whole run's (each covers a third).
    assert_ne!(eval_json_without_times(&shards[0]), report);
}

#[test]
fn three_expert_collect_shards_merge_into_the_unsharded_collection() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = expert_base(dir.path(), "collect");
    base.extend(args(&["--min-score", "30", "--history", "1"]));
    let out = |d: &Path| {
        args(&[
            "--out",
            &s(&d.join("episodes.jsonl")),
            "--training-out",
            &s(&d.join("train.jsonl")),
        ])
    };
    let shards = whole_and_three_shards(dir.path(), &base, out);
    let full = dir.path().join("full");
    let merged = dir.path().join("merged");
    let mut merge = args(&["collect", "--merge"]);
    merge.extend(shards.iter().rev().map(|p| s(p)));
    merge.extend(out(&merged));
    let said = run_ok(&merge.iter().map(String::as_str).collect::<Vec<_>>());
    for file in ["episodes.jsonl", "train.jsonl"] {
        let want = std::fs::read(full.join(file)).unwrap();
        assert!(!want.is_empty());
        assert_eq!(std::fs::read(merged.join(file)).unwrap(), want, "{file}");
    }
    // The pruning is the whole run's: some episodes fell below 30, and the count says so.
    let kept = episodes_of(&full.join("episodes.jsonl")).len();
    assert!((1..12).contains(&kept), "{kept}");
    let written = format!("{kept} episodes written to");
    assert!(said.contains(&written), "{said}");
    assert!(
        said.contains(&format!("({} pruned below 30)", 12 - kept)),
        "{said}"
    );

    // Merging again appends the records, as a second unsharded run into the same file would.
    merge.truncate(merge.len() - 2);
    run_ok(&merge.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(episodes_of(&merged.join("episodes.jsonl")).len(), 2 * kept);
}

#[test]
fn merge_refuses_missing_duplicate_and_foreign_shards_and_its_inputs_as_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let eval = |seed: &str, shard: &str, out: &str| {
        run_ok(&[
            "eval",
            "--policy",
            "expert",
            "--task",
            "single_nav",
            "--episodes",
            "3",
            "--seed",
            seed,
            "--shard",
            shard,
            "--out",
            &s(&d(out)),
        ]);
    };
    eval("0", "0/3", "a0");
    eval("0", "1/3", "a1");
    eval("0", "2/3", "a2");
    eval("1", "2/3", "b2");
    eval("0", "0/2", "c0");
    run_ok(&[
        "eval",
        "--policy",
        "expert",
        "--task",
        "single_nav",
        "--episodes",
        "3",
        "--out",
        &s(&d("whole")),
    ]);
    run_ok(&[
        "collect",
        "--task",
        "single_nav",
        "--episodes",
        "3",
        "--shard",
        "0/3",
        "--out",
        &s(&d("k0/episodes.jsonl")),
    ]);
    // A shard whose records are another shard's (copied over by mistake).
    let t1 = d("t1");
    std::fs::create_dir(&t1).unwrap();
    std::fs::copy(d("a1/shard.json"), t1.join("shard.json")).unwrap();
    std::fs::copy(d("a2/episodes.jsonl"), t1.join("episodes.jsonl")).unwrap();

    let out = d("merged");
    let merge = |inputs: &[&str], out: &Path| {
        let mut a = args(&["eval", "--merge"]);
        a.extend(inputs.iter().map(|i| s(&d(i))));
        a.extend(["--out".to_owned(), s(out)]);
        a
    };
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            merge(&["a0", "a1"], &out),
            "--merge: shard 2/3 missing (the run was split into 3; given: 0/3, 1/3)".into(),
        ),
        (
            merge(&["a0", "a1", "a1", "a2"], &out),
            format!("shard 1/3 given twice: {} and {}", s(&d("a1")), s(&d("a1"))),
        ),
        (
            merge(&["a0", "a1", "b2"], &out),
            format!(
                "{} is a shard of another run than {}: its seed is 1, where",
                s(&d("b2")),
                s(&d("a0"))
            ),
        ),
        (
            merge(&["a0", "a1", "a2", "c0"], &out),
            "slices of 2 and of 3 shards do not merge".into(),
        ),
        (
            merge(&["a0", "a1", "whole"], &out),
            format!(
                "{} holds no shard.json: it is not the output of `teamtune eval --shard K/N`",
                s(&d("whole"))
            ),
        ),
        (
            merge(&["a0", "a1", "k0"], &out),
            "is a shard of `teamtune collect`, not of `teamtune eval`".into(),
        ),
        (
            merge(&["a0", "t1", "a2"], &out),
            "line 1 is single_nav seed 2, but".into(),
        ),
        (
            merge(&["a0", "a1", "a2"], &d("a1")),
            format!("--out {} is the shard folder", s(&d("a1"))),
        ),
        (
            merge(&["a0", "a1", "a2"], &d("a1/merged")),
            "is inside the shard folder".into(),
        ),
        (
            merge(&["a0", "a1", "a2"], &d("b2")),
            "holds a shard (shard.json) of another run".into(),
        ),
    ];
    let before: Vec<_> = ["a0", "a1", "a2", "b2"]
        .iter()
        .map(|n| std::fs::read(d(n).join("eval.json")).unwrap())
        .collect();
    for (a, want) in &cases {
        fails(a, want);
        assert!(!out.exists(), "{a:?} wrote {}", out.display());
    }
    let after: Vec<_> = ["a0", "a1", "a2", "b2"]
        .iter()
        .map(|n| std::fs::read(d(n).join("eval.json")).unwrap())
        .collect();
    assert_eq!(before, after, "inputs untouched");
    assert!(!d("a1/merged").exists());
    // The full set merges.
    run_ok(
        &merge(&["a0", "a1", "a2"], &out)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );

    // collect: a missing shard, and training lines the shards never wrote.
    let records = d("all.jsonl");
    fails(
        &args(&["collect", "--merge", &s(&d("k0")), "--out", &s(&records)]),
        "--merge: shards 1/3, 2/3 missing (the run was split into 3; given: 0/3)",
    );
    for k in ["1", "2"] {
        run_ok(&[
            "collect",
            "--task",
            "single_nav",
            "--episodes",
            "3",
            "--shard",
            &format!("{k}/3"),
            "--out",
            &s(&d(&format!("k{k}/episodes.jsonl"))),
        ]);
    }
    let all = |extra: &[&str]| {
        let mut a = args(&[
            "collect",
            "--merge",
            &s(&d("k0")),
            &s(&d("k1")),
            &s(&d("k2")),
        ]);
        a.extend(args(&["--out", &s(&records)]));
        a.extend(args(extra));
        a
    };
    fails(
        &all(&["--training-out", &s(&d("train.jsonl"))]),
        "was collected without --training-out",
    );
    assert!(!records.exists() && !d("train.jsonl").exists());
    fails(
        &all(&[])[..5]
            .iter()
            .cloned()
            .chain(args(&["--out", &s(&d("k1/episodes.jsonl"))]))
            .collect::<Vec<_>>(),
        "is inside the shard folder",
    );
    run_ok(&all(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(episodes_of(&records).len(), 3);
}

#[test]
fn bad_shard_values_fail_before_any_episode() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e");
    let records = dir.path().join("r/episodes.jsonl");
    for (value, want) in [
        ("abc", "--shard abc: expected K/N, like 0/4"),
        (
            "3/2",
            "--shard 3/2: K must be below N (the 2 shards are numbered 0 to 1)",
        ),
        ("2/2", "--shard 2/2: K must be below N"),
        ("0/0", "--shard 0/0: N must be at least 1"),
        (
            "1/4",
            "--shard 1/4: the run has only 3 episodes, so it splits into at most 3 shards \
             (1 task x 3 episodes)",
        ),
    ] {
        let common = ["--task", "single_nav", "--episodes", "3", "--shard", value];
        let mut eval = args(&["eval", "--policy", "expert", "--out", &s(&out)]);
        eval.extend(args(&common));
        fails(&eval, want);
        let mut collect = args(&["collect", "--out", &s(&records)]);
        collect.extend(args(&common));
        fails(&collect, want);
    }
    assert!(!out.exists() && !records.exists());

    // A collect shard keeps its files together, in a new file, one shard per folder.
    std::fs::create_dir_all(records.parent().unwrap()).unwrap();
    std::fs::write(&records, "").unwrap();
    let shard = |out: &Path, extra: &[&str]| {
        let mut a = args(&["collect", "--task", "single_nav", "--episodes", "3"]);
        a.extend(args(&["--shard", "0/3", "--out", &s(out)]));
        a.extend(args(extra));
        a
    };
    fails(
        &shard(&records, &[]),
        "exists; with --shard 0/3 the records go to a new file",
    );
    let fresh = dir.path().join("r/new.jsonl");
    let elsewhere = s(&dir.path().join("train.jsonl"));
    fails(
        &shard(&fresh, &["--training-out", &elsewhere]),
        "must be in the folder of --out",
    );
    std::fs::write(dir.path().join("r/shard.json"), "{}").unwrap();
    fails(&shard(&fresh, &[]), "already holds a shard (shard.json)");
    assert!(!fresh.exists());

    // --shard and --merge together, or --merge with the run's flags: clap's usage error.
    let out = teamtune()
        .args(["eval", "--merge", "x", "--shard", "0/2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn sampled_model_eval_shards_merge_into_the_unsharded_eval() {
    // The model policy with sampling (temperature 1, the whole vocabulary, the tiny random
    // model) in batches of 3: each turn's sampler is seeded from its own episode, so a shard
    // plays its episodes as the whole run does although its batches hold other episodes.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let base = args(&[
        "eval",
        "--policy",
        "model",
        "--model",
        &s(&model),
        "--unconstrained",
        "--temperature",
        "1.0",
        "--max-new-tokens",
        "6",
        "--history",
        "1",
        "--task",
        "single_nav,random_points",
        "--episodes",
        "6",
        "--parallel",
        "3",
    ]);
    let full = dir.path().join("full");
    let mut whole = base.clone();
    whole.extend(args(&["--out", &s(&full)]));
    run_ok(&whole.iter().map(String::as_str).collect::<Vec<_>>());
    let mut merge = args(&["eval", "--merge"]);
    for k in 0..3 {
        let shard = dir.path().join(format!("s{k}"));
        let mut one = base.clone();
        one.extend(args(&["--out", &s(&shard), "--shard", &format!("{k}/3")]));
        run_ok(&one.iter().map(String::as_str).collect::<Vec<_>>());
        merge.push(s(&shard));
    }
    let merged = dir.path().join("merged");
    merge.extend(args(&["--out", &s(&merged)]));
    run_ok(&merge.iter().map(String::as_str).collect::<Vec<_>>());
    let text = std::fs::read_to_string(full.join("episodes.jsonl")).unwrap();
    assert_eq!(
        std::fs::read_to_string(merged.join("episodes.jsonl")).unwrap(),
        text
    );
    let report = eval_json_without_times(&merged);
    assert_eq!(report, eval_json_without_times(&full));
    assert!(report["tasks"][0]["generated_tokens"].as_u64().unwrap() > 0);
    // The weight path taken is recorded: bf16 products by default where the CPU has them
    // (so shards from machines that would play differently do not merge), f32 on request.
    let has_bf16 = teamtune_llama::cpu_has_bf16_dot_products();
    assert_eq!(
        report["settings"]["settings"]["quantize"],
        if has_bf16 {
            serde_json::json!("bf16")
        } else {
            serde_json::Value::Null
        },
        "{}",
        report["settings"]
    );
    let f32_run = dir.path().join("f32");
    let mut plain = base.clone();
    plain.extend(args(&["--dtype", "f32", "--out", &s(&f32_run)]));
    run_ok(&plain.iter().map(String::as_str).collect::<Vec<_>>());
    let f32_report = eval_json_without_times(&f32_run);
    assert_eq!(
        f32_report["settings"]["settings"]["quantize"],
        serde_json::Value::Null
    );
    // Sampled, not degenerate: the episodes' first replies differ.
    let records = teamtune_gridworld::read_records(&full.join("episodes.jsonl")).unwrap();
    let first: std::collections::BTreeSet<_> = records
        .iter()
        .map(|r| r.conversations[0].messages[2].content.clone())
        .collect();
    assert!(first.len() > 3, "{first:?}");
}
