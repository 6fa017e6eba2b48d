//! The GPU developer harness: parity checks and a benchmark for a `--features cuda` build. Not
//! part of the `teamtune` binary; `scripts/gpu/build-cuda.sh` builds it next to `teamtune` and
//! packs it as `bin/teamtune-gpu`, and `scripts/gpu/check.sh` and `bench.sh` run it:
//!
//! ```sh
//! cargo run --release -p teamtune-train --example gpu -- check --device cpu --reference cpu \
//!     --tiny crates/llama/tests/fixtures/tiny-llama31 --skip-model
//! cargo run --release -p teamtune-train --example gpu --features cuda -- bench --device cuda
//! ```
//!
//! - `check`: the device under test against a reference device (CUDA against the CPU):
//!   logits of the tiny model (inference and training forwards), LoRA gradients through the
//!   training step (plain and checkpointed), the default model's greedy continuation, and a
//!   few bf16 training steps whose loss must track f32 (frozen base bf16, LoRA factors and
//!   optimizer moments f32). `--device cpu --reference cpu` exercises every check on a machine
//!   without a GPU (the tests below do).
//! - `bench`: random weights of LLaMA-3.1-8B's shape made on the device (no download):
//!   LoRA training tokens/s and peak memory per sequence length, with and without gradient
//!   checkpointing; prefill and decode tokens/s per batch size; a markdown table.
//!   `--config tiny` runs the same code on a tiny shape (a CPU smoke test).
//!
//! Its token ids come from its own SplitMix64 ([`token_ids`]), not the llama crate's generator.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as IoWrite;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use teamtune_data::Batch;
use teamtune_llama::{
    generate, load_model, parse_device, Llama, LlamaConfig, LoadedModel, LoraConfig, Mode,
    ModelFiles, SamplingParams, TokenLayout, WeightSource,
};
use teamtune_train::{accumulate, AdamW, AdamWParams, TrainConfig};

#[derive(Parser)]
#[command(
    name = "teamtune-gpu",
    about = "GPU developer checks and benchmark for teamtune (scripts/gpu/check.sh, bench.sh)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Device vs reference parity (scripts/gpu/check.sh).
    Check(CheckArgs),
    /// LLaMA-3.1-8B-shaped random weights: training and inference speed (scripts/gpu/bench.sh).
    Bench(BenchArgs),
}

/// candle's barrier-pool workers park after a short spin, as in the `teamtune` binary.
const CANDLE_SPIN_LIMIT: &str = "100";

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    run(Cli::parse(), &mut std::io::stdout())
}

/// Runs a parsed command, its results (PASS/FAIL lines, the table) written to `out`.
fn run(cli: Cli, out: &mut dyn IoWrite) -> anyhow::Result<()> {
    match cli.command {
        Command::Check(args) => run_check(args, out),
        Command::Bench(args) => run_bench(args, out),
    }
}

// ---------------------------------------------------------------------------------------------
// check

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The device under test: cuda, cuda:N (or cpu, to exercise the checks without a GPU).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// The device whose results are the reference.
    #[arg(long, default_value = "cpu")]
    pub reference: String,
    /// A tiny model folder (HF layout) for the logits and gradient checks.
    #[arg(long)]
    pub tiny: PathBuf,
    /// The model of the greedy-continuation check ("" = the default model).
    #[arg(long, default_value = "")]
    pub model: String,
    /// Skip the checks on `--model` (no default model on this machine).
    #[arg(long)]
    pub skip_model: bool,
    /// Greedy tokens compared on `--model`.
    #[arg(long, default_value_t = 24)]
    pub greedy_tokens: usize,
    /// Optimizer steps of the bf16-vs-f32 training check.
    #[arg(long, default_value_t = 4)]
    pub train_steps: usize,
}

/// One check's outcome, written as a line and gathered for the exit status.
struct Report<'a> {
    out: &'a mut dyn IoWrite,
    failed: Vec<String>,
}

impl Report<'_> {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        self.say(format_args!(
            "{} {name}: {detail}",
            if ok { "PASS" } else { "FAIL" }
        ));
        if !ok {
            self.failed.push(name.to_owned());
        }
    }

    /// One line of output (as `println!` would write it to stdout).
    fn say(&mut self, line: std::fmt::Arguments) {
        // A closed output (a pipe whose reader left) must not hide the checks' exit status.
        let _ = writeln!(self.out, "{line}");
    }
}

/// `max |a - b| / max |b|` over all elements (0 when both are all zero).
fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
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
fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = teamtune_seed::SplitMix64::new(seed);
    (0..n)
        .map(|_| 4 + (rng.next_u64() % (vocab as u64 - 4)) as u32)
        .collect()
}

