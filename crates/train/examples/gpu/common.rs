//! What both commands use: tolerances, synthetic batches and adapters, the tiny model.

use std::path::Path;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};
use teamtune_data::Batch;
use teamtune_llama::{load_model, Llama, LoraConfig, ModelFiles};
use teamtune_train::TrainConfig;

pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    if a.dims() != b.dims() {
        bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(if scale == 0.0 { diff } else { diff / scale })
}

/// Deterministic pseudo-random token ids in `[4, vocab)` (SplitMix64).
pub(crate) fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = teamtune_seed::SplitMix64::new(seed);
    (0..n)
        .map(|_| 4 + (rng.next_u64() % (vocab as u64 - 4)) as u32)
        .collect()
}

/// A training batch of `rows` full rows of `len` ids, every token but the first trained.
pub(crate) fn full_batch(ids: Vec<u32>, rows: usize, len: usize) -> Batch {
    let n = rows * len;
    assert_eq!(ids.len(), n);
    let mut loss_mask = vec![1u8; n];
    for r in 0..rows {
        loss_mask[r * len] = 0;
    }
    Batch {
        rows,
        seq_len: len,
        input_ids: ids,
        loss_mask,
        attention_mask: vec![1; n],
        position_ids: (0..rows).flat_map(|_| 0..len as u32).collect(),
        segment_ids: vec![1; n],
        packed: false,
        examples: (0..rows).map(|r| vec![r]).collect(),
    }
}

/// Adds adapter `train` (no dropout, so both devices compute the same function) and fills its
/// B factors with small deterministic values, so that every factor gets a gradient.
pub(crate) fn add_test_adapter(model: &mut Llama, rank: usize) -> anyhow::Result<()> {
    let cfg = LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        seed: 3,
        ..Default::default()
    };
    model.add_adapter("train", &cfg)?;
    model.set_active_adapter(Some("train"))?;
    let adapter = model.adapter("train").expect("just added");
    for (i, (name, var)) in adapter.named_vars().into_iter().enumerate() {
        if name.contains("lora_B") {
            let n = var.elem_count();
            let vals: Vec<f32> = token_ids(n, 1 << 20, 100 + i as u64)
                .into_iter()
                .map(|v| (v as f32 / (1 << 20) as f32 - 0.5) * 0.02)
                .collect();
            let t = Tensor::from_vec(vals, var.shape(), &Device::Cpu)?.to_device(var.device())?;
            var.set(&t)?;
        }
    }
    Ok(())
}

pub(crate) fn train_config(checkpointing: bool, pad_id: u32) -> TrainConfig {
    let mut cfg = TrainConfig::study("train", pad_id);
    cfg.gradient_checkpointing = checkpointing;
    cfg.progress = false;
    cfg
}

pub(crate) fn load_tiny(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Llama> {
    let files = ModelFiles::resolve(&dir.to_string_lossy())?;
    Ok(load_model(&files, dtype, device)?)
}
