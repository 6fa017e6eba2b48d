//! Helpers shared by the end-to-end tests of the `teamtune` binary.

use std::path::{Path, PathBuf};
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

/// Fetches the default model the way users do (idempotent).
pub fn fetch_default_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    output_ok(Command::new("bash").arg(root.join("scripts/fetch-default-model.sh")));
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

/// The llama crate's test fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/llama/tests/fixtures")
}

/// A HF folder: the tiny fixture's config and random weights, its GGUF's toy tokenizer as
/// tokenizer.json, and a chat template (the fixture has none).
pub fn tiny_model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-chat");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-llama31").join(f), out.join(f)).unwrap();
    }
    let gguf = fixtures().join("tiny-llama31.gguf");
    let assets = teamtune_llama::load_chat_assets(gguf.to_str().unwrap()).unwrap();
    assets
        .tokenizer
        .save(out.join("tokenizer.json"), false)
        .unwrap();
    let template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
    let config = serde_json::json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": template,
    });
    std::fs::write(out.join("tokenizer_config.json"), config.to_string()).unwrap();
    out
}
