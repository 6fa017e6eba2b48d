//! `teamtune merge` on the tiny fixture: a PEFT adapter merged into a sharded HF folder that
//! our own loader reads back, a refused non-empty output, and a clear error for a bad adapter.

use crate::util::{fixtures, run_ok, teamtune};

fn s(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Runs `teamtune merge ARGS`, asserts that it fails and returns its stderr.
fn merge_fails(args: &[&str]) -> String {
    let out = teamtune().arg("merge").args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn merges_a_peft_adapter_into_a_sharded_hf_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let model = s(&fixtures().join("tiny-llama31.gguf"));
    let adapter = s(&fixtures().join("tiny-lora"));
    let said = run_ok(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--out",
        &s(&out),
        "--dtype",
        "bf16",
        "--max-shard-size",
        "100KB",
    ]);
    assert_eq!(said.trim(), s(&out));
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut shards: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() >= 2, "{shards:?}");
    for f in &shards {
        assert!(out.join(f).is_file(), "{f}");
    }
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");

    // The folder is a model the other commands take.
    let text = run_ok(&[
        "generate",
        "--model",
        &s(&out),
        "--raw",
        "--prompt",
        "the cat",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
    ]);
    assert!(!text.is_empty());

    // A second run refuses the now non-empty folder, and --force replaces it.
    let err = merge_fails(&["--model", &model, "--adapter", &adapter, "--out", &s(&out)]);
    assert!(err.contains("--force"), "{err}");
    run_ok(&[
        "merge",
        "--model",
        &model,
        "--no-adapter",
        "--out",
        &s(&out),
        "--force",
    ]);
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("model.safetensors.index.json").exists());
}

#[test]
fn an_adapter_is_required_and_a_missing_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let model = s(&fixtures().join("tiny-llama31"));
    assert!(merge_fails(&["--model", &model, "--out", &s(&out)]).contains("--adapter"));
    let missing = dir.path().join("no-such-adapter");
    let err = merge_fails(&[
        "--model",
        &model,
        "--adapter",
        &s(&missing),
        "--out",
        &s(&out),
    ]);
    assert!(err.contains("no-such-adapter"), "{err}");
    assert!(!out.exists());
}

#[test]
fn an_output_that_is_or_holds_or_sits_in_an_input_is_refused_even_with_force() {
    // Copies of the fixtures: a refusal that failed would delete them.
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-lora").join(f), adapter.join(f)).unwrap();
    }
    let model = s(&fixtures().join("tiny-llama31.gguf"));
    for out in [
        adapter.clone(),
        adapter.join("merged"),
        dir.path().to_path_buf(),
    ] {
        let err = merge_fails(&[
            "--model",
            &model,
            "--adapter",
            &s(&adapter),
            "--out",
            &s(&out),
            "--force",
        ]);
        assert!(
            err.contains("is, contains or is inside the input") && err.contains("adapter"),
            "{err}"
        );
        assert!(adapter.join("adapter_model.safetensors").is_file());
        assert!(!adapter.join("merged").exists());
    }
    // The base model's folder is an input too.
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for f in std::fs::read_dir(fixtures().join("tiny-llama31")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, base.join(f.file_name().unwrap())).unwrap();
    }
    let files = |d: &std::path::Path| std::fs::read_dir(d).unwrap().count();
    let before = files(&base);
    for out in [base.clone(), base.join("merged")] {
        let err = merge_fails(&[
            "--model",
            &s(&base),
            "--adapter",
            &s(&adapter),
            "--out",
            &s(&out),
            "--force",
        ]);
        assert!(
            err.contains("is, contains or is inside the input") && err.contains("base"),
            "{err}"
        );
        assert_eq!(files(&base), before);
    }
}

/// A merge killed mid-write leaves `.NAME.partial-PID`; the next merge into NAME removes the
/// ones whose process is gone (and says so) and leaves a running one's alone.
#[test]
fn partial_folders_of_dead_merges_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    // A pid no process has (above the kernel's pid_max), and a live one (this test's).
    let stale = dir.path().join(".merged.partial-4294967");
    let live = dir
        .path()
        .join(format!(".merged.partial-{}", std::process::id()));
    for p in [&stale, &live] {
        std::fs::create_dir(p).unwrap();
        std::fs::write(p.join("model.safetensors"), vec![0u8; 1000]).unwrap();
    }
    let o = teamtune()
        .args(["merge", "--model"])
        .arg(fixtures().join("tiny-llama31.gguf"))
        .arg("--adapter")
        .arg(fixtures().join("tiny-lora"))
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!stale.exists(), "{err}");
    assert!(
        err.contains("removed the partial folder of an interrupted merge"),
        "{err}"
    );
    assert!(live.exists());
    assert!(out.join("config.json").exists());
}
