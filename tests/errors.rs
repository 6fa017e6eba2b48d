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
    // And with -v, whatever the environment says.
    let run = teamtune()
        .arg("-v")
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("TEAMTUNE_BACKTRACE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("backtrace") && err.contains("--micro-batch (4)"),
        "{err}"
    );
}

#[test]
fn sampling_settings_are_checked_before_the_model_loads() {
    let cases: [(&[&str], &str); 6] = [
        (&["--temperature", "NaN"], "--temperature must be a number"),
        (&["--temperature=-1"], "--temperature must be a number"),
        (&["--top-k", "0"], "--top-k must be at least 1"),
        (&["--top-p", "1.5"], "--top-p must be above 0 and at most 1"),
        (
            &["--repetition-penalty", "0"],
            "--repetition-penalty must be a positive number",
        ),
        (
            &["--repetition-penalty=-1.5"],
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

#[test]
fn train_refuses_a_run_folder_in_use_or_holding_a_run_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, "{\"messages\": []}\n").unwrap();
    let train = |extra: &[&str]| {
        let out = teamtune()
            .args([
                "train",
                "--data",
                data.to_str().unwrap(),
                "--out",
                run.to_str().unwrap(),
            ])
            .args(["--model", "/no/such/model"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A finished run: refused by name, its files untouched (train.toml included).
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 1.0}\n").unwrap();
    std::fs::write(run.join("train.toml"), "rank = 4\n").unwrap();
    let (code, err) = train(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("already holds a run") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("train.toml")).unwrap(),
        "rank = 4\n"
    );
    assert!(run.join("metrics.jsonl").exists());
    // In use by a live process (this test's own): refused, naming the process.
    std::fs::write(run.join(".lock"), format!("{}\n", std::process::id())).unwrap();
    let (code, err) = train(&["--resume", run.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("in use by process"), "{err}");
    std::fs::remove_file(run.join(".lock")).unwrap();
    // With --force the checks pass and the work starts (here: the model is missing), and the
    // old metrics are gone.
    let (code, err) = train(&["--force"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/no/such/model"), "{err}");
    assert!(!run.join("metrics.jsonl").exists());
    assert!(
        !run.join(".lock").exists(),
        "the lock goes with the process"
    );
}

#[test]
fn an_adapter_larger_than_memory_is_refused_by_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::util::tiny_model(dir.path());
    let data = crate::util::collect_conversations(dir.path());
    let run = dir.path().join("run");
    let out = teamtune()
        .args(["train", "--data", &data, "--out", run.to_str().unwrap()])
        .args([
            "--model",
            model.to_str().unwrap(),
            "--rank",
            "1000000000000",
        ])
        .args(["--max-steps", "1", "--min-score", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--rank 1000000000000 needs about"), "{err}");
    assert!(!run.join("adapter").exists());
}

/// `data render --index` past the last conversation says how many there are (it said "fewer
/// than 0 conversations" for the largest index).
#[test]
fn data_render_names_the_indices_there_are() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::util::tiny_model(dir.path());
    let file = dir.path().join("two.jsonl");
    let conv = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    std::fs::write(&file, format!("{conv}\n{conv}\n")).unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    for (f, index, want) in [
        (
            &file,
            usize::MAX.to_string(),
            format!(
                "--index {}: {} has 2 conversations, indices 0 to 1",
                usize::MAX,
                file.display()
            ),
        ),
        (
            &file,
            "2".to_string(),
            format!(
                "--index 2: {} has 2 conversations, indices 0 to 1",
                file.display()
            ),
        ),
        (
            &empty,
            "0".to_string(),
            format!("{} has no conversations", empty.display()),
        ),
    ] {
        let o = crate::util::teamtune()
            .args(["data", "render", "--model"])
            .arg(&model)
            .arg(f)
            .args(["--index", &index])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&want), "{err}");
    }
}

/// `data stats` reads lines up to `--max-line-mb`: a longer one (an endless stream) is an error
/// naming the file and line; 0 is refused.
#[test]
fn data_stats_bounds_the_line_length() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::util::tiny_model(dir.path());
    let file = dir.path().join("long.jsonl");
    std::fs::write(&file, format!("{}\n", "x".repeat(3 << 20))).unwrap();
    for (mb, want) in [
        (
            "1",
            format!("{}: line 1 is longer than 1 MiB", file.display()),
        ),
        ("0", "--max-line-mb 0: give 1 or more".to_string()),
    ] {
        let o = crate::util::teamtune()
            .args(["data", "stats", "--model"])
            .arg(&model)
            .arg(&file)
            .args(["--max-line-mb", mb])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&want), "{mb}: {err}");
    }
}

/// A chat template that does not compile is named by its flag, the cause underneath (the
/// headline said "give --chat-template or --template" even when one was given).
#[test]
fn a_bad_chat_template_is_named_by_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::util::tiny_model(dir.path());
    let bad = dir.path().join("bad.jinja");
    std::fs::write(&bad, "{% for m in messages %}{{ m.content }").unwrap();
    let data = dir.path().join("x.jsonl");
    std::fs::write(
        &data,
        r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
    )
    .unwrap();
    let o = crate::util::teamtune()
        .args(["data", "stats", "--model"])
        .arg(&model)
        .arg("--chat-template")
        .arg(&bad)
        .arg(&data)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let first = err.lines().next().unwrap_or("");
    assert_eq!(
        first,
        format!("Error: --chat-template {}", bad.display()),
        "{err}"
    );
    assert!(err.contains("syntax error"), "{err}");
    assert!(!err.contains("give --chat-template"), "{err}");
}

