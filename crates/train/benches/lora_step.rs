//! LoRA training speed and peak memory on the default model (SmolLM2-135M-Instruct, f32, CPU):
//! one sequence of `TEAMTUNE_BENCH_SEQ` tokens (default 512) per optimizer step, the study's
//! adapter (r 8, alpha 16, dropout 0.2, all seven projections), forward + backward + clipping +
//! AdamW. One warm-up step, then `TEAMTUNE_BENCH_STEPS` (default 3) timed steps.
//! `TEAMTUNE_BENCH_CHECKPOINTING=1` turns on gradient checkpointing;
//! `TEAMTUNE_BENCH_BASE_DTYPE=bf16` freezes the projections in bf16 (`--base-dtype bf16`).
//!
//! Prints one JSON line: tokens/s of the best and the mean step, the process's minor page
//! faults and system time, and its peak resident memory (model load included, as for the PEFT reference, which measures the same
//! way: scripts/bench_lora_reference.py). Run through scripts/bench-train.sh.

use std::time::Instant;

use candle_core::{DType, Device};
use teamtune_data::Batch;
use teamtune_llama::{LoadedModel, LoraConfig};
use teamtune_train::{
    accumulate, clip_grad_norm, keep_freed_memory, peak_rss_mib, AdamW, TrainConfig,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The process's minor page faults and system CPU seconds so far (`/proc/self/stat`, Linux):
/// large buffers freshly mapped and zeroed every step show up here.
fn faults_and_system_time() -> Option<(u64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, minflt 10,
    // stime 15 (in clock ticks of 1/100 s).
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let minflt = rest.get(7)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    Some((minflt, stime / 100.0))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seq: usize = env_or("TEAMTUNE_BENCH_SEQ", 512);
    let steps: usize = env_or("TEAMTUNE_BENCH_STEPS", 3);
    let checkpointing = env_or("TEAMTUNE_BENCH_CHECKPOINTING", 0u8) == 1;
    let base_dtype: String = env_or("TEAMTUNE_BENCH_BASE_DTYPE", "f32".to_string());
    // As `teamtune train` does: candle's pool shares the cores with rayon's (first, before
    // any thread starts), and freed memory stays in the process.
    teamtune_llama::share_cores_with_candle();
    keep_freed_memory();
    let mut loaded = LoadedModel::load("", DType::F32, &Device::Cpu)?;
    let model = &mut loaded.model;
    if base_dtype == "bf16" {
        model.freeze_base_in_bf16()?;
    }
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.2,
        ..LoraConfig::default()
    };
    model.add_adapter("bench", &lora)?;
    model.set_active_adapter(Some("bench"))?;
    let vars = model.adapter("bench").unwrap().named_vars();
    let mut cfg = TrainConfig::study("bench", 0);
    cfg.gradient_checkpointing = checkpointing;
    let mut opt = AdamW::new(vars.clone(), cfg.optimizer)?;
    // The same ids as the reference script: a fixed stride through the ordinary vocabulary.
    let vocab = model.config().vocab_size as u64;
    let ids: Vec<u32> = (0..seq as u64)
        .map(|i| (1000 + i * 7919 % (vocab - 2000)) as u32)
        .collect();
    let batch = Batch {
        rows: 1,
        seq_len: seq,
        input_ids: ids,
        loss_mask: vec![1; seq],
        attention_mask: vec![1; seq],
        position_ids: (0..seq as u32).collect(),
        segment_ids: vec![1; seq],
        packed: false,
        examples: vec![vec![0]],
    };
    // As `teamtune train` does: the steps run on one of rayon's workers, unless
    // TEAMTUNE_BENCH_MAIN_THREAD=1 (the calling thread, for comparison).
    let mut timed = || -> Result<Vec<f64>, Box<dyn std::error::Error + Send + Sync>> {
        let mut times = Vec::new();
        for step in 0..=steps {
            let started = Instant::now();
            let (_, mut grads) =
                accumulate(model, std::slice::from_ref(&batch), &vars, &cfg, step)?;
            clip_grad_norm(&mut grads, &vars, 0.3)?;
            opt.step(&grads, 5e-5)?;
            if step > 0 {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        Ok(times)
    };
    let times = if std::env::var_os("TEAMTUNE_BENCH_MAIN_THREAD").is_some() {
        timed()
    } else {
        teamtune_llama::on_compute_threads(timed)
    }
    .map_err(|e| e.to_string())?;
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "teamtune",
            "seq": seq,
            "gradient_checkpointing": checkpointing,
            "base_dtype": base_dtype,
            "threads": std::env::var("RAYON_NUM_THREADS").ok(),
            "steps": steps,
            "tokens_per_s_best": seq as f64 / best,
            "tokens_per_s_mean": seq as f64 / mean,
            "step_s": times,
            "peak_rss_mib": peak_rss_mib(),
            "minor_faults": faults_and_system_time().map(|f| f.0),
            "system_s": faults_and_system_time().map(|f| f.1),
        })
    );
    Ok(())
}
