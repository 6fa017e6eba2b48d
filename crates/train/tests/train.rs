//! Trainer tests on the tiny LLaMA-3.1 fixture with synthetic token batches.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use teamtune_data::Batch;
use teamtune_llama::{load_model, Llama, LoraConfig, Mode, ModelFiles};
use teamtune_train::{
    accumulate, batch_inputs, evaluate, masked_nll_sum, TrainConfig, TrainError, Trainer,
};

const PAD: u32 = 0;

fn fixture() -> PathBuf {
    teamtune_testkit::tiny_model_dir()
}

fn model(lora_seed: u64) -> Llama {
    model_with_dropout(lora_seed, 0.0)
}

fn model_with_dropout(lora_seed: u64, dropout: f32) -> Llama {
    let files = ModelFiles::resolve(fixture().to_str().unwrap()).unwrap();
    let mut m = load_model(&files, DType::F32, &Device::Cpu).unwrap();
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        seed: lora_seed,
        ..LoraConfig::default()
    };
    m.add_adapter("train", &cfg).unwrap();
    m.set_active_adapter(Some("train")).unwrap();
    m
}

/// A right-padded batch of `rows`; tokens from `trained_from` on (per row) carry loss.
fn batch(rows: &[Vec<u32>], trained_from: usize, seq_len: usize) -> Batch {
    let n = rows.len() * seq_len;
    let mut b = Batch {
        rows: rows.len(),
        seq_len,
        input_ids: vec![PAD; n],
        loss_mask: vec![0; n],
        attention_mask: vec![0; n],
        position_ids: vec![0; n],
        segment_ids: vec![0; n],
        packed: false,
        examples: (0..rows.len()).map(|i| vec![i]).collect(),
    };
    for (r, row) in rows.iter().enumerate() {
        for (t, &id) in row.iter().enumerate() {
            let i = r * seq_len + t;
            b.input_ids[i] = id;
            b.loss_mask[i] = (t >= trained_from) as u8;
            b.attention_mask[i] = 1;
            b.position_ids[i] = t as u32;
            b.segment_ids[i] = 1;
        }
    }
    b
}

fn seq(start: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 4 + (start * 7 + i * 13) % 300)
        .collect()
}

fn data() -> Vec<Batch> {
    vec![
        batch(&[seq(1, 9), seq(2, 6)], 2, 10),
        batch(&[seq(3, 10)], 4, 10),
        batch(&[seq(4, 7), seq(5, 10), seq(6, 3)], 1, 10),
    ]
}

fn config(lr: f64) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        lr,
        progress: false,
        ..TrainConfig::study("train", PAD)
    }
}

fn weights(m: &Llama) -> Vec<Vec<f32>> {
    m.adapter("train")
        .unwrap()
        .vars()
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn chunked_masked_loss_equals_full_cross_entropy() {
    let m = model(1);
    let b = batch(&[seq(1, 9), seq(2, 6)], 2, 10);
    let (ids, layout) = batch_inputs(&b, &Device::Cpu).unwrap();
    let hidden = m
        .forward_hidden(&ids, &layout, None, Mode::Inference)
        .unwrap();
    let (targets, w) = b.next_token_targets(PAD);
    let logits = m.forward(&ids, &layout, None, Mode::Inference).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits.reshape((20, ())).unwrap(), D::Minus1).unwrap();
    let logp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
    let want: f64 = (0..20)
        .map(|i| -(logp[i][targets[i] as usize] as f64) * w[i] as f64)
        .sum();
    for chunk in [1, 3, 64] {
        let got = masked_nll_sum(&m, &hidden, &targets, &w, chunk)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(
            (got - want).abs() < 1e-4 * want.abs(),
            "chunk {chunk}: {got} vs {want}"
        );
    }
    assert_eq!(w.iter().sum::<f32>() as usize, b.trained_tokens());
}