/// Flags that later work added (serve, chat, export, merge, the KV cache): a bad value is an error
/// naming the flag, before any model is read (`--model` names nothing here).
#[test]
fn new_flags_refuse_bad_values_before_loading() {
    let cases: [(&[&str], &str); 13] = [
        (
            &[
                "train",
                "--data",
                "x.jsonl",
                "--out",
                "/tmp/never",
                "--base-dtype",
                "f16",
            ],
            "--base-dtype must be f32 or bf16 (got `f16`)",
        ),
        (
            &[
                "train",
                "--data",
                "x.jsonl",
                "--out",
                "/tmp/never",
                "--base-dtype",
                "bf16",
                "--device",
                "cuda",
            ],
            "--base-dtype bf16 is the CPU's bf16 path; on --device cuda load the model in bf16 \
             with --dtype bf16 instead",
        ),
        (
            &["generate", "--prompt", "x", "--quantize", "q4_1"],
            "--quantize: invalid config: `q4_1` is not supported (q8_0, q4_0, bf16, gguf)",
        ),
        (
            &["serve", "--port", "0", "--prefill-chunk", "0"],
            "--prefill-chunk must be at least 1",
        ),
        (
            &["generate", "--prompt", "x", "--max-tokens", "0"],
            "--max-tokens must be at least 1",
        ),
        (
            &["chat", "--max-tokens", "0"],
            "--max-tokens must be at least 1",
        ),
        (
            &[
                "merge",
                "--no-adapter",
                "--out",
                "/tmp/never",
                "--format",
                "onnx",
            ],
            "--format `onnx` is not one of hf, gguf",
        ),
        (
            &[
                "merge",
                "--no-adapter",
                "--out",
                "/tmp/never.gguf",
                "--format",
                "gguf",
                "--type",
                "q2_k",
            ],
            "--type `q2_k` is not one of f32, f16, bf16, q8_0, q4_0",
        ),
        (
            &[
                "export",
                "--adapter",
                "/tmp",
                "--out",
                "/tmp/never.gguf",
                "--type",
                "q4_0",
            ],
            "--type `q4_0` is not one of f32, f16, bf16, q8_0",
        ),
        (
            &[
                "serve",
                "--port",
                "0",
                "--json-schema",
                "{}",
                "--json-schema-file",
                "x.json",
            ],
            "--json-schema",
        ),
        (
            &[
                "generate",
                "--prompt",
                "x",
                "--dtype",
                "bf16",
                "--kv-cache",
                "f16",
            ],
            "--kv-cache f16 needs a model that computes in f32; --dtype bf16",
        ),
        (
            &["generate", "--prompt", "x", "--kv-cache", "f8"],
            "invalid value 'f8' for '--kv-cache",
        ),
        (
            &[
                "train",
                "--data",
                "x.jsonl",
                "--out",
                "/tmp/never",
                "--kv-cache",
                "f16",
            ],
            "--kv-cache is an inference setting; training keeps no KV cache",
        ),
    ];
    for (args, want) in cases {
        let o = crate::util::teamtune()
            .args(args)
            .args(["--model", "/nonexistent/model"])
            .env("RUST_LOG", "warn")
            .env_remove("TEAMTUNE_API_KEY")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !err.contains("nonexistent"),
            "{args:?} read the model first: {err}"
        );
    }
}

/// An empty data file is named before any work, and no run folder is made for it.
/// `--quantize gguf` keeps a GGUF file's own blocks: a model folder is refused by the flag,
/// before its weights are read.
#[test]
fn gguf_blocks_of_a_folder_model_are_refused_by_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::util::tiny_model(dir.path());
    let o = teamtune()
        .args(["generate", "--prompt", "x", "--quantize", "gguf", "--model"])
        .arg(&model)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--quantize") && err.contains("is not a GGUF file"),
        "{err}"
    );
    assert!(!err.contains(" INFO "), "weights were read: {err}");
    assert!(!err.contains("stack backtrace"), "{err}");
}

#[test]
fn train_on_an_empty_data_file_says_so_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let run = dir.path().join("run");
    let out = teamtune()
        .args(["train", "--data", empty.to_str().unwrap()])
        .args(["--out", run.to_str().unwrap(), "--model", "/no/such/model"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("empty.jsonl holds no conversations (empty)") && !err.contains("/no/such"),
        "{err}"
    );
    assert!(!run.exists(), "no run folder for nothing");
}

/// `serve --host` that is not an address is refused by its flag before the model loads.
#[test]
fn serve_refuses_a_bad_host_before_the_model_loads() {
    let out = teamtune()
        .args(["serve", "--host", "not a host", "--model", "/no/such/model"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--host") && !err.contains("/no/such"), "{err}");
}

/// A device given as a file (`/dev/zero`, an endless stream) is refused by name before it is
/// read, for every flag that takes a text file.
#[test]
fn a_device_given_as_a_file_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "").unwrap();
    let d = data.to_str().unwrap();
    let cases: [&[&str]; 4] = [
        &["data", "stats", d, "--tokenizer", "/dev/zero"],
        &["data", "stats", d, "--chat-template", "/dev/zero"],
        &[
            "generate",
            "--messages",
            "/dev/zero",
            "--model",
            "/no/such/model",
        ],
        &[
            "serve",
            "--json-schema-file",
            "/dev/zero",
            "--model",
            "/no/such/model",
        ],
    ];
    for args in cases {
        let out = teamtune().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("/dev/zero") && err.contains("not a regular file"),
            "{args:?}: {err}"
        );
    }
}
