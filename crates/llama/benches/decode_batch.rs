//! Decoding several conversations one at a time vs as one batch ([`decode_batch`]) on the
//! default model (SmolLM2-135M-Instruct, f32, CPU): 8 sessions, each holding a ~300-token
//! history in its KV cache, decode 48 greedy tokens each (no stop ids, so every row runs the
//! full 48). A second figure adds a new ~40-token user turn per session before decoding
//! (prefill of the turn included: batched prefill vs one at a time). Prints one JSON line.
//!
//! cargo bench -p teamtune-llama --bench decode_batch  (threads: RAYON_NUM_THREADS, default all
//! cores; TEAMTUNE_BENCH_MODEL for another model; TEAMTUNE_BENCH_REPEATS, default 2, best of;
//! TEAMTUNE_BENCH_HISTORY, default 300, the history length; TEAMTUNE_BENCH_QUANTIZE=q8_0 for the
//! quantised inference path; TEAMTUNE_BENCH_SESSIONS, default 8, the sessions decoded together;
//! TEAMTUNE_BENCH_ADAPTER, a PEFT adapter folder to decode with, e.g. a demo's run/adapter;
//! TEAMTUNE_BENCH_KV=f16 for an f16 KV cache)

use std::time::Instant;

use candle_core::Device;
use teamtune_llama::{
    decode_batch, default_model_path, Decoded, LoadedModel, NoFilter, SamplingParams, Session,
};

/// Sessions decoded together, unless TEAMTUNE_BENCH_SESSIONS says otherwise.
const SESSIONS: usize = 8;
const NEW_TOKENS: usize = 48;

fn main() -> anyhow::Result<()> {
    let session_count: usize = std::env::var("TEAMTUNE_BENCH_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SESSIONS);
    let path = std::env::var("TEAMTUNE_BENCH_MODEL")
        .unwrap_or_else(|_| default_model_path().display().to_string());
    let repeats: usize = std::env::var("TEAMTUNE_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let history_len: usize = std::env::var("TEAMTUNE_BENCH_HISTORY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut lm = LoadedModel::load(&path, candle_core::DType::F32, &Device::Cpu)?;
    let quantize = std::env::var("TEAMTUNE_BENCH_QUANTIZE").ok();
    if let Some(q) = &quantize {
        lm.quantize(teamtune_llama::parse_quantization(q)?)?;
    }
    if let Ok(dir) = std::env::var("TEAMTUNE_BENCH_ADAPTER") {
        lm.model.load_adapter("bench", std::path::Path::new(&dir))?;
        lm.model.set_active_adapter(Some("bench"))?;
    }
    let kv = std::env::var("TEAMTUNE_BENCH_KV").ok();
    if let Some(kv) = &kv {
        lm.model
            .set_kv_cache_storage(teamtune_llama::parse_kv_cache(kv, "TEAMTUNE_BENCH_KV")?)?;
    }
    let m = &lm.model;
    let text = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. Knowledge speaks, but wisdom listens. ".repeat(40);
    let words: Vec<&str> = text.split(' ').collect();
    // Histories of slightly different lengths around `history_len` tokens, chat-shaped.
    let mut sessions = Vec::new();
    let mut turns = Vec::new();
    for i in 0..session_count {
        let body = words[i * 3..].join(" ");
        let prompt = format!(
            "<|im_start|>system\nYou are agent {i} in a grid world.<|im_end|>\n<|im_start|>user\n{body}"
        );
        let mut ids = lm.assets.encode(&prompt, false)?;
        ids.truncate(history_len.saturating_sub(10) + 3 * i);
        ids.extend(
            lm.assets
                .encode("<|im_end|>\n<|im_start|>assistant\n", false)?,
        );
        let mut s = Session::new(m);
        s.prefill(m, &ids)?;
        sessions.push(s);
        let turn = format!(
            "Fine.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            words[10 + i..10 + i + 20 + 2 * i].join(" ")
        );
        turns.push(lm.assets.encode(&turn, false)?);
    }
    let history: Vec<usize> = sessions.iter().map(Session::len).collect();
    let turn_tokens: Vec<usize> = turns.iter().map(Vec::len).collect();
    let params = [SamplingParams::default()];

    let alone = |with_turn: bool| -> anyhow::Result<(f64, Vec<Decoded>)> {
        let mut ss: Vec<Session> = sessions.iter().map(Session::fork).collect();
        let t = Instant::now();
        let mut out = Vec::new();
        for (s, turn) in ss.iter_mut().zip(&turns) {
            if with_turn {
                s.push(turn);
            }
            out.push(s.decode(m, &mut NoFilter, &params[0], NEW_TOKENS, &[])?);
        }
        Ok((t.elapsed().as_secs_f64(), out))
    };
    let batched = |with_turn: bool| -> anyhow::Result<(f64, Vec<Decoded>)> {
        let mut ss: Vec<Session> = sessions.iter().map(Session::fork).collect();
        let t = Instant::now();
        if with_turn {
            for (s, turn) in ss.iter_mut().zip(&turns) {
                s.push(turn);
            }
        }
        let mut refs: Vec<&mut Session> = ss.iter_mut().collect();
        let out = decode_batch(m, &mut refs, &mut [], &params, &[NEW_TOKENS], &[])?;
        Ok((t.elapsed().as_secs_f64(), out))
    };
    let best = |f: &dyn Fn(bool) -> anyhow::Result<(f64, Vec<Decoded>)>,
                with_turn: bool|
     -> anyhow::Result<(f64, Vec<Decoded>)> {
        let mut best: Option<(f64, Vec<Decoded>)> = None;
        for _ in 0..repeats.max(1) {
            let (s, out) = f(with_turn)?;
            if best.as_ref().is_none_or(|(b, _)| s < *b) {
                best = Some((s, out));
            }
        }
        Ok(best.unwrap())
    };
    let generated = (session_count * NEW_TOKENS) as f64;
    let (alone_s, alone_out) = best(&alone, false)?;
    let (batch_s, batch_out) = best(&batched, false)?;
    let (turn_alone_s, turn_alone_out) = best(&alone, true)?;
    let (turn_batch_s, turn_batch_out) = best(&batched, true)?;
    let same = |a: &[Decoded], b: &[Decoded]| a.iter().zip(b).all(|(x, y)| x.tokens == y.tokens);
    let json = serde_json::json!({
        "impl": "teamtune",
        "bench": "decode_batch",
        "threads": candle_core::utils::get_num_threads(),
        "dtype": "f32",
        "quantize": quantize,
        "adapter": std::env::var("TEAMTUNE_BENCH_ADAPTER").ok(),
        "kv_cache": kv.unwrap_or_else(|| "f32".into()),
        "sessions": session_count,
        "history_tokens": history,
        "new_tokens_per_session": NEW_TOKENS,
        "alone_tok_s": generated / alone_s,
        "batched_tok_s": generated / batch_s,
        "speedup": alone_s / batch_s,
        "turn_tokens": turn_tokens,
        "turn_alone_tok_s": generated / turn_alone_s,
        "turn_batched_tok_s": generated / turn_batch_s,
        "turn_speedup": turn_alone_s / turn_batch_s,
        "same_tokens": same(&alone_out, &batch_out) && same(&turn_alone_out, &turn_batch_out),
        "note": "greedy, no stop ids, KV cache of the history reused; tok/s = generated tokens / wall time; turn_*: a new user turn is prefilled in the timed call; best of TEAMTUNE_BENCH_REPEATS",
    });
    println!("{json}");
    Ok(())
}
