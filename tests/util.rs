//! Helpers shared by the end-to-end tests of the `teamtune` binary.

use std::path::Path;
use std::process::{Command, Output};

/// The `teamtune` binary under test.
pub fn teamtune() -> Command {
    Command::new(env!("CARGO_BIN_EXE_teamtune"))
}

/// Runs `cmd`, asserts success (showing its stderr otherwise) and returns its output.
pub fn output_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `teamtune args...`, asserts success and returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    String::from_utf8(output_ok(teamtune().args(args)).stdout).unwrap()
}

pub use teamtune_testkit::{fixtures, tiny_chat_model as tiny_model};

/// Fetches the default model the way users do (idempotent).
pub fn fetch_default_model() {
    teamtune_testkit::downloaded();
}

/// Collects two expert single_nav episodes into `dir`/episodes.jsonl; returns the path of their
/// training conversations, `dir`/train.jsonl.
pub fn collect_conversations(dir: &Path) -> String {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    run_ok(&[
        "collect",
        "--task",
        "single_nav",
        "--episodes",
        "2",
        "--out",
        &p("episodes.jsonl"),
        "--training-out",
        &p("train.jsonl"),
    ]);
    p("train.jsonl")
}
