//! Errors are for people: the message and its causes on stderr, exit status 1, and no
//! backtrace even where RUST_BACKTRACE=1 is set for every program (unless TEAMTUNE_BACKTRACE=1
//! asks for one).

use crate::util::teamtune;

#[test]
fn a_bad_setting_is_one_plain_line_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = [
        "train",
        "--data",
        "missing.jsonl",
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
        "--micro-batch",
        "4",
    ];
    let run = teamtune()
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("TEAMTUNE_BACKTRACE")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains(
            "Error: invalid training setting: --micro-batch (4) cannot be larger than \
             --batch-size (2)"
        ),
        "{err}"
    );
    assert!(
        !err.contains("backtrace") && !err.contains("Recipe {"),
        "{err}"
    );
    // Checked before any work: nothing was created.
    assert!(!out.exists());
    // Asked for, the backtrace comes.
    let run = teamtune()
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("TEAMTUNE_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("backtrace"), "{err}");
}
