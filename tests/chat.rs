//! `teamtune chat` on the tiny model: each stdin line is a turn, answered as `teamtune generate`
//! answers the same conversation (greedy); `/save` writes the conversation, `/reset` starts it
//! again, `/quit` ends; `--adapter` answers as `generate --adapter` does.

use std::io::Write;
use std::process::Stdio;

use serde_json::{json, Value};

use crate::util::{fixtures, output_ok, teamtune, tiny_model};

const MAX: &str = "12";

fn generate(model: &str, extra: &[&str]) -> String {
    let out = output_ok(
        teamtune()
            .args(["generate", "--model", model, "--max-tokens", MAX])
            .args(extra)
            .env("RUST_LOG", "warn"),
    );
    String::from_utf8(out.stdout).unwrap()
}

fn chat(model: &str, extra: &[&str], input: &str) -> (String, String) {
    let mut child = teamtune()
        .args(["chat", "--model", model, "--max-tokens", MAX])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

#[test]
fn turns_save_reset_and_quit_answer_as_generate() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();
    let saved = dir.path().join("conversation.json");
    let input = format!(
        "hello\nand you?\n/save {}\n/reset\nhello\n/quit\nnever read\n",
        saved.display()
    );
    let system = ["--system", "You are tiny."];
    let (stdout, stderr) = chat(model, &system, &input);

    let first = generate(model, &["--system", "You are tiny.", "--prompt", "hello"]);
    let reply1 = first.strip_suffix('\n').unwrap();
    assert!(!reply1.is_empty());
    // The second turn continues the conversation (from the kept cache): generate on the
    // whole conversation gives the same answer.
    let history = dir.path().join("history.json");
    std::fs::write(
        &history,
        json!([{"role": "system", "content": "You are tiny."},
               {"role": "user", "content": "hello"},
               {"role": "assistant", "content": reply1},
               {"role": "user", "content": "and you?"}])
        .to_string(),
    )
    .unwrap();
    let second = generate(model, &["--messages", history.to_str().unwrap()]);
    // After /reset, "hello" is answered as the first time; /quit ends before the last line.
    assert_eq!(stdout, format!("{first}{second}{first}"), "{stderr}");
    assert!(stderr.contains("saved 5 messages"), "{stderr}");
    assert!(stderr.contains("starts again"), "{stderr}");

    let conv: Value = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let roles: Vec<&str> = conv
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
    assert_eq!(conv[2]["content"], reply1);
    assert_eq!(conv[4]["content"], second.strip_suffix('\n').unwrap());
    // /save never writes over a file.
    let (_, stderr) = chat(model, &[], &format!("hi\n/save {}\n", saved.display()));
    assert!(stderr.contains("exists; give a new file"), "{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&std::fs::read_to_string(&saved).unwrap()).unwrap(),
        conv
    );
}

#[test]
fn an_adapter_answers_as_generate_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();
    let lora = fixtures().join("tiny-lora");
    let lora = lora.to_str().unwrap();
    let prompts = ["hello", "the cat sat on the mat", "two  spaces"];
    let (stdout, _) = chat(model, &["--adapter", lora], &format!("{}\n", prompts[0]));
    assert_eq!(
        stdout,
        generate(model, &["--adapter", lora, "--prompt", prompts[0]])
    );
    // The adapter changes some answer (it is applied).
    let differs = prompts.iter().any(|p| {
        generate(model, &["--adapter", lora, "--prompt", p]) != generate(model, &["--prompt", p])
    });
    assert!(differs, "the adapter changed no answer");
    // A folder that is not an adapter is refused before the model loads.
    for extra in [&["chat"][..], &["generate", "--prompt", "x"][..]] {
        let out = teamtune()
            .args(extra)
            .args([
                "--model",
                "/nonexistent/model",
                "--adapter",
                "/nonexistent/lora",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.contains("--adapter /nonexistent/lora: not a LoRA adapter"),
            "{extra:?}: {err}"
        );
    }
}
