//! LoRA adapters on the tiny Llama-3.1-shaped fixture: gradients reach every adapter factor and
//! no frozen weight, PEFT init leaves the model unchanged, adapters switch off, and merge (also
//! into bf16 and packed models). The PEFT file layout is in `lora_peft.rs`.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::lora::*;
use teamtune_llama::{Llama, LlamaConfig, LoraConfig, LoraTarget, Mode};

/// The 2-D shapes of the frozen weights (and their transposes) of the tiny model.
fn frozen_weight_shapes(c: &LlamaConfig) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for t in LoraTarget::ALL {
        let (o, i) = t.shape(c);
        out.push(vec![o, i]);
        out.push(vec![i, o]);
    }
    out.push(vec![c.vocab_size, c.hidden_size]);
    out.push(vec![c.hidden_size, c.vocab_size]);
    out
}

/// Every gradient tensor in `grads` that has the shape of a frozen weight.
fn weight_sized_grads(grads: &candle_core::backprop::GradStore, c: &LlamaConfig) -> usize {
    let shapes = frozen_weight_shapes(c);
    grads
        .get_ids()
        .filter(|id| {
            let g = grads.get_id(**id).unwrap();
            shapes.iter().any(|s| s.as_slice() == g.dims())
        })
        .count()
}

#[test]
fn every_lora_factor_gets_a_gradient_and_no_frozen_weight_does() {
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        ..LoraConfig::default()
    };
    let m = with_adapter(&config, true);
    let c = m.config().clone();
    // 20 tokens: no activation gradient has a weight's shape, so any weight-sized entry in
    // the gradient store is a frozen weight's gradient.
    let logits = common::logits(&m, &ids(20), Mode::Training);
    let loss = logits.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let adapter = m.adapter("a").unwrap();
    let named = adapter.named_vars();
    assert_eq!(named.len(), c.num_hidden_layers * 7 * 2);
    for (name, v) in &named {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let max = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            max > 0.0 && max.is_finite(),
            "{name}: gradient max |g| = {max}"
        );
    }
    assert_eq!(
        weight_sized_grads(&grads, &c),
        0,
        "a frozen weight got a gradient"
    );

    // The detector works: a plain matmul against a weight does leave a weight-sized gradient.
    let x = Var::from_tensor(&Tensor::ones((20, 64), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let w = Tensor::ones((160, 64), DType::F32, &Device::Cpu).unwrap();
    let g = x
        .as_tensor()
        .matmul(&w.t().unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(weight_sized_grads(&g.backward().unwrap(), &c) > 0);
}

#[test]
fn lora_gradients_match_finite_differences() {
    // f64 base and f32 factors: perturb a few A and B entries and compare the loss change.
    let mut m = load(DType::F64);
    m.add_adapter(
        "a",
        &LoraConfig {
            rank: 2,
            alpha: 4.0,
            ..LoraConfig::default()
        },
    )
    .unwrap();
    randomize_b(&m, "a", 3);
    m.set_active_adapter(Some("a")).unwrap();
    let input = ids(12);
    let loss = |m: &Llama| -> Tensor {
        common::logits(m, &input, Mode::Training)
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let grads = loss(&m).backward().unwrap();
    let named = m.adapter("a").unwrap().named_vars();
    let mut checked = 0;
    for (name, v) in named.iter().step_by(5) {
        let g = flat(grads.get(v.as_tensor()).unwrap());
        let base = flat(v.as_tensor());
        let i = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let eps = 1e-2f32;
        let eval = |delta: f32| -> f64 {
            let mut p = base.clone();
            p[i] += delta;
            v.set(&Tensor::from_vec(p, v.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&m).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
        v.set(&Tensor::from_vec(base.clone(), v.as_tensor().shape(), &Device::Cpu).unwrap())
            .unwrap();
        let an = g[i] as f64;
        let err = (fd - an).abs() / an.abs().max(1e-6);
        eprintln!("{name}[{i}]: analytic {an:e}, finite difference {fd:e}, rel err {err:e}");
        assert!(
            err < 1e-3,
            "{name}[{i}]: analytic {an:e} vs finite difference {fd:e}"
        );
        checked += 1;
    }
    assert!(checked >= 5);
}

#[test]
fn peft_init_and_rslora_scale() {
    let m = with_adapter(&LoraConfig::default(), false);
    let a = m.adapter("a").unwrap();
    assert_eq!(a.config().scale(), 2.0);
    let rs = LoraConfig {
        use_rslora: true,
        ..LoraConfig::default()
    };
    assert!((rs.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    let c = m.config();
    for l in 0..c.num_hidden_layers {
        for t in LoraTarget::ALL {
            let p = a.pair(l, t).unwrap();
            let (out, inp) = t.shape(c);
            assert_eq!(p.a.as_tensor().dims(), [8, inp]);
            assert_eq!(p.b.as_tensor().dims(), [out, 8]);
            assert_eq!(p.a.as_tensor().dtype(), DType::F32);
            let av = flat(p.a.as_tensor());
            let bound = 1.0 / (inp as f32).sqrt();
            assert!(av.iter().all(|x| x.abs() <= bound));
            assert!(av.iter().map(|x| x.abs()).fold(0.0, f32::max) > 0.5 * bound);
            assert!(flat(p.b.as_tensor()).iter().all(|&x| x == 0.0));
        }
    }
    // Targets are honoured.
    let mut m = load(DType::F32);
    let only = LoraConfig {
        targets: vec![LoraTarget::V, LoraTarget::Q],
        ..LoraConfig::default()
    };
    let a = m.add_adapter("qv", &only).unwrap();
    assert_eq!(a.vars().len(), 2 * 2 * 2);
    assert!(a.pair(0, LoraTarget::Down).is_none());
}

#[test]
fn a_fresh_adapter_equals_the_base_exactly() {
    let base = load(DType::F32);
    let m = with_adapter(
        &LoraConfig {
            dropout: 0.2,
            ..LoraConfig::default()
        },
        false,
    );
    for mode in [Mode::Inference, Mode::Training] {
        let want = flat(&common::logits(&base, &ids(30), mode));
        let got = flat(&common::logits(&m, &ids(30), mode));
        assert_eq!(got, want, "{mode:?}");
    }
}

#[test]
fn a_disabled_adapter_gives_base_logits_and_dropout_is_training_only() {
    let base = load(DType::F32);
    let mut m = with_adapter(
        &LoraConfig {
            dropout: 0.3,
            ..LoraConfig::default()
        },
        true,
    );
    let want = flat(&common::logits(&base, &ids(30), Mode::Inference));
    let adapted = flat(&common::logits(&m, &ids(30), Mode::Inference));
    assert_ne!(adapted, want, "a random-B adapter must change the logits");
    assert_eq!(
        flat(&common::logits(&m, &ids(30), Mode::Inference)),
        adapted,
        "no dropout at inference"
    );
    assert_ne!(
        flat(&common::logits(&m, &ids(30), Mode::Training)),
        flat(&common::logits(&m, &ids(30), Mode::Training)),
        "dropout in training"
    );
    m.set_active_adapter(None).unwrap();
    assert_eq!(flat(&common::logits(&m, &ids(30), Mode::Inference)), want);
    // A second adapter, chosen per forward; the first is untouched.
    m.add_adapter("b", &LoraConfig::default()).unwrap();
    randomize_b(&m, "b", 2);
    m.set_active_adapter(Some("b")).unwrap();
    let b = flat(&common::logits(&m, &ids(30), Mode::Inference));
    assert_ne!(b, adapted);
    m.set_active_adapter(Some("a")).unwrap();
    assert_eq!(
        flat(&common::logits(&m, &ids(30), Mode::Inference)),
        adapted
    );
    let err = m.set_active_adapter(Some("nope")).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn inference_with_an_adapter_keeps_no_graph() {
    // The factors are Vars: an inference output that tracked ops would keep its whole forward
    // alive, and a session's KV cache (built from such outputs) every forward before it (an
    // eval of a tuned model was killed for memory that way). Training must still track.
    let m = with_adapter(&LoraConfig::default(), true);
    let input = Tensor::new(ids(12).as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ctx = m
        .layer_context(&teamtune_llama::TokenLayout::contiguous(1, 12, 0))
        .unwrap();
    let x = m.embed(&input).unwrap();
    for mode in [Mode::Inference, Mode::Training] {
        let mut h = x.clone();
        for layer in 0..m.num_layers() {
            h = m.forward_layer(layer, &h, &ctx, mode).unwrap();
            assert_eq!(
                h.track_op(),
                mode == Mode::Training,
                "layer {layer}, {mode:?}"
            );
        }
    }
}

#[test]
fn merging_gives_the_unmerged_adapter_logits() {
    for rslora in [false, true] {
        let mut m = with_adapter(
            &LoraConfig {
                use_rslora: rslora,
                ..LoraConfig::default()
            },
            true,
        );
        let want = common::logits(&m, &ids(40), Mode::Inference);
        m.merge_adapter("a").unwrap();
        assert!(m.adapter("a").is_none() && m.active_adapter().is_none());
        let got = common::logits(&m, &ids(40), Mode::Inference);
        let err = rel_err(&got, &want);
        assert!(err <= 1e-5, "rslora {rslora}: merged vs adapter {err:e}");
        let base = common::logits(&load(DType::F32), &ids(40), Mode::Inference);
        assert!(rel_err(&got, &base) > 1e-3);
    }
}

#[test]
fn a_bf16_model_trains_f32_factors_and_merges() {
    let mut m = load(DType::BF16);
    m.add_adapter("a", &LoraConfig::default()).unwrap();
    randomize_b(&m, "a", 1);
    m.set_active_adapter(Some("a")).unwrap();
    let logits = common::logits(&m, &ids(20), Mode::Training);
    let grads = logits
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in m.adapter("a").unwrap().named_vars() {
        let g = grads.get(v.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::F32, "{name}");
        assert!(
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
    assert_eq!(weight_sized_grads(&grads, &m.config().clone()), 0);
    // Against the same adapter on the f32 model (same init seed, same B): the unmerged and
    // the merged (f32 sum, rounded once to bf16) adapter stay within bf16's usual error.
    let reference = common::logits(
        &with_adapter(&LoraConfig::default(), true),
        &ids(20),
        Mode::Inference,
    );
    let mean_err = |a: &Tensor| -> f32 {
        let (a, b) = (flat(a), flat(&reference));
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>()
            / b.iter().map(|y| y.abs()).sum::<f32>()
    };
    let unmerged = mean_err(&common::logits(&m, &ids(20), Mode::Inference));
    m.merge_adapter("a").unwrap();
    let merged = mean_err(&common::logits(&m, &ids(20), Mode::Inference));
    eprintln!("bf16 vs f32 adapter, mean relative error: unmerged {unmerged:e}, merged {merged:e}");
    assert!(unmerged < 0.03 && merged < 0.03);
}

/// Merging an adapter into a model packed for `--quantize bf16` re-packs the changed weights:
/// the result is bit for bit the model merged first and packed after, and it is not the
/// packed base (whose stale packing a missed re-pack would keep).
#[test]
fn an_adapter_merged_into_a_bf16_packed_model_is_repacked() {
    use candle_core::quantized::GgmlDType;
    let packed = |merge_first: bool| -> Llama {
        let mut m = load(DType::F32);
        m.add_adapter("a", &LoraConfig::default()).unwrap();
        randomize_b(&m, "a", 1);
        if merge_first {
            m.merge_adapter("a").unwrap();
            m.quantize_for_inference(GgmlDType::BF16).unwrap();
        } else {
            m.quantize_for_inference(GgmlDType::BF16).unwrap();
            m.merge_adapter("a").unwrap();
        }
        m
    };
    let before = flat(&common::logits(&packed(true), &ids(20), Mode::Inference));
    let after = flat(&common::logits(&packed(false), &ids(20), Mode::Inference));
    assert_eq!(before, after);
    let mut base = load(DType::F32);
    base.quantize_for_inference(GgmlDType::BF16).unwrap();
    let base = flat(&common::logits(&base, &ids(20), Mode::Inference));
    let moved = after
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "the merge changed nothing: {moved}");
}