#[test]
fn accumulated_gradients_equal_one_big_batch() {
    let mut m = model(1);
    // Give B non-zero values so that A gets gradients too.
    for v in m.adapter("train").unwrap().vars() {
        let t = Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap();
        v.set(&t).unwrap();
    }
    let vars = m.adapter("train").unwrap().named_vars();
    let cfg = config(1e-3);
    let rows = [seq(1, 9), seq(2, 6), seq(3, 10)];
    let small = vec![batch(&rows[..2], 2, 10), batch(&rows[2..], 5, 10)];
    let mut big = batch(&rows, 2, 10);
    // Row 3 trains from position 5 in both.
    for t in 0..5 {
        big.loss_mask[20 + t] = 0;
    }
    assert_eq!(
        big.trained_tokens(),
        small.iter().map(Batch::trained_tokens).sum::<usize>()
    );
    let (l_acc, g_acc) = accumulate(&mut m, &small, &vars, &cfg, 0).unwrap();
    let (l_big, g_big) = accumulate(&mut m, std::slice::from_ref(&big), &vars, &cfg, 0).unwrap();
    assert!((l_acc - l_big).abs() < 1e-5 * l_big, "{l_acc} vs {l_big}");
    let mut nonzero = 0;
    for (name, v) in &vars {
        let a: Vec<f32> = g_acc
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = g_big
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = b.iter().fold(0f32, |s, x| s.max(x.abs()));
        nonzero += (scale > 0.0) as usize;
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * scale + 1e-9, "{name}: {x} vs {y}");
        }
    }
    assert_eq!(nonzero, vars.len());
}

#[test]
fn high_lr_reduces_training_loss_on_a_repeated_batch() {
    let mut m = model(1);
    let b = batch(&[seq(1, 10), seq(2, 10)], 1, 10);
    let before = evaluate(&m, std::slice::from_ref(&b), PAD, 16).unwrap();
    let cfg = TrainConfig {
        epochs: 8,
        warmup_ratio: 0.0,
        min_lr_ratio: 1.0,
        max_grad_norm: None,
        ..config(1e-2)
    };
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::new(cfg, dir.path()).unwrap();
    let eval = vec![b.clone()];
    let summary = trainer
        .run(&mut m, &mut |_| Ok(vec![b.clone()]), &eval, None)
        .unwrap();
    assert_eq!(summary.steps, 8);
    let after = evaluate(&m, &eval, PAD, 16).unwrap();
    assert_eq!(summary.eval_losses[0].1, before);
    assert!(after < 0.7 * before, "{before} -> {after}");
    assert!(dir
        .path()
        .join("adapter/adapter_model.safetensors")
        .is_file());
}

