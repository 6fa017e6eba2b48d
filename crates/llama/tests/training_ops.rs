//! The training kernels of `teamtune_llama::kernels` against the composed candle ops they replace
//! (copied here from the training forward as it was before them): forwards equal (bit for bit
//! where the op promises the same rounding), gradients of random projections `sum(out * r)`
//! equal, and in f64 the op's own gradient agrees with central finite differences.
//!
//! Here: attention probabilities, the tiled attention, the fused LM head and cross-entropy, and
//! every op's gradients coming back detached. RMSNorm,
//! RoPE and SwiGLU are in `training_ops_norm.rs`, the LoRA matmuls in `training_ops_lora.rs`.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use common::kernels::*;
use teamtune_llama::kernels;

// ---------------------------------------------------------------------------------------------
// Attention probabilities.

#[test]
fn attention_probs_forward_is_bit_identical_to_the_composed_softmax() -> Result<()> {
    for dtype in DTYPES {
        for with_bias in [true, false] {
            let c = attn_case(dtype, with_bias, 11)?;
            let got = kernels::attention_probs(&c.q, &c.k, c.bias.as_ref(), c.scale)?;
            let want = ref_attention_probs(&c.q, &c.k, c.bias.as_ref(), c.scale)?;
            assert_eq!(got.dtype(), dtype);
            assert_identical(&got, &want, &format!("{dtype:?} bias {with_bias}"))?;
        }
    }
    // The masked keys get exactly zero probability, and every row sums to one.
    let c = attn_case(DType::F32, true, 3)?;
    let p = kernels::attention_probs(&c.q, &c.k, c.bias.as_ref(), c.scale)?;
    let sums = p.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
    // Query 0 of row 0 (cached 3) sees keys 0..=3 only.
    let row = p.get(0)?.get(0)?.get(0)?.to_vec1::<f32>()?;
    assert!(row[4..].iter().all(|&x| x == 0.0) && row[..4].iter().all(|&x| x > 0.0));
    Ok(())
}

#[test]
fn attention_probs_bias_broadcasts_over_the_batch_and_the_stacked_heads() -> Result<()> {
    let c = attn_case(DType::F32, true, 5)?;
    let bias1 = c.bias.as_ref().unwrap().narrow(0, 0, 1)?;
    let got = kernels::attention_probs(&c.q, &c.k, Some(&bias1), c.scale)?;
    let want = ref_attention_probs(
        &c.q,
        &c.k,
        Some(&bias1.broadcast_as(c.bias.as_ref().unwrap().shape())?),
        c.scale,
    )?;
    assert_identical(&got, &want, "batch-1 bias")?;
    // A bias that does not fit is an error, not a silent misread.
    let wrong = attention_bias(2, 4, 4)?;
    assert!(kernels::attention_probs(&c.q, &c.k, Some(&wrong), c.scale).is_err());
    Ok(())
}

