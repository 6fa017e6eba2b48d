//! Prefill and decode throughput on the default model (SmolLM2-135M-Instruct, f32, CPU), with
//! the same prompt length and token counts as scripts/bench_reference.py measures for
//! transformers. Prints one JSON object; docs/BENCHMARKS.md holds the figures.
//!
//! cargo bench -p teamtune-llama --bench smollm2  (threads: RAYON_NUM_THREADS, default all cores;
//! TEAMTUNE_BENCH_DTYPE=bf16 for half-width weights, TEAMTUNE_BENCH_QUANTIZE=q8_0 (or q4_0, bf16,
//! gguf: the file's own blocks) for the quantised inference path, TEAMTUNE_BENCH_KV=f16 for an f16
//! KV cache (llama.cpp's default), TEAMTUNE_BENCH_DECODE_TOKENS for another number of decoded
//! tokens, default 128)

use std::time::Instant;

use candle_core::{Device, Tensor};
use teamtune_llama::{default_model_path, LoadedModel, TokenLayout};

const PREFILL_TOKENS: usize = 512;
const DECODE_TOKENS: usize = 128;

fn decode_tokens() -> usize {
    std::env::var("TEAMTUNE_BENCH_DECODE_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DECODE_TOKENS)
}

fn main() -> anyhow::Result<()> {
    // As the binary does, before any thread starts.
    teamtune_llama::share_cores_with_candle();
    let path = std::env::var("TEAMTUNE_BENCH_MODEL")
        .unwrap_or_else(|_| default_model_path().display().to_string());
    let dtype_name = std::env::var("TEAMTUNE_BENCH_DTYPE").unwrap_or_else(|_| "f32".into());
    let dtype = teamtune_llama::parse_dtype(&dtype_name, &Device::Cpu)?;
    let mut m = LoadedModel::load(&path, dtype, &Device::Cpu)?;
    let quantize = std::env::var("TEAMTUNE_BENCH_QUANTIZE").ok();
    if let Some(q) = &quantize {
        m.quantize(teamtune_llama::parse_quantization(q)?)?;
    }
    let kv = std::env::var("TEAMTUNE_BENCH_KV").ok();
    if let Some(kv) = &kv {
        m.model
            .set_kv_cache_storage(teamtune_llama::parse_kv_cache(kv, "TEAMTUNE_BENCH_KV")?)?;
    }
    // The prompt of scripts/bench_reference.py: repeated text cut to exactly PREFILL_TOKENS ids.
    let text = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. ".repeat(64);
    let ids: Vec<u32> = m.assets.encode(&text, false)?[..PREFILL_TOKENS].to_vec();

    // As the binary does: the model runs on one of rayon's workers, unless
    // TEAMTUNE_BENCH_MAIN_THREAD=1 (the calling thread, for comparison).
    let timed = || -> anyhow::Result<(f64, f64)> {
        let prefill = |cache: &mut teamtune_llama::KvCache| -> anyhow::Result<Tensor> {
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            Ok(m.model.forward_last(
                &input,
                &TokenLayout::contiguous(1, ids.len(), 0),
                Some(cache),
            )?)
        };
        // Warm-up, then best of 3.
        prefill(&mut m.model.new_cache(1))?;
        let mut best_prefill = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            prefill(&mut m.model.new_cache(1))?;
            best_prefill = best_prefill.min(t.elapsed().as_secs_f64());
        }

        // Decode: greedy, one token at a time with the KV cache, after a 512-token prefill;
        // the prefill is not counted.
        let mut best_decode = f64::MAX;
        for _ in 0..2 {
            let mut cache = m.model.new_cache(1);
            let mut logits = prefill(&mut cache)?;
            let t = Instant::now();
            for _ in 0..decode_tokens() {
                let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
                let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
                let layout = TokenLayout::contiguous(1, 1, cache.next_positions()[0]);
                logits = m.model.forward_last(&input, &layout, Some(&mut cache))?;
            }
            best_decode = best_decode.min(t.elapsed().as_secs_f64());
        }
        Ok((best_prefill, best_decode))
    };
    let (best_prefill, best_decode) = if std::env::var_os("TEAMTUNE_BENCH_MAIN_THREAD").is_some() {
        timed()?
    } else {
        teamtune_llama::on_compute_threads(timed)?
    };
    let json = serde_json::json!({
        "impl": "teamtune",
        "threads": candle_core::utils::get_num_threads(),
        "dtype": dtype_name,
        "quantize": quantize,
        "kv_cache": kv.unwrap_or_else(|| "f32".into()),
        "prefill_tokens": PREFILL_TOKENS,
        "prefill_tok_s": PREFILL_TOKENS as f64 / best_prefill,
        "decode_tokens": decode_tokens(),
        "decode_tok_s": decode_tokens() as f64 / best_decode,
        "decode_note": "manual greedy loop with KV cache after a 512-token prefill, prefill excluded, best of 2",
    });
    println!("{json}");
    Ok(())
}
