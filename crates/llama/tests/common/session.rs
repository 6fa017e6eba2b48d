//! Helpers of the session and batched-decode tests: the tiny fixture and the default model
//! loaded once, token ids, logits from scratch, and SmolLM2's ChatML.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use teamtune_llama::{Llama, LoadedModel, SamplingParams, TokenLayout};

use super::{default_model, max_rel_err};

pub fn tiny() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| teamtune_testkit::tiny_model(DType::F32))
}

pub fn smol() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let path = default_model();
        LoadedModel::load(path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
    })
}

/// Deterministic token ids in `4..vocab` (the tiny model's ids 0-3 are special).
pub fn ids(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            4 + ((x >> 33) as u32) % (vocab - 4)
        })
        .collect()
}

/// Logits `[vocab]` after the last of `tokens`, one forward from scratch without a cache.
pub fn scratch_logits(m: &Llama, tokens: &[u32]) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward_last(&input, &TokenLayout::contiguous(1, tokens.len(), 0), None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn assert_logits_match(m: &Llama, got: &Tensor, tokens: &[u32], what: &str) {
    let want = scratch_logits(m, tokens);
    let got: Vec<f32> = got.to_vec1().unwrap();
    let err = max_rel_err(&got, &want, 1.0);
    assert!(
        err <= 1e-4,
        "{what}: max rel err {err} over {} tokens",
        tokens.len()
    );
}

/// SmolLM2's ChatML, as its template renders it (checked against transformers' renderings in
/// `chatml_helper_matches_the_model_template`).
pub fn chatml(messages: &[(&str, &str)], generation_prompt: bool) -> String {
    let mut s = String::new();
    if messages.first().is_none_or(|(r, _)| *r != "system") {
        s.push_str("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n");
    }
    for (role, content) in messages {
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    if generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

/// The tokens of a new user turn after an assistant reply that ended on `<|im_end|>` (which the
/// session already holds).
pub fn user_turn(text: &str) -> Vec<u32> {
    let s = format!("\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n");
    smol().assets.encode(&s, false).unwrap()
}

pub fn encode(text: &str) -> Vec<u32> {
    smol().assets.encode(text, false).unwrap()
}

pub fn greedy() -> SamplingParams {
    SamplingParams::default()
}
