//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod kernels;
pub mod lora;
pub mod session;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;
use teamtune_llama::{Llama, Mode, TokenLayout};

#[allow(unused_imports)] // each test binary uses some of them
pub use teamtune_testkit::{default_model, fixtures, json, max_rel_err};

/// The real Llama-3 tokenizer.json (downloaded on first use).
pub fn llama3_tokenizer() -> PathBuf {
    teamtune_testkit::downloaded().llama3_tokenizer.clone()
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
