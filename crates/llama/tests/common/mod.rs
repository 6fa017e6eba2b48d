//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod kernels;
pub mod lora;
pub mod session;

use std::path::PathBuf;
use std::process::Command;

use candle_core::{Device, Tensor};
use serde_json::Value;
use teamtune_llama::{Llama, Mode, TokenLayout};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Fetches the default model and the Llama-3 tokenizer the way users do (idempotent) and
/// returns their paths.
pub fn fetched() -> (PathBuf, PathBuf) {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/fetch-default-model.sh"))
        .output()
        .expect("run scripts/fetch-default-model.sh");
    assert!(
        out.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines().map(PathBuf::from);
    (
        lines.next().expect("model path"),
        lines.next().expect("tokenizer path"),
    )
}

/// The default model's GGUF file.
pub fn default_model() -> PathBuf {
    fetched().0
}

/// The real Llama-3 tokenizer.json.
pub fn llama3_tokenizer() -> PathBuf {
    fetched().1
}

/// A JSON fixture, parsed.
pub fn json(relative: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(relative)).unwrap()).unwrap()
}

/// A JSON list of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Logits `[time, vocab]` of one sequence, all positions, no cache.
pub fn logits(m: &Llama, ids: &[u32], mode: Mode) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(
        &input,
        &TokenLayout::contiguous(1, ids.len(), 0),
        None,
        mode,
    )
    .unwrap()
    .squeeze(0)
    .unwrap()
}

/// Largest |a-b| / max(|b|, floor) over two equally long slices.
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}