/// A training batch of `rows` full rows of `len` ids, every token but the first trained.
fn full_batch(ids: Vec<u32>, rows: usize, len: usize) -> Batch {
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
fn add_test_adapter(model: &mut Llama, rank: usize) -> anyhow::Result<()> {
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

fn train_config(checkpointing: bool, pad_id: u32) -> TrainConfig {
    let mut cfg = TrainConfig::study("train", pad_id);
    cfg.gradient_checkpointing = checkpointing;
    cfg.progress = false;
    cfg
}

fn load_tiny(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Llama> {
    let files = ModelFiles::resolve(&dir.to_string_lossy())?;
    Ok(load_model(&files, dtype, device)?)
}

pub fn run_check(args: CheckArgs, out: &mut dyn IoWrite) -> anyhow::Result<()> {
    let dev = parse_device(&args.device)?;
    let reference = parse_device(&args.reference)?;
    let mut report = Report {
        out,
        failed: Vec::new(),
    };
    report.say(format_args!(
        "gpu-check: device {} against {}",
        args.device, args.reference
    ));

    // 1. Tiny model, f32: logits of the inference and training forwards at every position.
    let ref_model = load_tiny(&args.tiny, DType::F32, &reference)?;
    let dev_model = load_tiny(&args.tiny, DType::F32, &dev)?;
    let vocab = ref_model.config().vocab_size;
    let (rows, len) = (2, 48);
    let ids = token_ids(rows * len, vocab, 1);
    let layout = TokenLayout::contiguous(rows, len, 0);
    for mode in [Mode::Inference, Mode::Training] {
        let r = ref_model.forward(
            &Tensor::from_slice(&ids, (rows, len), &reference)?,
            &layout,
            None,
            mode,
        )?;
        let d = dev_model.forward(
            &Tensor::from_slice(&ids, (rows, len), &dev)?,
            &layout,
            None,
            mode,
        )?;
        let e = rel_err(&d, &r)?;
        report.check(
            &format!("tiny-logits-f32-{mode:?}").to_lowercase(),
            e < 1e-4,
            format!("max rel err {e:.2e} (bound 1e-4), {rows}x{len} tokens, every position"),
        );
    }
    // KV-cached decoding: prefill 40 tokens, then 8 one at a time, against the full forward.
    {
        let mut cache = dev_model.new_cache(1);
        let prefix = &ids[..40];
        let mut last = dev_model.forward_last(
            &Tensor::from_slice(prefix, (1, 40), &dev)?,
            &TokenLayout::contiguous(1, 40, 0),
            Some(&mut cache),
        )?;
        for (i, &t) in ids[40..48].iter().enumerate() {
            last = dev_model.forward_last(
                &Tensor::from_slice(&[t], (1, 1), &dev)?,
                &TokenLayout::contiguous(1, 1, 40 + i as u32),
                Some(&mut cache),
            )?;
        }
        let full = ref_model.forward(
            &Tensor::from_slice(&ids[..48], (1, 48), &reference)?,
            &TokenLayout::contiguous(1, 48, 0),
            None,
            Mode::Inference,
        )?;
        let e = rel_err(&last, &full.narrow(1, 47, 1)?.squeeze(1)?)?;
        report.check(
            "tiny-kv-cache-f32",
            e < 1e-4,
            format!("cached decode on device vs full forward on reference: {e:.2e} (bound 1e-4)"),
        );
    }

    // 2. LoRA gradients through the training step, plain and checkpointed.
    let mut ref_model = ref_model;
    let mut dev_model = dev_model;
    add_test_adapter(&mut ref_model, 4)?;
    add_test_adapter(&mut dev_model, 4)?;
    let batch = full_batch(ids.clone(), rows, len);
    let ref_vars = ref_model.adapter("train").unwrap().named_vars();
    let dev_vars = dev_model.adapter("train").unwrap().named_vars();
    let (ref_loss, ref_grads) = accumulate(
        &mut ref_model,
        std::slice::from_ref(&batch),
        &ref_vars,
        &train_config(false, 0),
        0,
    )?;
    for ckpt in [false, true] {
        let (loss, grads) = accumulate(
            &mut dev_model,
            std::slice::from_ref(&batch),
            &dev_vars,
            &train_config(ckpt, 0),
            0,
        )?;
        let mut worst = (0f64, String::new());
        let mut missing = 0;
        let mut zero = 0;
        for ((name, rv), (_, dv)) in ref_vars.iter().zip(&dev_vars) {
            let (Some(rg), Some(dg)) = (ref_grads.get(rv.as_tensor()), grads.get(dv.as_tensor()))
            else {
                missing += 1;
                continue;
            };
            if dg
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                == 0.0
            {
                zero += 1;
            }
            let e = rel_err(dg, rg)?;
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        let loss_err = (loss - ref_loss).abs() / ref_loss.abs().max(1e-12);
        let tag = if ckpt { "checkpointed" } else { "plain" };
        report.check(
            &format!("tiny-lora-grads-{tag}"),
            worst.0 < 1e-3 && loss_err < 1e-5 && missing == 0 && zero == 0,
            format!(
                "{} factors, worst rel err {:.2e} ({}) (bound 1e-3), loss {loss:.6} vs {ref_loss:.6} \
                 (rel {loss_err:.1e}, bound 1e-5), {missing} without gradient, {zero} all-zero",
                dev_vars.len(),
                worst.0,
                worst.1
            ),
        );
    }

    // 3. The default model: greedy continuation on the device (f32) identical to the reference.
    if !args.skip_model {
        check_greedy(&args, &dev, &reference, &mut report)?;
        train_bf16(
            &mut report,
            &dev,
            || {
                let files = ModelFiles::resolve(&args.model)?;
                Ok(files)
            },
            args.train_steps,
            256,
        )?;
    } else {
        report.say(format_args!("SKIP default-model checks (--skip-model)"));
        train_bf16(
            &mut report,
            &dev,
            || Ok(ModelFiles::resolve(&args.tiny.to_string_lossy())?),
            args.train_steps,
            48,
        )?;
    }

    if report.failed.is_empty() {
        report.say(format_args!("gpu-check: all checks passed"));
        Ok(())
    } else {
        bail!("gpu-check: failed: {}", report.failed.join(", "))
    }
}

fn check_greedy(
    args: &CheckArgs,
    dev: &Device,
    reference: &Device,
    report: &mut Report,
) -> anyhow::Result<()> {
    let r = LoadedModel::load(&args.model, DType::F32, reference)?;
    let prompt = r
        .assets
        .tokenizer
        .encode("The three primary colours are", false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        .get_ids()
        .to_vec();
    let eos = r.model.config().eos_token_ids.clone();
    let greedy = SamplingParams::default();
    let run = |m: &Llama| -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::new();
        generate(m, &prompt, &greedy, args.greedy_tokens, &eos, |t| {
            out.push(t);
            true
        })?;
        Ok(out)
    };
    let want = run(&r.model)?;
    drop(r);
    for dtype in [DType::F32, DType::BF16] {
        let d = LoadedModel::load(&args.model, dtype, dev)?;
        let got = run(&d.model)?;
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let text = d.assets.tokenizer.decode(&got, false).unwrap_or_default();
        if dtype == DType::F32 {
            report.check(
                "model-greedy-f32",
                got == want,
                format!(
                    "{same}/{} tokens identical to the reference: {text:?}",
                    want.len()
                ),
            );
        } else {
            // bf16 rounds differently from f32: reported, not required to match.
            report.say(format_args!(
                "INFO model-greedy-bf16: first {same}/{} tokens equal to the f32 reference: {text:?}",
                want.len()
            ));
        }
    }
    Ok(())
}

/// A few AdamW steps on one fixed batch, frozen base in bf16 and in f32, same adapter init:
/// the bf16 loss must track the f32 one. Also checks the dtypes: base bf16, LoRA factors, their
/// gradients and the optimizer moments f32.
fn train_bf16(
    report: &mut Report,
    dev: &Device,
    files: impl Fn() -> anyhow::Result<ModelFiles>,
    steps: usize,
    len: usize,
) -> anyhow::Result<()> {
    let mut losses: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut dtype_problems = Vec::new();
    for (tag, dtype) in [("f32", DType::F32), ("bf16", DType::BF16)] {
        let mut model = load_model(&files()?, dtype, dev)?;
        if model.dtype() != dtype {
            dtype_problems.push(format!("{tag}: model dtype {:?}", model.dtype()));
        }
        add_test_adapter(&mut model, 8)?;
        let vocab = model.config().vocab_size;
        let batch = full_batch(token_ids(len, vocab, 7), 1, len);
        let vars = model.adapter("train").unwrap().named_vars();
        for (name, v) in &vars {
            if v.dtype() != DType::F32 {
                dtype_problems.push(format!("{tag}: {name} is {:?}", v.dtype()));
            }
        }
        let cfg = train_config(false, 0);
        let mut opt = AdamW::new(vars.clone(), AdamWParams::default())?;
        let mut curve = Vec::new();
        for step in 0..steps {
            let (loss, grads) =
                accumulate(&mut model, std::slice::from_ref(&batch), &vars, &cfg, step)?;
            for (name, v) in &vars {
                match grads.get(v.as_tensor()) {
                    Some(g) if g.dtype() == DType::F32 => {}
                    Some(g) => {
                        dtype_problems.push(format!("{tag}: grad of {name} is {:?}", g.dtype()))
                    }
                    None => dtype_problems.push(format!("{tag}: no grad for {name}")),
                }
            }
            opt.step(&grads, 1e-3)?;
            curve.push(loss);
        }
        // Optimizer moments, as saved: f32 whatever the base dtype.
        let tmp =
            std::env::temp_dir().join(format!("teamtune-gpu-check-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        opt.save(&tmp)?;
        let moments =
            candle_core::safetensors::load(tmp.join("optimizer.safetensors"), &Device::Cpu)?;
        for (name, t) in &moments {
            if t.dtype() != DType::F32 {
                dtype_problems.push(format!("{tag}: optimizer {name} is {:?}", t.dtype()));
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
        report.say(format_args!("INFO train-{tag}: losses {curve:.4?}"));
        losses.insert(tag, curve);
    }
    let (f, b) = (&losses["f32"], &losses["bf16"]);
    let worst = f
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(1e-12))
        .fold(0f64, f64::max);
    let decreased = b.last() < b.first();
    report.check(
        "train-bf16-tracks-f32",
        worst < 0.02 && decreased && b.iter().all(|x| x.is_finite()),
        format!("{steps} steps, worst rel loss diff {worst:.2e} (bound 2e-2), bf16 loss decreasing: {decreased}"),
    );
    report.check(
        "train-dtypes",
        dtype_problems.is_empty(),
        if dtype_problems.is_empty() {
            "base in the requested dtype (bf16/f32); LoRA factors, gradients and AdamW moments f32"
                .into()
        } else {
            dtype_problems.join("; ")
        },
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench

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
            teamtune_train::memory::reset_peak();
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
        teamtune_train::memory::peak_rss_mib().map(|m| m / 1024.0)
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

/// The harness on the CPU (device = reference = cpu), so its logic is exercised without a GPU:
/// `check` on the tiny model and `bench --config tiny`. (These were `crates/cli/tests/gpu.rs`
/// when the harness was the hidden `teamtune gpu-check`/`gpu-bench`.)
#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../llama/tests/fixtures/tiny-llama31")
            .to_string_lossy()
            .into_owned()
    }

    /// Parses `teamtune-gpu ARGS...` and runs it; its output and result.
    fn run_args(args: &[&str]) -> (String, anyhow::Result<()>) {
        let cli = Cli::try_parse_from(std::iter::once("teamtune-gpu").chain(args.iter().copied()))
            .unwrap();
        let mut out = Vec::new();
        let result = run(cli, &mut out);
        (String::from_utf8(out).unwrap(), result)
    }

    /// Runs `teamtune-gpu ARGS...`, asserts success and returns its output.
    fn run_ok(args: &[&str]) -> String {
        let (out, result) = run_args(args);
        if let Err(e) = result {
            panic!("{e:#}\n{out}");
        }
        out
    }

    #[test]
    fn gpu_check_passes_cpu_against_cpu() {
        let out = run_ok(&[
            "check",
            "--device",
            "cpu",
            "--reference",
            "cpu",
            "--tiny",
            &tiny(),
            "--skip-model",
        ]);
        for check in [
            "tiny-logits-f32-inference",
            "tiny-logits-f32-training",
            "tiny-kv-cache-f32",
            "tiny-lora-grads-plain",
            "tiny-lora-grads-checkpointed",
            "train-bf16-tracks-f32",
            "train-dtypes",
        ] {
            assert!(
                out.contains(&format!("PASS {check}:")),
                "{check} missing in:\n{out}"
            );
        }
        assert!(!out.contains("FAIL"), "{out}");
        assert!(out.contains("all checks passed"), "{out}");
    }

    #[test]
    fn gpu_bench_tiny_writes_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("bench.md");
        let out = run_ok(&[
            "bench",
            "--device",
            "cpu",
            "--config",
            "tiny",
            "--seq",
            "32",
            "--batch",
            "1,2",
            "--prefill-len",
            "16",
            "--decode-tokens",
            "3",
            "--steps",
            "1",
            "--out",
            table.to_str().unwrap(),
        ]);
        let md = std::fs::read_to_string(&table).unwrap();
        assert_eq!(md, out);
        // Two training rows (with and without checkpointing) and two batch sizes, all measured.
        assert!(md.contains("| 32 | no | "), "{md}");
        assert!(md.contains("| 32 | yes | "), "{md}");
        assert!(md.contains("| 1 | ") && md.contains("| 2 | "), "{md}");
        assert!(!md.contains("error") && !md.contains("OOM"), "{md}");
    }

    #[test]
    fn gpu_bench_rejects_an_unknown_shape() {
        let (_, result) = run_args(&["bench", "--device", "cpu", "--config", "70b"]);
        let e = result.unwrap_err();
        assert!(format!("{e:#}").contains("expected 8b or tiny"), "{e:#}");
    }
}