#[test]
fn attention_probs_gradients_equal_the_composed_ones() -> Result<()> {
    for (dtype, rel) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        for with_bias in [true, false] {
            let c = attn_case(dtype, with_bias, 21)?;
            let (b, g, r, _) = c.q.dims4()?;
            let r_proj = uniform(&[b, g, r, c.k.dim(2)?], 1.0, 99, upcast(dtype))?;
            let bias = c.bias.clone();
            let got = grads_of(&[c.q.clone(), c.k.clone()], &r_proj, &|x| {
                Ok(kernels::attention_probs(
                    &x[0],
                    &x[1],
                    bias.as_ref(),
                    c.scale,
                )?)
            })?;
            let want = grads_of(&[c.q.clone(), c.k.clone()], &r_proj, &|x| {
                ref_attention_probs(&x[0], &x[1], bias.as_ref(), c.scale)
            })?;
            for (i, name) in ["dq", "dk"].iter().enumerate() {
                assert!(max_abs(&want[i])? > 0.0);
                assert_close(
                    &got[i],
                    &want[i],
                    rel,
                    &format!("{dtype:?} bias {with_bias} {name}"),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn attention_probs_gradients_match_finite_differences() -> Result<()> {
    for with_bias in [true, false] {
        let c = attn_case(DType::F64, with_bias, 31)?;
        let (b, g, r, _) = c.q.dims4()?;
        let r_proj = uniform(&[b, g, r, c.k.dim(2)?], 1.0, 98, DType::F64)?;
        let bias = c.bias.clone();
        let f = |x: &[Tensor]| {
            Ok(kernels::attention_probs(
                &x[0],
                &x[1],
                bias.as_ref(),
                c.scale,
            )?)
        };
        for which in 0..2 {
            check_finite_differences(
                &[c.q.clone(), c.k.clone()],
                which,
                &r_proj,
                &f,
                &format!("attention bias {with_bias}"),
            )?;
        }
    }
    Ok(())
}

#[test]
fn attention_probs_masked_keys_get_exactly_zero_gradient() -> Result<()> {
    // Key 7 (the last) is visible to the last query only; with that query's output not in the
    // loss, the key must get exactly no gradient (the model's end-to-end test relies on it).
    let c = attn_case(DType::F64, true, 41)?;
    let (b, g, r, _) = c.q.dims4()?;
    let s = c.k.dim(2)?;
    let t = c.bias.as_ref().unwrap().dim(2)?;
    let mut mask = vec![1f64; b * g * r * s];
    for (i, m) in mask.chunks_mut(s).enumerate() {
        if (i % r) % t == t - 1 {
            m.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let r_proj = (uniform(&[b, g, r, s], 1.0, 97, DType::F64)?
        * Tensor::from_vec(mask, (b, g, r, s), &Device::Cpu)?)?;
    let bias = c.bias.clone();
    let grads = grads_of(&[c.q.clone(), c.k.clone()], &r_proj, &|x| {
        Ok(kernels::attention_probs(
            &x[0],
            &x[1],
            bias.as_ref(),
            c.scale,
        )?)
    })?;
    let dk_last = grads[1].narrow(2, s - 1, 1)?;
    assert_eq!(max_abs(&dk_last)?, 0.0);
    assert!(max_abs(&grads[1].narrow(2, 0, s - 1)?)? > 0.0);
    Ok(())
}

#[test]
fn attention_probs_split_over_threads_equal_the_composed_softmax() -> Result<()> {
    // Enough rows for the forward to split them over threads (when there are several).
    let (b, g, n_rep, t, d) = (2, 2, 3, 96, 8);
    let q = uniform(&[b, g, n_rep * t, d], 2.0, 141, DType::F32)?;
    let k = uniform(&[b, g, t, d], 2.0, 142, DType::F32)?;
    let bias = attention_bias(b, t, 0)?;
    let scale = 1.0 / (d as f64).sqrt();
    assert_identical(
        &kernels::attention_probs(&q, &k, Some(&bias), scale)?,
        &ref_attention_probs(&q, &k, Some(&bias), scale)?,
        "large",
    )
}

// ---------------------------------------------------------------------------------------------
// Tiled attention: `softmax(q k^T * scale + bias) v` in one op.

/// A training bias `[b, 1, t, t]` as the model builds it: causal, packed rows (row 0 holds
/// conversations of 37 and `t - 37` tokens), right padding (row 1 has `pad` padding tokens at the
/// end, each seeing only itself).
fn packed_bias(b: usize, t: usize, pad: usize) -> Result<Tensor> {
    let mut v = vec![f32::NEG_INFINITY; b * t * t];
    for row in 0..b {
        let seg = |i: usize| if row == 0 && i >= 37 { 1 } else { 0 };
        let valid = |i: usize| row != 1 || i < t - pad;
        for q in 0..t {
            for k in 0..=q {
                if (valid(q) && valid(k) && seg(k) == seg(q)) || (!valid(q) && k == q) {
                    v[(row * t + q) * t + k] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, t, t), &Device::Cpu)?)
}

fn ref_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    Ok(ref_attention_probs(q, k, bias, scale)?.matmul(v)?)
}

/// Forward values and the gradients of q, k and v of the tiled op against the composed ops.
fn check_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    rel: f64,
    what: &str,
) -> Result<()> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let got = kernels::tiled_attention(q, k, v, bias, scale)?;
    let want = ref_attention(q, k, v, bias, scale)?;
    assert_eq!(got.dims(), want.dims());
    assert_close(&got, &want, rel, &format!("{what}: forward"))?;
    let r_proj = uniform(q.dims(), 1.0, 77, q.dtype())?;
    let inputs = [q.clone(), k.clone(), v.clone()];
    let got = grads_of(&inputs, &r_proj, &|x| {
        Ok(kernels::tiled_attention(&x[0], &x[1], &x[2], bias, scale)?)
    })?;
    let want = grads_of(&inputs, &r_proj, &|x| {
        ref_attention(&x[0], &x[1], &x[2], bias, scale)
    })?;
    for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
        assert!(max_abs(&want[i])? > 0.0, "{what}: {name} is zero");
        assert_close(&got[i], &want[i], rel, &format!("{what}: {name}"))?;
    }
    Ok(())
}

#[test]
fn tiled_attention_equals_the_composed_ops_forward_and_backward() -> Result<()> {
    // The small grouped-query case with a cache-style bias (padding at the start of row 1).
    for with_bias in [true, false] {
        let c = attn_case(DType::F32, with_bias, 51)?;
        let v = uniform(c.k.dims(), 1.0, 52, DType::F32)?;
        check_tiled(
            &c.q,
            &c.k,
            &v,
            c.bias.as_ref(),
            1e-5,
            &format!("small, bias {with_bias}"),
        )?;
    }
    // Several query blocks and chunks per head, a length that is not a multiple of the block,
    // packing and right padding, with a bias per batch row and one shared by the batch.
    let (b, g, n_rep, t, d) = (2, 2, 3, 150, 16);
    let q = uniform(&[b, g, n_rep * t, d], 2.0, 53, DType::F32)?;
    let k = uniform(&[b, g, t, d], 2.0, 54, DType::F32)?;
    let v = uniform(&[b, g, t, d], 1.0, 55, DType::F32)?;
    let bias = packed_bias(b, t, 11)?;
    check_tiled(&q, &k, &v, Some(&bias), 1e-5, "packed and padded")?;
    check_tiled(
        &q,
        &k,
        &v,
        Some(&bias.narrow(0, 0, 1)?),
        1e-5,
        "bias shared by the batch",
    )?;
    // Five query heads per group: blocks of 38 time steps (190 rows), the last one short.
    let (b, g, n_rep, t, d) = (2, 2, 5, 100, 8);
    let q = uniform(&[b, g, n_rep * t, d], 2.0, 71, DType::F32)?;
    let k = uniform(&[b, g, t, d], 2.0, 72, DType::F32)?;
    let v = uniform(&[b, g, t, d], 1.0, 73, DType::F32)?;
    let bias = packed_bias(b, t, 7)?;
    check_tiled(&q, &k, &v, Some(&bias), 1e-5, "five heads per group")?;
    // Longer, with wide tiles (up to 600 keys): a second conversation starting at 37, right
    // padding.
    let (b, g, n_rep, t, d) = (2, 1, 2, 600, 16);
    let q = uniform(&[b, g, n_rep * t, d], 2.0, 58, DType::F32)?;
    let k = uniform(&[b, g, t, d], 2.0, 59, DType::F32)?;
    let v = uniform(&[b, g, t, d], 1.0, 60, DType::F32)?;
    let bias = packed_bias(b, t, 70)?;
    check_tiled(&q, &k, &v, Some(&bias), 1e-5, "600 keys")?;
    check_tiled(&q, &k, &v, None, 1e-5, "600 keys, no mask")?;
    // Other dtypes take the composed path, with the same results as the composed ops.
    let c = attn_case(DType::F64, true, 56)?;
    let v = uniform(c.k.dims(), 1.0, 57, DType::F64)?;
    check_tiled(&c.q, &c.k, &v, c.bias.as_ref(), 1e-12, "f64")?;
    Ok(())
}

#[test]
fn tiled_attention_gives_masked_keys_no_gradient_and_is_the_same_on_one_thread() -> Result<()> {
    let (b, g, n_rep, t, d, pad) = (2, 1, 2, 100, 8, 9);
    let q = uniform(&[b, g, n_rep * t, d], 2.0, 61, DType::F32)?;
    let k = uniform(&[b, g, t, d], 2.0, 62, DType::F32)?;
    let v = uniform(&[b, g, t, d], 1.0, 63, DType::F32)?;
    let bias = packed_bias(b, t, pad)?;
    let scale = 1.0 / (d as f64).sqrt();
    // The padding queries' outputs are not in the loss (as in training): the padding keys of
    // row 1 then get exactly zero gradient, and the real keys some.
    let mut mask = vec![1f32; b * g * n_rep * t * d];
    for (i, m) in mask.chunks_mut(d).enumerate() {
        let (row, time) = (i / (g * n_rep * t), i % t);
        if row == 1 && time >= t - pad {
            m.fill(0.0);
        }
    }
    let r_proj = (uniform(q.dims(), 1.0, 64, DType::F32)?
        * Tensor::from_vec(mask, q.dims(), &Device::Cpu)?)?;
    let inputs = [q.clone(), k.clone(), v.clone()];
    let run = || {
        grads_of(&inputs, &r_proj, &|x| {
            Ok(kernels::tiled_attention(
                &x[0],
                &x[1],
                &x[2],
                Some(&bias),
                scale,
            )?)
        })
    };
    let grads = run()?;
    for (i, name) in [(1, "dk"), (2, "dv")] {
        let padding = grads[i].get(1)?.narrow(1, t - pad, pad)?;
        assert_eq!(max_abs(&padding)?, 0.0, "{name} of padding keys");
        assert!(max_abs(&grads[i].get(1)?.narrow(1, 0, t - pad)?)? > 0.0);
    }
    // The backward sums its partials in an order fixed by the shapes: one thread gives the
    // same bits as many.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let alone = pool.install(run)?;
    for (a, b) in grads.iter().zip(&alone) {
        assert_identical(a, b, "one thread against the pool")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The LM head and the token loss in one op.

fn ref_cross_entropy(x: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let logits = x.matmul(&w.t()?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = Tensor::new(targets, &Device::Cpu)?.unsqueeze(1)?;
    Ok(logp.gather(&idx, 1)?.squeeze(1)?.neg()?)
}

#[test]
fn linear_cross_entropy_equals_the_composed_loss_and_gradient() -> Result<()> {
    // More rows than one block of logits, and not a multiple of it.
    let (n, h, vocab) = (300, 24, 1000);
    for (dtype, rel) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
        let x = uniform(&[n, h], 2.0, 81, dtype)?;
        let w = uniform(&[vocab, h], 1.0, 82, dtype)?;
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % vocab as u32).collect();
        let got = kernels::linear_cross_entropy(&x, &w, &targets)?;
        let want = ref_cross_entropy(&x, &w, &targets)?;
        assert_close(&got, &want, rel, &format!("{dtype:?} loss"))?;
        let r_proj = uniform(&[n], 1.0, 83, dtype)?;
        let got = grads_of(std::slice::from_ref(&x), &r_proj, &|v| {
            Ok(kernels::linear_cross_entropy(&v[0], &w, &targets)?)
        })?;
        let want = grads_of(std::slice::from_ref(&x), &r_proj, &|v| {
            ref_cross_entropy(&v[0], &w, &targets)
        })?;
        assert!(max_abs(&want[0])? > 0.0);
        assert_close(&got[0], &want[0], rel, &format!("{dtype:?} dx"))?;
    }
    // A target outside the vocabulary is an error, not a read past the logits.
    let x = uniform(&[2, h], 1.0, 84, DType::F32)?;
    let w = uniform(&[vocab, h], 1.0, 85, DType::F32)?;
    let err = kernels::linear_cross_entropy(&x, &w, &[1, vocab as u32]).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    Ok(())
}

/// candle stores a `Var`'s gradient as the backward returns it: a gradient that still carried
/// its graph would keep that graph's tensors (dropout masks, output gradients) alive as long as
/// the gradients. Every op's gradients come back detached.
#[test]
fn gradients_reaching_vars_carry_no_graph() -> Result<()> {
    let check = |inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>, what: &str| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            let g = grads.get(t).unwrap();
            assert!(!g.track_op(), "{what}: gradient {i} carries a graph");
        }
    };
    let x = uniform(&[6, 8], 1.0, 191, DType::F32)?;
    let a = uniform(&[2, 8], 1.0, 192, DType::F32)?;
    check(
        &[x.clone(), a],
        &|v| Ok(kernels::dropout_matmul(&v[0], &v[1], 0.2, 1)?),
        "dropout_matmul",
    );
    let w = uniform(&[5, 8], 1.0, 193, DType::F32)?;
    let h = uniform(&[6, 2], 1.0, 194, DType::F32)?;
    let b = uniform(&[5, 2], 1.0, 195, DType::F32)?;
    check(
        &[x.clone(), h, b],
        &|v| Ok(kernels::lora_linear(&v[0], &w, &v[1], &v[2], 2.0)?),
        "lora_linear",
    );
    let c = attn_case(DType::F32, true, 196)?;
    let bias = c.bias.clone();
    check(
        &[c.q.clone(), c.k.clone()],
        &|v| {
            Ok(kernels::attention_probs(
                &v[0],
                &v[1],
                bias.as_ref(),
                c.scale,
            )?)
        },
        "attention_probs",
    );
    let v = uniform(c.k.dims(), 1.0, 200, DType::F32)?;
    check(
        &[c.q.clone(), c.k.clone(), v],
        &|x| {
            Ok(kernels::tiled_attention(
                &x[0],
                &x[1],
                &x[2],
                bias.as_ref(),
                c.scale,
            )?)
        },
        "tiled_attention",
    );
    let wl = uniform(&[50, 8], 1.0, 201, DType::F32)?;
    check(
        std::slice::from_ref(&x),
        &|v| {
            Ok(kernels::linear_cross_entropy(
                &v[0],
                &wl,
                &[1, 2, 3, 4, 5, 6],
            )?)
        },
        "linear_cross_entropy",
    );
    let (xn, wn) = rms_case(DType::F32, 197)?;
    check(
        &[xn],
        &|v| Ok(kernels::rms_norm(&v[0], &wn, 1e-5)?),
        "rms_norm",
    );
    let xr = rope_input(DType::F32, 198)?;
    let (cos, sin) = rope_tables(2, 7, 4, DType::F32)?;
    check(&[xr], &|v| Ok(kernels::rope(&v[0], &cos, &sin)?), "rope");
    let (g, u) = mlp_case(DType::F32, 199)?;
    check(
        &[g, u],
        &|v| Ok(kernels::silu_mul(&v[0], &v[1])?),
        "silu_mul",
    );
    Ok(())
}
