//! `teamtune collect` writes replayable records for every task and training lines that the
//! data loader reads.

use crate::util::run_ok as teamtune;

#[test]
fn collect_all_tasks_then_replay_and_read_as_training_data() {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("episodes.jsonl");
    let lines = dir.path().join("train.jsonl");
    let said = teamtune(&[
        "collect",
        "--task",
        "all",
        "--episodes",
        "2",
        "--seed",
        "7",
        "--min-score",
        "50",
        "--out",
        records.to_str().unwrap(),
        "--training-out",
        lines.to_str().unwrap(),
    ]);
    assert!(said.contains("episodes written"), "{said}");
    let recs = teamtune_gridworld::read_records(&records).unwrap();
    let tasks: std::collections::BTreeSet<_> = recs.iter().map(|r| r.task.clone()).collect();
    assert_eq!(tasks.len(), 7, "{tasks:?}");
    assert!(recs.iter().all(|r| r.final_score >= 50.0));
    let replayed = teamtune(&["replay", records.to_str().unwrap(), "--index", "0"]);
    assert!(replayed.contains("matches"), "{replayed}");

    let (convs, report) =
        teamtune_data::read_conversations(std::slice::from_ref(&lines), &Default::default())
            .unwrap();
    assert_eq!(report.invalid, 0);
    let agents: usize = recs.iter().map(|r| r.agents.len()).sum();
    assert_eq!(
        convs.len(),
        agents,
        "one training conversation per agent per episode"
    );
    assert!(convs
        .iter()
        .all(|c| c.assistant_turns() > 0 && c.score.is_some()));
}

#[test]
fn bad_collect_and_eval_arguments_fail_before_any_episode() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("same.jsonl");
    let out_file = dir.path().join("a-file");
    std::fs::write(&out_file, "keep me\n").unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "collect".into(),
                "--out".into(),
                s(&file),
                "--training-out".into(),
                s(&file),
            ],
            "--training-out and --out are the same file",
        ),
        (
            vec![
                "collect".into(),
                "--out".into(),
                s(&file),
                "--min-score".into(),
                "50".into(),
                "--pruned-out".into(),
                s(&file),
            ],
            "is also where --out or --training-out writes",
        ),
        (
            vec![
                "collect".into(),
                "--out".into(),
                s(&file),
                "--parallel".into(),
                "18446744073709551615".into(),
            ],
            "--parallel must be between 1 and 1024",
        ),
        (
            vec![
                "collect".into(),
                "--out".into(),
                s(&file),
                "--episodes".into(),
                "0".into(),
            ],
            "--episodes must be between 1 and",
        ),
        (
            vec![
                "collect".into(),
                "--out".into(),
                s(&file),
                "--min-score".into(),
                "NaN".into(),
            ],
            "--min-score must be a number",
        ),
        (
            vec![
                "eval".into(),
                "--policy".into(),
                "expert".into(),
                "--out".into(),
                s(&out_file),
            ],
            "is a file, not a folder",
        ),
        (
            vec![
                "eval".into(),
                "--policy".into(),
                "expert".into(),
                "--episodes".into(),
                "4294967295000".into(),
                "--out".into(),
                s(&dir.path().join("e")),
            ],
            "--episodes must be between 1 and",
        ),
        (
            vec![
                "eval".into(),
                "--policy".into(),
                "expert".into(),
                "--episodes".into(),
                "0".into(),
                "--out".into(),
                s(&dir.path().join("e")),
            ],
            "--episodes must be between 1 and",
        ),
        (
            vec![
                "eval".into(),
                "--policy".into(),
                "expert".into(),
                "--parallel".into(),
                "18446744073709551615".into(),
                "--out".into(),
                s(&dir.path().join("e")),
            ],
            "--parallel must be between 1 and 1024",
        ),
    ];
    for (args, want) in cases {
        let out = crate::util::teamtune().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        // Nothing was played or written.
        assert!(!file.exists(), "{args:?}");
    }
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "keep me\n");
    assert!(!dir.path().join("e").exists());
}
