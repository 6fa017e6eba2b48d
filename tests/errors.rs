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

#[test]
fn sampling_settings_are_checked_before_the_model_loads() {
    let cases: [(&[&str], &str); 5] = [
        (&["--temperature", "NaN"], "--temperature must be a number"),
        (&["--temperature=-1"], "--temperature must be a number"),
        (&["--top-k", "0"], "--top-k must be at least 1"),
        (&["--top-p", "1.5"], "--top-p must be above 0 and at most 1"),
        (
            &["--repetition-penalty", "0"],
            "--repetition-penalty must be a positive number",
        ),
    ];
    for (flags, want) in cases {
        // A model that does not exist: the flag must be what the error names.
        let out = teamtune()
            .args(["generate", "--prompt", "hi", "--model", "/no/such/model"])
            .args(flags)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want) && !err.contains("/no/such/model"),
            "{flags:?}: {err}"
        );
    }
    // The same checks for the agents' sampling.
    let out = teamtune()
        .args([
            "eval",
            "--temperature",
            "NaN",
            "--out",
            "/nonexistent/never/made",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--temperature must be a number"), "{err}");
}
