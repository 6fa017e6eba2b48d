//! `bench`: LLaMA-3.1-8B-shaped random weights, training and decoding speed and memory.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as IoWrite;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use teamtune_llama::{parse_device, Llama, LlamaConfig, LoraConfig, TokenLayout, WeightSource};
use teamtune_train::{accumulate, AdamW, AdamWParams};

use crate::common::*;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// cuda, cuda:N or cpu.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Model shape: `8b` (LLaMA-3.1-8B) or `tiny` (a smoke test that runs on a CPU).
    #[arg(long, default_value = "8b")]
    pub config: String,
    /// f32, bf16 or f16 (auto: bf16 on a GPU, f32 on the CPU).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Tokens per training sequence (one sequence per step), comma-separated.
    #[arg(long, default_value = "2048,8192", value_delimiter = ',')]
    pub seq: Vec<usize>,
    /// Batch sizes of the prefill and decode measurements, comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 1024)]
    pub prefill_len: usize,
    /// Tokens decoded per row in the decode measurement.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// LoRA rank (all seven projections of every layer).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Timed training steps per configuration (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Where the random weights are written and memory-mapped back (default: a temp dir).
    #[arg(long)]
    pub weights_dir: Option<PathBuf>,
    /// Keep the random weights in `--weights-dir` and reuse them when they are already there
    /// (several bench runs, one weight file).
    #[arg(long, requires = "weights_dir")]
    pub reuse_weights: bool,
    /// Write the markdown table here too (it always goes to stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub skip_train: bool,
    #[arg(long)]
    pub skip_infer: bool,
}

const LLAMA31_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
  "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
  "rope_theta": 500000.0,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu", "attention_bias": false, "mlp_bias": false, "torch_dtype": "bfloat16"
}"#;

const TINY: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
  "vocab_size": 512, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
  "rope_theta": 500000.0,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "attention_bias": false, "mlp_bias": false
}"#;

/// Every weight of `c` as (name, shape), in HF names.
fn weight_shapes(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (nq, nkv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_owned(),
            vec![c.vocab_size, h],
        ),
        ("model.norm.weight".to_owned(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_owned(), vec![c.vocab_size, h]));
    }
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
            ("self_attn.q_proj", vec![nq, h]),
            ("self_attn.k_proj", vec![nkv, h]),
            ("self_attn.v_proj", vec![nkv, h]),
            ("self_attn.o_proj", vec![h, nq]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            out.push((format!("{p}.{name}.weight"), shape));
        }
    }
    out
}

/// Random weights (normal, std 0.02; norms 1) made on `device` in `dtype`, written as one
/// safetensors file in `dir` (the model loader reads files), and the config.
fn random_model(
    config_json: &str,
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(LlamaConfig, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config_json)?;
    let config = LlamaConfig::from_json_str(config_json, &config_path)?;
    let file = dir.join("model.safetensors");
    let t0 = Instant::now();
    if !device.is_cpu() {
        device.set_seed(1234)?;
    }
    let mut tensors = HashMap::new();
    for (name, shape) in weight_shapes(&config) {
        let t = if shape.len() == 1 {
            Tensor::ones(shape, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
        };
        tensors.insert(name, t);
    }
    device.synchronize()?;
    let made = t0.elapsed().as_secs_f64();
    candle_core::safetensors::save(&tensors, &file)?;
    drop(tensors);
    eprintln!(
        "random weights: made on {device:?} in {made:.1} s, written to {} in {:.1} s",
        file.display(),
        t0.elapsed().as_secs_f64() - made
    );
    Ok((config, file))
}

/// Peak device memory in use while a closure runs: cuMemGetInfo polled on a thread (whole
/// device, every process); on the CPU, the process's peak resident set.
struct PeakMemory {
    #[cfg(feature = "cuda")]
    cuda: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<usize>,
    )>,
}

