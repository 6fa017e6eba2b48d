//! `teamtune train --init-adapter` and `teamtune improve` end to end on the tiny random Llama
//! (the demo's test model) with tiny numbers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{collect_conversations, run_ok as teamtune, teamtune as command, tiny_model};

/// Trains a small adapter into `dir/name` on `data`; returns the run folder.
fn train(model: &str, data: &str, dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out.to_str().unwrap(),
        "--lr",
        "1e-2",
        "--batch-size",
        "1",
        "--validation-fraction",
        "0.5",
        "--min-score",
        "0",
        "--max-len",
        "4096",
        "--seed",
        "3",
    ];
    args.extend_from_slice(extra);
    teamtune(&args);
    out
}

fn eval_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|m| Some((m["step"].as_u64()?, m["eval_loss"].as_f64()?)))
        .collect()
}

fn adapter_tensors(run: &Path) -> BTreeMap<String, Vec<f32>> {
    let path = run.join("adapter/adapter_model.safetensors");
    candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn train_from_an_adapter_keeps_its_weights_at_zero_steps_and_starts_from_its_loss() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();
    let data = collect_conversations(dir.path());
    let first = train(model, &data, dir.path(), "first", &["--max-steps", "3"]);
    let first_losses = eval_losses(&first);
    let (base, trained) = (first_losses[0].1, first_losses.last().unwrap().1);
    assert_ne!(base, trained, "{first_losses:?}");
    let init = first.join("adapter");
    let init = init.to_str().unwrap();

    // Zero steps from the adapter: the same weights and config come out.
    let zero = train(
        model,
        &data,
        dir.path(),
        "zero",
        &["--init-adapter", init, "--max-steps", "0"],
    );
    assert_eq!(adapter_tensors(&zero), adapter_tensors(&first));
    let config = |run: &Path| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(config(&zero), config(&first));

    // Steps from the adapter: step 0 is the adapter's own validation loss (the same split, the
    // same validation conversations as its last evaluation), not the base model's, and the
    // weights move on from there.
    let more = train(
        model,
        &data,
        dir.path(),
        "more",
        &["--init-adapter", init, "--max-steps", "2"],
    );
    let losses = eval_losses(&more);
    assert_eq!(losses[0].0, 0);
    assert!(
        (losses[0].1 - trained).abs() <= 1e-6 * trained.abs(),
        "step 0 {} vs the adapter's {trained} (base {base})",
        losses[0].1
    );
    let (a, b) = (adapter_tensors(&first), adapter_tensors(&more));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.iter().all(|(k, v)| b[k] != *v), "every factor trains");

    // A flag that asks for another shape is refused before any work, naming the flag and the
    // adapter's value; so is a folder that is not an adapter.
    for (extra, said) in [
        (
            vec!["--init-adapter", init, "--rank", "4"],
            "--rank 4 differs from the adapter's 8",
        ),
        (
            vec!["--init-adapter", init, "--alpha", "32"],
            "--alpha 32 differs from the adapter's 16",
        ),
        (
            vec!["--init-adapter", init, "--targets", "q_proj,v_proj"],
            "--targets q_proj,v_proj differs from the adapter's",
        ),
        (vec!["--init-adapter", &data], "not a LoRA adapter folder"),
    ] {
        let refused = dir.path().join("refused");
        let out = command()
            .args(["train", "--model", model, "--data", &data])
            .args(["--out", refused.to_str().unwrap()])
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(said), "{said}: {err}");
        assert!(!refused.exists(), "{extra:?} did work before failing");
    }
    // The same shape given as flags is no conflict.
    train(
        model,
        &data,
        dir.path(),
        "same",
        &["--init-adapter", init, "--max-steps", "0", "--rank", "8"],
    );
}
