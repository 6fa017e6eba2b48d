//! Helpers shared by the CLI's end-to-end tests.
#![allow(dead_code)]

use std::process::Command;

/// The `teamtune` binary under test.
pub fn teamtune() -> Command {
    Command::new(env!("CARGO_BIN_EXE_teamtune"))
}

/// Runs `teamtune args...`, asserts success and returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = teamtune().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fetches the default model the way users do (idempotent).
pub fn fetch_default_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fetch = Command::new("bash")
        .arg(root.join("scripts/fetch-default-model.sh"))
        .output()
        .unwrap();
    assert!(
        fetch.status.success(),
        "{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
}
