//! Helpers of the LoRA tests: the tiny fixture, token ids, tensors as vectors, and adapters
//! with non-zero B.

use candle_core::{DType, Device, Tensor};
use teamtune_llama::{Llama, LoraConfig};

/// The tiny LLaMA-3.1 fixture.
pub fn load(dtype: DType) -> Llama {
    teamtune_testkit::tiny_model(dtype)
}

pub fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 320).collect()
}

#[allow(unused_imports)] // each test binary uses some of them
pub use teamtune_testkit::{flat, rel_err};

/// Sets every B of adapter `name` to small deterministic non-zero values.
pub fn randomize_b(m: &Llama, name: &str, seed: u32) {
    for (k, (n, v)) in m
        .adapter(name)
        .unwrap()
        .named_vars()
        .into_iter()
        .enumerate()
    {
        if n.contains("lora_B") {
            let (out, r) = v.as_tensor().dims2().unwrap();
            let data: Vec<f32> = (0..out * r)
                .map(|i| {
                    let x = (i as u32)
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(seed.wrapping_mul(97) + k as u32 * 7919);
                    ((x % 2001) as f32 / 1000.0 - 1.0) * 0.05
                })
                .collect();
            v.set(&Tensor::from_vec(data, (out, r), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

pub fn with_adapter(config: &LoraConfig, random_b: bool) -> Llama {
    let mut m = load(DType::F32);
    m.add_adapter("a", config).unwrap();
    if random_b {
        randomize_b(&m, "a", 1);
    }
    m.set_active_adapter(Some("a")).unwrap();
    m
}
