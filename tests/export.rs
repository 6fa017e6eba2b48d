//! `teamtune export --format gguf`: a llama.cpp LoRA GGUF and an Ollama Modelfile from a PEFT
//! adapter; the GGUF loads back wherever `--adapter` is taken and answers as the PEFT folder
//! does; bad arguments are refused before anything is read or written.

use crate::util::{fixtures, output_ok, teamtune, tiny_model};

fn generate(model: &str, adapter: &str) -> String {
    let out = output_ok(
        teamtune()
            .args(["generate", "--model", model, "--adapter", adapter])
            .args(["--prompt", "the cat sat on the mat", "--max-tokens", "16"])
            .env("RUST_LOG", "warn"),
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn exports_an_adapter_gguf_and_a_modelfile_that_answer_as_the_peft_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();
    let lora = fixtures().join("tiny-lora");
    let lora = lora.to_str().unwrap();
    let out = dir.path().join("adapter.gguf");
    let printed = output_ok(
        teamtune()
            .args(["export", "--model", model, "--adapter", lora, "--out"])
            .arg(&out)
            .env("RUST_LOG", "warn"),
    );
    assert_eq!(
        String::from_utf8(printed.stdout).unwrap().trim(),
        out.display().to_string()
    );
    let modelfile = std::fs::read_to_string(dir.path().join("Modelfile")).unwrap();
    let abs = |p: &std::path::Path| std::fs::canonicalize(p).unwrap().display().to_string();
    assert!(
        modelfile.contains(&format!("\nFROM {}\n", abs(std::path::Path::new(model)))),
        "{modelfile}"
    );
    assert!(
        modelfile.contains(&format!("\nADAPTER {}\n", abs(&out))),
        "{modelfile}"
    );
    assert!(modelfile.contains("PARAMETER stop \""), "{modelfile}");
    assert_eq!(
        generate(model, out.to_str().unwrap()),
        generate(model, lora)
    );

    // Refused before any work, naming the flag.
    let other = dir.path().join("other.gguf");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--out".into(), out.display().to_string()], "--out"),
        (
            vec![
                "--out".into(),
                other.display().to_string(),
                "--type".into(),
                "q4_k".into(),
            ],
            "--type `q4_k`",
        ),
        (
            vec![
                "--out".into(),
                other.display().to_string(),
                "--format".into(),
                "onnx".into(),
            ],
            "--format `onnx`",
        ),
    ];
    for (extra, want) in cases {
        let o = teamtune()
            .args(["export", "--model", "/nonexistent/model", "--adapter", lora])
            .args(&extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(
            !err.contains("nonexistent"),
            "{extra:?} read the model first: {err}"
        );
    }
    assert!(!other.exists());
    let o = teamtune()
        .args([
            "export",
            "--model",
            model,
            "--adapter",
            "/nonexistent/lora",
            "--out",
        ])
        .arg(&other)
        .arg("--modelfile")
        .arg(dir.path().join("Modelfile2"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--adapter /nonexistent/lora: not a LoRA adapter"),
        "{err}"
    );
    // The Modelfile is never written over either.
    let o = teamtune()
        .args(["export", "--model", model, "--adapter", lora, "--out"])
        .arg(&other)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--modelfile") && err.contains("exists"),
        "{err}"
    );
    assert!(!other.exists());
}

#[test]
fn merge_to_gguf_from_a_gguf_or_hf_base_answers_as_base_plus_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures().join("tiny-lora");
    let gguf_base = fixtures().join("tiny-llama31.gguf");
    let out = dir.path().join("merged.gguf");
    output_ok(
        teamtune()
            .args(["merge", "--format", "gguf", "--model"])
            .arg(&gguf_base)
            .arg("--adapter")
            .arg(&lora)
            .arg("--out")
            .arg(&out)
            .env("RUST_LOG", "warn"),
    );
    let modelfile = std::fs::read_to_string(dir.path().join("Modelfile")).unwrap();
    let merged = std::fs::canonicalize(&out).unwrap();
    assert!(
        modelfile.contains(&format!("\nFROM {}\n", merged.display())),
        "{modelfile}"
    );
    assert!(!modelfile.contains("ADAPTER"), "{modelfile}");
    // The merged file answers as the base with the adapter.
    let answer = |model: &std::path::Path, adapter: Option<&std::path::Path>| {
        let mut cmd = teamtune();
        cmd.args([
            "generate",
            "--raw",
            "--prompt",
            "the cat sat",
            "--max-tokens",
            "12",
            "--model",
        ])
        .arg(model)
        .env("RUST_LOG", "warn");
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(a);
        }
        String::from_utf8(output_ok(&mut cmd).stdout).unwrap()
    };
    assert_eq!(answer(&out, None), answer(&gguf_base, Some(&lora)));

    // From a Hugging Face folder too (its tokenizer written as GGUF metadata).
    let hf = tiny_model(dir.path());
    let from_hf = dir.path().join("from-hf.gguf");
    output_ok(
        teamtune()
            .args(["merge", "--format", "gguf", "--model"])
            .arg(&hf)
            .arg("--adapter")
            .arg(&lora)
            .arg("--out")
            .arg(&from_hf)
            .arg("--modelfile")
            .arg(dir.path().join("Modelfile.hf"))
            .env("RUST_LOG", "warn"),
    );
    assert_eq!(answer(&from_hf, None), answer(&hf, Some(&lora)));
}