fn metric_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn resume_continues_exactly() {
    let cfg = TrainConfig {
        checkpoint_every: Some(2),
        eval_every: Some(2),
        ..config(5e-3)
    };
    let eval = vec![batch(&[seq(9, 8)], 1, 8)];
    // Straight: 2 epochs x 3 batches = 6 steps.
    // With LoRA dropout: its masks are a function of (seed, step, micro-batch), so a resumed
    // run draws the masks the interrupted one would have drawn.
    let straight = tempfile::tempdir().unwrap();
    let mut a = model_with_dropout(1, 0.2);
    Trainer::new(cfg.clone(), straight.path())
        .unwrap()
        .run(&mut a, &mut |_| Ok(data()), &eval, None)
        .unwrap();
    // Interrupted: the data source fails when epoch 1 is requested for training (after step 3),
    // so the last checkpoint is step 2, in the middle of epoch 0.
    let crashed = tempfile::tempdir().unwrap();
    let mut calls = 0;
    let mut b = model_with_dropout(1, 0.2);
    let err = Trainer::new(cfg.clone(), crashed.path())
        .unwrap()
        .run(
            &mut b,
            &mut |e| {
                calls += 1;
                if calls > 2 && e == 1 {
                    Err(TrainError::Config("crash".into()))
                } else {
                    Ok(data())
                }
            },
            &eval,
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("crash"));
    let latest = std::fs::read_to_string(crashed.path().join("checkpoints/latest")).unwrap();
    assert_eq!(latest, "step-000002");
    // Resume on a fresh model whose adapter starts elsewhere: everything comes from the checkpoint.
    let mut c = model_with_dropout(77, 0.2);
    let summary = Trainer::new(cfg, crashed.path())
        .unwrap()
        .run(&mut c, &mut |_| Ok(data()), &eval, Some(crashed.path()))
        .unwrap();
    assert_eq!(summary.steps, 6);
    assert_eq!(weights(&a), weights(&c));
    // The metrics of steps 3..6 continue exactly.
    let ma = metric_lines(straight.path());
    let mc = metric_lines(crashed.path());
    assert_eq!(ma[0]["step"], 0);
    assert!(ma[0]["eval_loss"].as_f64().unwrap() > 0.0);
    let losses = |m: &[serde_json::Value], from: u64| -> Vec<(u64, f64, f64)> {
        m.iter()
            .filter(|r| r.get("loss").is_some() && r["step"].as_u64().unwrap() >= from)
            .map(|r| {
                for k in [
                    "epoch",
                    "lr",
                    "grad_norm",
                    "tokens_per_s",
                    "trained_tokens_per_s",
                    "peak_memory_mb",
                ] {
                    assert!(r.get(k).is_some(), "{k} missing in {r}");
                }
                // Every real token counts for tokens/s, the trained ones for their own rate.
                let (all, trained) = (
                    r["tokens"].as_u64().unwrap(),
                    r["trained_tokens"].as_u64().unwrap(),
                );
                assert!(all > trained && trained > 0, "{r}");
                let ratio = r["tokens_per_s"].as_f64().unwrap()
                    / r["trained_tokens_per_s"].as_f64().unwrap();
                assert!((ratio - all as f64 / trained as f64).abs() < 1e-9, "{r}");
                (
                    r["step"].as_u64().unwrap(),
                    r["loss"].as_f64().unwrap(),
                    r["lr"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    // The resumed log drops what the crashed run wrote after its checkpoint (step 3) and reads
    // as one uninterrupted run.
    assert_eq!(losses(&ma, 0).len(), 6);
    assert_eq!(losses(&mc, 0), losses(&ma, 0));
    let evals = |m: &[serde_json::Value]| -> Vec<(u64, f64)> {
        m.iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r.get("eval_loss")?.as_f64()?)))
            .collect()
    };
    assert_eq!(evals(&ma).len(), 4);
    assert_eq!(evals(&mc), evals(&ma));
    assert!(straight
        .path()
        .join("checkpoints/step-000006/optimizer.safetensors")
        .is_file());
    assert!(straight
        .path()
        .join("checkpoints/step-000006/adapter/adapter_config.json")
        .is_file());
}

#[test]
fn non_finite_loss_stops_naming_step_and_checkpoint() {
    let cfg = TrainConfig {
        checkpoint_every: Some(1),
        max_grad_norm: None,
        warmup_ratio: 0.0,
        min_lr_ratio: 1.0,
        epochs: 20,
        ..config(1e30)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut m = model(1);
    let err = Trainer::new(cfg, dir.path())
        .unwrap()
        .run(&mut m, &mut |_| Ok(data()), &[], None)
        .unwrap_err();
    match &err {
        TrainError::NonFinite {
            step,
            last_checkpoint: Some(ck),
            ..
        } => {
            assert!(*step >= 2);
            assert!(ck.ends_with(format!("step-{:06}", step - 1)));
            assert!(err.to_string().contains(&format!("step {step}")));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn step_zero_eval_is_the_base_models_loss() {
    let mut m = model(1);
    for v in m.adapter("train").unwrap().vars() {
        v.set(&Tensor::randn(0f32, 0.2, v.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let eval = vec![batch(&[seq(9, 8)], 1, 8)];
    let with_adapter = evaluate(&m, &eval, PAD, 16).unwrap();
    m.set_active_adapter(None).unwrap();
    let base = evaluate(&m, &eval, PAD, 16).unwrap();
    assert_ne!(base, with_adapter);
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        max_steps: Some(1),
        ..config(1e-3)
    };
    let summary = Trainer::new(cfg, dir.path())
        .unwrap()
        .run(&mut m, &mut |_| Ok(data()), &eval, None)
        .unwrap();
    assert_eq!(summary.eval_losses[0], (0, base));
    assert_eq!(summary.steps, 1);
    assert_eq!(m.active_adapter(), Some("train"));
}

/// An adapter saved by one run and loaded into a fresh model continues: its A and B load as
/// trainable variables that the steps change, and the step-0 evaluation is its own loss (where
/// the run starts), not the base model's.
#[test]
fn a_loaded_adapter_trains_on_from_its_own_loss() {
    let eval = vec![batch(&[seq(9, 8)], 1, 8)];
    let first = tempfile::tempdir().unwrap();
    let mut a = model(1);
    Trainer::new(config(1e-2), first.path())
        .unwrap()
        .run(&mut a, &mut |_| Ok(data()), &eval, None)
        .unwrap();
    let saved = first.path().join("adapter");
    let trained_loss = evaluate(&a, &eval, PAD, 16).unwrap();

    let files = ModelFiles::resolve(fixture().to_str().unwrap()).unwrap();
    let mut m = load_model(&files, DType::F32, &Device::Cpu).unwrap();
    m.load_adapter("train", &saved).unwrap();
    assert_eq!(
        weights(&m),
        weights(&a),
        "the adapter loads as it was saved"
    );
    m.set_active_adapter(None).unwrap();
    let base = evaluate(&m, &eval, PAD, 16).unwrap();
    assert_ne!(base, trained_loss);
    let before = weights(&m);
    let second = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        max_steps: Some(2),
        continues_adapter: true,
        ..config(1e-2)
    };
    let summary = Trainer::new(cfg, second.path())
        .unwrap()
        .run(&mut m, &mut |_| Ok(data()), &eval, None)
        .unwrap();
    assert_eq!(summary.eval_losses[0], (0, trained_loss));
    let after = weights(&m);
    // Every factor, A and B of every projection, moved.
    for (k, (x, y)) in before.iter().zip(&after).enumerate() {
        assert!(x != y, "variable {k} did not train");
    }
}

#[test]
fn packed_rows_give_the_loss_of_separate_rows() {
    let m = model(1);
    let (x, y) = (seq(1, 5), seq(2, 4));
    let separate = batch(&[x.clone(), y.clone()], 1, 5);
    let mut packed = batch(&[[x.clone(), y.clone()].concat()], 1, 10);
    packed.packed = true;
    for t in 5..9 {
        packed.position_ids[t] = (t - 5) as u32;
        packed.segment_ids[t] = 2;
    }
    packed.loss_mask[5] = 0;
    packed.attention_mask[9] = 0;
    packed.segment_ids[9] = 0;
    packed.loss_mask[9] = 0;
    assert_eq!(packed.trained_tokens(), separate.trained_tokens());
    let a = evaluate(&m, &[separate], PAD, 4).unwrap();
    let b = evaluate(&m, &[packed], PAD, 4).unwrap();
    assert!((a - b).abs() < 1e-5 * a, "{a} vs {b}");
}

fn grads_of(
    m: &mut Llama,
    window: &[Batch],
    cfg: &TrainConfig,
    step: usize,
) -> (f64, Vec<Vec<f32>>) {
    let vars = m.adapter("train").unwrap().named_vars();
    let (loss, grads) = accumulate(m, window, &vars, cfg, step).unwrap();
    let g = vars
        .iter()
        .map(|(name, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    (loss, g)
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let mut diff = 0f32;
    let mut scale = 0f32;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            diff = diff.max((p - q).abs());
            scale = scale.max(q.abs());
        }
    }
    (diff, scale)
}

#[test]
fn gradient_checkpointing_gives_the_same_loss_and_gradients_with_dropout() {
    let mut m = model_with_dropout(1, 0.2);
    for v in m.adapter("train").unwrap().vars() {
        v.set(&Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let window = data();
    let plain_cfg = config(1e-3);
    let ckpt_cfg = TrainConfig {
        gradient_checkpointing: true,
        ..plain_cfg.clone()
    };
    let (l_plain, g_plain) = grads_of(&mut m, &window, &plain_cfg, 3);
    let (l_ckpt, g_ckpt) = grads_of(&mut m, &window, &ckpt_cfg, 3);
    assert!(
        (l_plain - l_ckpt).abs() <= 1e-6 * l_plain,
        "{l_plain} vs {l_ckpt}"
    );
    let (diff, scale) = max_abs_diff(&g_ckpt, &g_plain);
    assert!(scale > 0.0);
    assert!(diff <= 1e-5 * scale, "max diff {diff} at scale {scale}");
    // Every factor of every layer gets a gradient through the recomputation.
    assert!(g_ckpt.iter().all(|g| g.iter().any(|&x| x != 0.0)));

    // The masks are a function of the step: the same step repeats exactly, another step draws
    // other masks, and dropout 0 differs from both (so dropout is really applied).
    let (l_again, g_again) = grads_of(&mut m, &window, &plain_cfg, 3);
    assert_eq!(l_again, l_plain);
    assert_eq!(g_again, g_plain);
    let (l_other, _) = grads_of(&mut m, &window, &plain_cfg, 4);
    assert_ne!(l_other, l_plain);
}

/// A decision weight `w` makes the training loss the weighted mean of the token losses:
/// decision tokens (`DECISION` in the mask) count `w` times, the others once; weight 1 gives
/// today's loss, and the evaluation loss ignores the weight.
#[test]
fn decision_tokens_are_weighted_in_the_training_loss_only() {
    let mut m = model(1);
    for v in m.adapter("train").unwrap().vars() {
        let t = Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap();
        v.set(&t).unwrap();
    }
    let vars = m.adapter("train").unwrap().named_vars();
    let mut b = batch(&[seq(1, 9), seq(2, 6)], 2, 10);
    for i in [4, 5, 13] {
        assert_eq!(b.loss_mask[i], 1);
        b.loss_mask[i] = teamtune_data::DECISION;
    }
    // the per-position token losses, unweighted
    let (ids, layout) = batch_inputs(&b, &Device::Cpu).unwrap();
    let hidden = m
        .forward_hidden(&ids, &layout, None, Mode::Inference)
        .unwrap();
    let (targets, ones) = b.next_token_targets(PAD);
    let nll: Vec<f64> = (0..ones.len())
        .map(|i| {
            let mut w = vec![0f32; ones.len()];
            w[i] = ones[i];
            masked_nll_sum(&m, &hidden, &targets, &w, 64)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .collect();
    for w in [1.0f32, 3.0] {
        let cfg = TrainConfig {
            decision_weight: w,
            ..config(1e-3)
        };
        let (_, weights) = b.weighted_next_token_targets(PAD, w);
        // target position t-1 predicts token t: the decision tokens 4, 5 and 13
        let weighted: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] == w).collect();
        if w != 1.0 {
            assert_eq!(weighted, vec![3, 4, 12]);
        }
        let want: f64 = nll
            .iter()
            .zip(&weights)
            .map(|(l, &x)| l * x as f64)
            .sum::<f64>()
            / weights.iter().map(|&x| x as f64).sum::<f64>();
        assert!(
            (b.trained_weight(w) - weights.iter().map(|&x| x as f64).sum::<f64>()).abs() < 1e-9
        );
        // dropout is 0 in this model: Training mode computes the same forward
        let (loss, _) = accumulate(&mut m, std::slice::from_ref(&b), &vars, &cfg, 0).unwrap();
        assert!(
            (loss - want).abs() < 1e-5 * want,
            "weight {w}: {loss} vs {want}"
        );
    }
    let eval = evaluate(&m, std::slice::from_ref(&b), PAD, 64).unwrap();
    let plain = nll.iter().sum::<f64>() / b.trained_tokens() as f64;
    assert!((eval - plain).abs() < 1e-5 * plain, "{eval} vs {plain}");
}

/// `--base-dtype bf16`: the frozen projections' products with bf16 operands move the loss
/// and the gradients by bf16's rounding only (a relative 2^-8 per operand), gradient
/// checkpointing stays exact on top of it, and a merge is refused by name.
#[test]
fn a_bf16_base_moves_loss_and_gradients_by_bf16_rounding_only() {
    let mut f32_model = model_with_dropout(1, 0.2);
    let mut bf16_model = model_with_dropout(1, 0.2);
    let theirs = bf16_model.adapter("train").unwrap().vars();
    for (v, w) in f32_model
        .adapter("train")
        .unwrap()
        .vars()
        .iter()
        .zip(theirs)
    {
        v.set(&Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap())
            .unwrap();
        w.set(v.as_tensor()).unwrap();
    }
    bf16_model.freeze_base_in_bf16().unwrap();
    let window = data();
    let cfg = config(1e-3);
    let (l32, g32) = grads_of(&mut f32_model, &window, &cfg, 3);
    let (l16, g16) = grads_of(&mut bf16_model, &window, &cfg, 3);
    let rel = (l32 - l16).abs() / l32;
    assert!(rel > 0.0, "the bf16 base changed nothing: is it applied?");
    assert!(rel < 1e-2, "loss {l32} (f32) vs {l16} (bf16 base)");
    let (diff, scale) = max_abs_diff(&g16, &g32);
    assert!(
        diff > 0.0 && diff <= 0.05 * scale,
        "max diff {diff} at scale {scale}"
    );
    // Every factor still gets a gradient through the bf16 input gradients.
    assert!(g16.iter().all(|g| g.iter().any(|&x| x != 0.0)));

    let ckpt = TrainConfig {
        gradient_checkpointing: true,
        ..cfg.clone()
    };
    let (l_ckpt, g_ckpt) = grads_of(&mut bf16_model, &window, &ckpt, 3);
    assert!((l_ckpt - l16).abs() <= 1e-6 * l16, "{l_ckpt} vs {l16}");
    let (diff, scale) = max_abs_diff(&g_ckpt, &g16);
    assert!(diff <= 1e-5 * scale, "max diff {diff} at scale {scale}");

    let merge = bf16_model.merge_adapter("train").unwrap_err().to_string();
    assert!(merge.contains("--base-dtype bf16"), "{merge}");
}
