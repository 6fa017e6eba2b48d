//! `teamtune train` end to end on the default model: expert conversations in, a PEFT adapter,
//! metrics with the base model's step-0 evaluation and a checkpoint out.

use crate::util::{collect_conversations, fetch_default_model, run_ok as teamtune};

#[test]
fn trains_an_adapter_on_collected_conversations() {
    fetch_default_model();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let data = collect_conversations(dir.path());
    let said = teamtune(&[
        "train",
        "--data",
        &data,
        "--out",
        &p("run"),
        "--max-steps",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "1",
        "--micro-batch",
        "1",
        "--lr",
        "1e-3",
        "--validation-fraction",
        "0.5",
    ]);
    // One step, its loss and the validation losses as plain text (no Debug forms).
    assert!(said.starts_with("1 step, last loss "), "{said}");
    assert!(said.contains("; validation loss "), "{said}");
    assert!(!said.contains("Some(") && !said.contains("[("), "{said}");
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["step"], 0);
    assert!(
        lines[0]["eval_loss"].as_f64().unwrap() > 0.0,
        "step-0 evaluation of the base model"
    );
    assert!(lines
        .iter()
        .any(|l| l["step"] == 1 && l["loss"].as_f64().is_some_and(f64::is_finite)));
    let adapter = dir.path().join("run/adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"].as_f64(), Some(16.0));
    // The adapter loads back onto the base model.
    let mut m =
        teamtune_llama::LoadedModel::load("", candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    m.model.load_adapter("trained", &adapter).unwrap();
    assert!(
        dir.path()
            .join("run/checkpoints")
            .read_dir()
            .unwrap()
            .count()
            >= 1
    );

    // Training a quantised model is refused with a reason.
    let out = crate::util::teamtune()
        .args([
            "train",
            "--data",
            &data,
            "--out",
            &p("run2"),
            "--quantize",
            "q8_0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dense weights"));
}
