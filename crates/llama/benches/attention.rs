//! The training attention op alone ([`teamtune_llama::kernels::tiled_attention`], forward and
//! backward) at the default model's shape: 3 key-value heads of 3 query heads each, head size
//! 64, one causal sequence of `TEAMTUNE_BENCH_SEQ` tokens (default 2048). A training step of
//! SmolLM2-135M runs it 30 times (once per layer). Prints one JSON line: the best and the mean
//! seconds of one forward + backward over `TEAMTUNE_BENCH_REPEATS` (default 5) runs, and the
//! arithmetic rate (the seven products of the forward and the recomputing backward, causal
//! half counted).
//!
//! cargo bench -p teamtune-llama --bench attention  (threads: RAYON_NUM_THREADS)

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    teamtune_llama::share_cores_with_candle();
    let t = env_or("TEAMTUNE_BENCH_SEQ", 2048);
    let repeats = env_or("TEAMTUNE_BENCH_REPEATS", 5);
    let (groups, n_rep, d) = (3, 3, 64);
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, groups, n_rep * t, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, groups, t, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, groups, t, d), &dev)?)?;
    let causal: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t <= i / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let bias = Tensor::from_vec(causal, (1, 1, t, t), &dev)?;
    let upstream = Tensor::randn(0f32, 1.0, (1, groups, n_rep * t, d), &dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut seconds = Vec::new();
    for _ in 0..repeats + 1 {
        let start = Instant::now();
        let out = teamtune_llama::kernels::tiled_attention(&q, &k, &v, Some(&bias), scale)?;
        let grads = (out * &upstream)?.sum_all()?.backward()?;
        let dq = grads.get(&q).expect("q has a gradient");
        std::hint::black_box(dq.sum_all()?.to_scalar::<f32>()?);
        seconds.push(start.elapsed().as_secs_f64());
    }
    let timed = &seconds[1..];
    let best = timed.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = timed.iter().sum::<f64>() / timed.len() as f64;
    // Seven [rows, keys, d] products (two forward, five backward), over the causal half.
    let flops = 7.0 * 2.0 * (groups * n_rep) as f64 * (t as f64 * t as f64 / 2.0) * d as f64;
    println!(
        "{}",
        serde_json::json!({
            "seq": t,
            "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
            "best_s": best,
            "mean_s": mean,
            "gflops_best": flops / best / 1e9,
            "dtype": format!("{:?}", DType::F32).to_lowercase(),
        })
    );
    Ok(())
}