impl PeakMemory {
    fn start(device: &Device) -> Self {
        if device.is_cpu() {
            teamtune_train::reset_peak();
        }
        #[cfg(feature = "cuda")]
        {
            let cuda = device.as_cuda_device().ok().map(|d| {
                let ctx = d.cuda_stream().context().clone();
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let flag = stop.clone();
                let handle = std::thread::spawn(move || {
                    let mut peak = 0usize;
                    while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok((free, total)) = ctx.mem_get_info() {
                            peak = peak.max(total - free);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    peak
                });
                (stop, handle)
            });
            PeakMemory { cuda }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            PeakMemory {}
        }
    }

    /// Peak in GiB, if measurable.
    fn stop(self) -> Option<f64> {
        #[cfg(feature = "cuda")]
        if let Some((stop, handle)) = self.cuda {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            return handle.join().ok().map(|b| b as f64 / (1u64 << 30) as f64);
        }
        teamtune_train::peak_rss_mib().map(|m| m / 1024.0)
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

pub fn run_bench(args: BenchArgs, out: &mut dyn IoWrite) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let dtype = teamtune_llama::parse_dtype(&args.dtype, &device)?;
    let config_json = match args.config.as_str() {
        "8b" => LLAMA31_8B,
        "tiny" => TINY,
        other => bail!("--config {other}: expected 8b or tiny"),
    };
    let tmp;
    let dir = match &args.weights_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    let (config, file) = if args.reuse_weights && dir.join("model.safetensors").exists() {
        let path = dir.join("config.json");
        let config = LlamaConfig::from_file(&path)?;
        eprintln!("reusing the random weights in {}", dir.display());
        (config, dir.join("model.safetensors"))
    } else {
        random_model(config_json, &dir, dtype, &device)?
    };
    let t0 = Instant::now();
    let mut model = Llama::load(
        &config,
        &WeightSource::safetensors(vec![file.clone()])?,
        dtype,
        &device,
    )?;
    device.synchronize()?;
    eprintln!(
        "loaded on {device:?} in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if args.weights_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let params: usize = weight_shapes(&config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();

    let mut md = String::new();
    writeln!(
        md,
        "### gpu-bench: `{}` shape ({:.1}M parameters, random weights), {dtype:?} base, device `{}`\n",
        args.config,
        params as f64 / 1e6,
        args.device
    )?;
    if !args.skip_train {
        let lora = LoraConfig {
            rank: args.rank,
            alpha: 2.0 * args.rank as f64,
            dropout: 0.05,
            seed: 1,
            ..Default::default()
        };
        model.add_adapter("train", &lora)?;
        model.set_active_adapter(Some("train"))?;
        let vars = model.adapter("train").unwrap().named_vars();
        let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        writeln!(
            md,
            "LoRA training: rank {} on q,k,v,o,gate,up,down ({:.1}M f32 parameters, AdamW), one \
             sequence per step, every token trained; {} timed steps after one warm-up.\n",
            args.rank,
            trainable as f64 / 1e6,
            args.steps
        )?;
        writeln!(
            md,
            "| tokens/seq | grad. checkpointing | tokens/s | s/step | peak memory (GiB) |"
        )?;
        writeln!(md, "|---:|:---:|---:|---:|---:|")?;
        for &seq in &args.seq {
            for ckpt in [false, true] {
                let row = train_bench(&mut model, &vars, seq, ckpt, args.steps, &device);
                let (tps, sps, peak) = match row {
                    Ok(r) => (
                        format!("{:.0}", r.0),
                        format!("{:.2}", r.1),
                        fmt_opt(r.2, 2),
                    ),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        eprintln!("train seq {seq} ckpt {ckpt}: {msg}");
                        let short =
                            if msg.contains("OUT_OF_MEMORY") || msg.contains("out of memory") {
                                "OOM".to_owned()
                            } else {
                                "error".to_owned()
                            };
                        (short, "-".into(), "-".into())
                    }
                };
                writeln!(
                    md,
                    "| {seq} | {} | {tps} | {sps} | {peak} |",
                    if ckpt { "yes" } else { "no" }
                )?;
                eprintln!("{}", md.lines().last().unwrap_or(""));
            }
        }
        model.set_active_adapter(None)?;
        model.remove_adapter("train");
        writeln!(md)?;
    }
    if !args.skip_infer {
        writeln!(
            md,
            "Inference (no adapter, KV cache): prefill of {} tokens per row; decode of {} tokens \
             per row after it (greedy, one forward per token, argmax read back each step).\n",
            args.prefill_len, args.decode_tokens
        )?;
        writeln!(
            md,
            "| batch | prefill tokens/s | decode tokens/s | peak memory (GiB) |"
        )?;
        writeln!(md, "|---:|---:|---:|---:|")?;
        for &b in &args.batch {
            let row = infer_bench(&model, b, args.prefill_len, args.decode_tokens, &device);
            match row {
                Ok((p, d, peak)) => {
                    writeln!(md, "| {b} | {p:.0} | {d:.1} | {} |", fmt_opt(peak, 2))?
                }
                Err(e) => {
                    eprintln!("infer batch {b}: {e:#}");
                    writeln!(md, "| {b} | error | error | - |")?
                }
            }
            eprintln!("{}", md.lines().last().unwrap_or(""));
        }
    }
    out.write_all(md.as_bytes())?;
    out.flush()?;
    if let Some(out) = &args.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("teamtune-gpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// (tokens/s, seconds per step, peak GiB) of LoRA training steps on one `seq`-token sequence.
fn train_bench(
    model: &mut Llama,
    vars: &[(String, candle_core::Var)],
    seq: usize,
    ckpt: bool,
    steps: usize,
    device: &Device,
) -> anyhow::Result<(f64, f64, Option<f64>)> {
    let vocab = model.config().vocab_size;
    let batch = full_batch(token_ids(seq, vocab, seq as u64), 1, seq);
    let cfg = train_config(ckpt, 0);
    let mut opt = AdamW::new(vars.to_vec(), AdamWParams::default())?;
    let mut step = |i: usize| -> anyhow::Result<f64> {
        let (loss, grads) = accumulate(model, std::slice::from_ref(&batch), vars, &cfg, i)?;
        opt.step(&grads, 1e-5)?;
        drop(grads);
        device.synchronize()?;
        Ok(loss)
    };
    let peak = PeakMemory::start(device);
    let timed = (|| -> anyhow::Result<f64> {
        step(0)?;
        let t0 = Instant::now();
        for i in 0..steps {
            step(i + 1)?;
        }
        Ok(t0.elapsed().as_secs_f64() / steps.max(1) as f64)
    })();
    // Stopped whatever happened (an out-of-memory step must not leave the poller running).
    let peak = peak.stop();
    let secs = timed?;
    Ok((seq as f64 / secs, secs, peak))
}

/// (prefill tokens/s, decode tokens/s, peak GiB) at batch `b`.
fn infer_bench(
    model: &Llama,
    b: usize,
    prefill: usize,
    decode: usize,
    device: &Device,
) -> anyhow::Result<(f64, f64, Option<f64>)> {
    let vocab = model.config().vocab_size;
    let run = |prefill: usize, decode: usize| -> anyhow::Result<(f64, f64)> {
        let ids = token_ids(b * prefill, vocab, 99);
        let mut cache = model.new_cache(b);
        device.synchronize()?;
        let t0 = Instant::now();
        let mut logits = model.forward_last(
            &Tensor::from_vec(ids, (b, prefill), device)?,
            &TokenLayout::contiguous(b, prefill, 0),
            Some(&mut cache),
        )?;
        device.synchronize()?;
        let t_prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for i in 0..decode {
            let next: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
            logits = model.forward_last(
                &Tensor::from_vec(next, (b, 1), device)?,
                &TokenLayout::contiguous(b, 1, (prefill + i) as u32),
                Some(&mut cache),
            )?;
        }
        let _: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let t_decode = t1.elapsed().as_secs_f64();
        Ok((t_prefill, t_decode))
    };
    run(prefill.min(64), 4)?; // warm-up: kernels loaded, allocator primed
    let peak = PeakMemory::start(device);
    let timed = run(prefill, decode);
    let peak = peak.stop();
    let (tp, td) = timed?;
    Ok((
        (b * prefill) as f64 / tp,
        (b * decode) as f64 / td.max(1e-9),
        peak,
    ))
}
