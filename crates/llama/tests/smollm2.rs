//! The default model, SmolLM2-135M-Instruct from its Q4_1 GGUF, against transformers.

mod common;

use candle_core::{DType, Device};
use teamtune_llama::{generate, LoadedModel, SamplingParams};

fn chatml(user: &str) -> String {
    format!("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}

#[test]
fn answers_the_capital_of_france() {
    let path = common::default_model();
    let m = LoadedModel::load(path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let prompt = m.assets.encode(&chatml("What is the capital of France?"), false).unwrap();
    let out = generate(&m.model, &prompt, &SamplingParams::default(), 24, &m.assets.eos_token_ids, |_| true).unwrap();
    let text = m.assets.decode(&out.tokens, true).unwrap();
    eprintln!("{text:?} {:?}", out.stop);
    assert!(text.contains("Paris"), "{text}");
}
