//! `teamtune generate` end to end on the default model: only the answer on stdout.

use std::process::Command;

use crate::util::output_ok;

fn teamtune() -> Command {
    crate::util::fetch_default_model();
    crate::util::teamtune()
}

#[test]
fn answers_on_stdout_and_logs_on_stderr() {
    let out =
        output_ok(teamtune().args(["generate", "--prompt", "What is the capital of France?"]));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim(), "The capital of France is Paris.");
    assert!(String::from_utf8_lossy(&out.stderr).contains("loading model"));
}

#[test]
fn multi_turn_messages_file_and_raw_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("messages.json");
    std::fs::write(
        &path,
        r#"[{"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada!"},
            {"role": "user", "content": "What is my name?"}]"#,
    )
    .unwrap();
    let out = output_ok(teamtune().args([
        "generate",
        "--messages",
        path.to_str().unwrap(),
        "--max-tokens",
        "20",
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Ada"));

    let out = output_ok(teamtune().args([
        "generate",
        "--raw",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "8",
    ]));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"[{"role": "robot", "content": "hi"}]"#).unwrap();
    let out = teamtune()
        .args(["generate", "--messages", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("message 0"),
        "{err}"
    );

    let out = teamtune()
        .args(["generate", "--prompt", "hi", "--model", "/no/such/model"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
}

#[test]
fn quantized_inference_still_answers() {
    let out = output_ok(teamtune().args([
        "generate",
        "--quantize",
        "q8_0",
        "--prompt",
        "What is the capital of France?",
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
    // The default model's file is Q4_1, which loads as f32: said once, not silent.
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        log.matches("weights are dequantised to f32").count(),
        1,
        "{log}"
    );
    assert!(log.contains("Q4_1"), "{log}");
    let out = teamtune()
        .args(["generate", "--quantize", "q4_1", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`q4_1` is not supported"));
}
