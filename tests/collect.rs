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
