//! `check`: the device under test against a reference device.

use std::collections::HashMap;
use std::io::Write as IoWrite;
use std::path::PathBuf;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};
use teamtune_llama::{
    generate, load_model, parse_device, Llama, LoadedModel, Mode, ModelFiles, SamplingParams,
    TokenLayout,
};
use teamtune_train::{accumulate, AdamW, AdamWParams};

use crate::common::*;

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
