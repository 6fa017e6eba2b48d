//! The training kernels of `teamtune_llama::kernels` against the composed candle ops they replace
//! (copied here from the training forward as it was before them): forwards equal (bit for bit
//! where the op promises the same rounding), gradients of random projections `sum(out * r)`
//! equal, and in f64 the op's own gradient agrees with central finite differences.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use teamtune_llama::kernels;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Deterministic uniform values in `[-amp, amp]` (xorshift), as an f64 tensor cast to `dtype`.
fn uniform(shape: &[usize], amp: f64, seed: u64, dtype: DType) -> Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * amp
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    assert_eq!(a.dtype(), b.dtype());
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// Bit-for-bit equality (NaN-free tensors).
fn assert_identical(got: &Tensor, want: &Tensor, what: &str) -> Result<()> {
    let d = max_abs_diff(got, want)?;
    assert!(d == 0.0, "{what}: max |diff| {d:e}, expected bit-identical");
    Ok(())
}

fn assert_close(got: &Tensor, want: &Tensor, rel: f64, what: &str) -> Result<()> {
    let d = max_abs_diff(got, want)?;
    let scale = max_abs(want)?.max(1e-30);
    assert!(
        d <= rel * scale,
        "{what}: max |diff| {d:e} > {rel:e} * max |want| {scale:e}"
    );
    Ok(())
}

/// The gradients of `sum(f(inputs) * r)` with respect to each input.
fn grads_of(
    inputs: &[Tensor],
    r: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let loss = (out.to_dtype(r.dtype())? * r)?.sum_all()?;
    let grads = loss.backward()?;
    Ok(ts
        .iter()
        .map(|t| grads.get(t).expect("no gradient").clone())
        .collect())
}

/// `sum(grad * v)` against the central difference `(L(x + hv) - L(x - hv)) / 2h` of
/// `L = sum(f(..) * r)` for input `which`, in f64.
fn check_finite_differences(
    inputs: &[Tensor],
    which: usize,
    r: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    what: &str,
) -> Result<()> {
    let grads = grads_of(inputs, r, f)?;
    let loss =
        |inputs: &[Tensor]| -> Result<f64> { Ok((f(inputs)? * r)?.sum_all()?.to_scalar::<f64>()?) };
    for seed in 0..3u64 {
        let v = uniform(inputs[which].dims(), 1.0, 1000 + seed, DType::F64)?;
        let analytic = (&grads[which] * &v)?.sum_all()?.to_scalar::<f64>()?;
        let h = 1e-5;
        let mut plus = inputs.to_vec();
        plus[which] = (&inputs[which] + (&v * h)?)?;
        let mut minus = inputs.to_vec();
        minus[which] = (&inputs[which] - (&v * h)?)?;
        let numeric = (loss(&plus)? - loss(&minus)?) / (2.0 * h);
        let err = (analytic - numeric).abs();
        assert!(
            err <= 1e-7 * analytic.abs().max(1.0),
            "{what} input {which} direction {seed}: analytic {analytic} vs numeric {numeric}"
        );
        assert!(analytic.abs() > 1e-6, "{what}: degenerate direction");
    }
    Ok(())
}

fn upcast(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

// ---------------------------------------------------------------------------------------------
// The composed references (the training forward before the custom ops).

fn ref_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

fn ref_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// `q` `[b, kv, n_rep * t, d]`, `k` `[b, kv, s, d]`, `bias` `[b, 1, t, s]`.
fn ref_attention_probs(
    q: &Tensor,
    k: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, g, r, _) = q.dims4()?;
    let s = k.dim(2)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match scores.dtype() {
        DType::F16 | DType::BF16 => scores.to_dtype(DType::F32)?,
        _ => scores,
    };
    let scores = match bias {
        Some(bias) => {
            let t = bias.dim(2)?;
            scores
                .reshape((b, g, r / t, t, s))?
                .broadcast_add(&bias.to_dtype(scores.dtype())?.unsqueeze(2)?)?
                .reshape((b, g, r, s))?
        }
        None => scores,
    };
    Ok(candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(q.dtype())?)
}

fn ref_silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

// ---------------------------------------------------------------------------------------------
// Inputs.

/// Causal attention over `cached` earlier keys plus `t` new ones, row 1 with its first two
/// keys padding (their own queries see only themselves, as the model's bias does).
fn attention_bias(b: usize, t: usize, cached: usize) -> Result<Tensor> {
    let s = cached + t;
    let mut v = vec![0f32; b * t * s];
    for row in 0..b {
        for q in 0..t {
            for k in 0..s {
                let padding = row == 1 && k < 2;
                let allowed = k <= cached + q && !padding;
                let own = k == cached + q;
                if !allowed && !own {
                    v[(row * t + q) * s + k] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, t, s), &Device::Cpu)?)
}

struct AttnCase {
    q: Tensor,
    k: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

/// Grouped-query shapes: 2 KV heads, 3 query heads each, stacked along time as the model does.
fn attn_case(dtype: DType, with_bias: bool, seed: u64) -> Result<AttnCase> {
    let (b, g, n_rep, t, cached, d) = (2, 2, 3, 5, 3, 8);
    let s = t + cached;
    let q = uniform(&[b, g, n_rep * t, d], 1.5, seed, dtype)?;
    // k as the model sees it after RoPE: the transpose of a [b, s, g, d] projection, made
    // contiguous (the op output is contiguous).
    let k = uniform(&[b, s, g, d], 1.5, seed + 1, dtype)?
        .transpose(1, 2)?
        .contiguous()?;
    Ok(AttnCase {
        q,
        k,
        bias: if with_bias {
            Some(attention_bias(b, t, cached)?)
        } else {
            None
        },
        scale: 1.0 / (d as f64).sqrt(),
    })
}

fn rope_tables(b: usize, t: usize, half: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let pos = uniform(&[b, t, 1], 40.0, 7, DType::F32)?.abs()?;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / (2 * half) as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, 1, half), &Device::Cpu)?;
    let angles = pos.broadcast_mul(&inv_freq)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?.contiguous()?,
        angles.sin()?.to_dtype(dtype)?.contiguous()?,
    ))
}

/// `[b, heads, t, head_dim]` as the model makes it: the transpose of a `[b, t, heads, d]`
/// projection (not contiguous).
fn rope_input(dtype: DType, seed: u64) -> Result<Tensor> {
    Ok(uniform(&[2, 7, 3, 8], 2.0, seed, dtype)?.transpose(1, 2)?)
}

const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

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

// ---------------------------------------------------------------------------------------------
// RMSNorm.

fn rms_case(dtype: DType, seed: u64) -> Result<(Tensor, Tensor)> {
    // x as a residual stream [b, t, hidden] and, to cover strides, a transposed view.
    let x = uniform(&[2, 5, 24], 3.0, seed, dtype)?;
    let w = (uniform(&[24], 0.5, seed + 1, dtype)? + 1.0)?;
    Ok((x, w))
}

#[test]
fn rms_norm_forward_is_bit_identical_to_the_composed_norm() -> Result<()> {
    for dtype in DTYPES {
        let (x, w) = rms_case(dtype, 51)?;
        for eps in [1e-5, 1e-6] {
            let got = kernels::rms_norm(&x, &w, eps)?;
            let want = ref_rms_norm(&x, &w, eps)?;
            assert_eq!(got.dtype(), dtype);
            assert_identical(&got, &want, &format!("{dtype:?} eps {eps}"))?;
        }
        // A strided input.
        let xt = uniform(&[2, 24, 5], 3.0, 52, dtype)?.transpose(1, 2)?;
        assert!(!xt.is_contiguous());
        assert_identical(
            &kernels::rms_norm(&xt, &w, 1e-5)?,
            &ref_rms_norm(&xt, &w, 1e-5)?,
            &format!("{dtype:?} strided"),
        )?;
    }
    // A long row, where candle's vectorised sum differs from a naive one.
    let x = uniform(&[3, 576], 2.0, 53, DType::F32)?;
    let w = uniform(&[576], 1.0, 54, DType::F32)?;
    assert_identical(
        &kernels::rms_norm(&x, &w, 1e-5)?,
        &ref_rms_norm(&x, &w, 1e-5)?,
        "hidden 576",
    )?;
    Ok(())
}

#[test]
fn rms_norm_gradients_equal_the_composed_ones_and_the_weight_gets_none() -> Result<()> {
    for (dtype, rel) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let (x, w) = rms_case(dtype, 61)?;
        let r = uniform(x.dims(), 1.0, 62, upcast(dtype))?;
        let got = grads_of(std::slice::from_ref(&x), &r, &|v| {
            Ok(kernels::rms_norm(&v[0], &w, 1e-5)?)
        })?;
        let want = grads_of(std::slice::from_ref(&x), &r, &|v| {
            ref_rms_norm(&v[0], &w, 1e-5)
        })?;
        assert_close(&got[0], &want[0], rel, &format!("{dtype:?} dx"))?;
    }
    let (x, w) = rms_case(DType::F32, 63)?;
    let wv = Var::from_tensor(&w)?;
    let xv = Var::from_tensor(&x)?;
    let grads = kernels::rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-5)?
        .sum_all()?
        .backward()?;
    assert!(grads.get(xv.as_tensor()).is_some());
    assert!(grads.get(wv.as_tensor()).is_none(), "the weight is frozen");
    Ok(())
}

#[test]
fn rms_norm_gradient_matches_finite_differences() -> Result<()> {
    let (x, w) = rms_case(DType::F64, 71)?;
    let r = uniform(x.dims(), 1.0, 72, DType::F64)?;
    check_finite_differences(
        &[x],
        0,
        &r,
        &|v| Ok(kernels::rms_norm(&v[0], &w, 1e-5)?),
        "rms_norm",
    )
}

// ---------------------------------------------------------------------------------------------
// RoPE.

#[test]
fn rope_forward_is_bit_identical_to_the_composed_rotation() -> Result<()> {
    for dtype in DTYPES {
        let x = rope_input(dtype, 81)?;
        let (b, _, t, d) = x.dims4()?;
        let (cos, sin) = rope_tables(b, t, d / 2, dtype)?;
        let got = kernels::rope(&x, &cos, &sin)?;
        let want = ref_rope(&x, &cos, &sin)?;
        assert_eq!(got.dtype(), dtype);
        assert_identical(&got, &want, &format!("{dtype:?}"))?;
        let xc = x.contiguous()?;
        assert_identical(&kernels::rope(&xc, &cos, &sin)?, &want, "contiguous")?;
        // Tables shared by the batch.
        let (c1, s1) = (cos.narrow(0, 0, 1)?, sin.narrow(0, 0, 1)?);
        assert_identical(
            &kernels::rope(&x, &c1, &s1)?,
            &ref_rope(&x, &c1, &s1)?,
            &format!("{dtype:?} batch-1 tables"),
        )?;
    }
    Ok(())
}

#[test]
fn rope_gradients_equal_the_composed_ones() -> Result<()> {
    for (dtype, rel) in [(DType::F64, 1e-12), (DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        let x = rope_input(dtype, 91)?;
        let (b, _, t, d) = x.dims4()?;
        let (cos, sin) = rope_tables(b, t, d / 2, dtype)?;
        let r = uniform(x.dims(), 1.0, 92, upcast(dtype))?;
        let got = grads_of(std::slice::from_ref(&x), &r, &|v| {
            Ok(kernels::rope(&v[0], &cos, &sin)?)
        })?;
        let want = grads_of(std::slice::from_ref(&x), &r, &|v| {
            ref_rope(&v[0], &cos, &sin)
        })?;
        assert_close(&got[0], &want[0], rel, &format!("{dtype:?} dx"))?;
    }
    Ok(())
}

#[test]
fn rope_gradient_matches_finite_differences() -> Result<()> {
    let x = rope_input(DType::F64, 101)?;
    let (b, _, t, d) = x.dims4()?;
    let (cos, sin) = rope_tables(b, t, d / 2, DType::F64)?;
    let r = uniform(x.dims(), 1.0, 102, DType::F64)?;
    check_finite_differences(
        &[x],
        0,
        &r,
        &|v| Ok(kernels::rope(&v[0], &cos, &sin)?),
        "rope",
    )
}

// ---------------------------------------------------------------------------------------------
// SiLU(gate) * up.

fn mlp_case(dtype: DType, seed: u64) -> Result<(Tensor, Tensor)> {
    Ok((
        uniform(&[2, 5, 16], 4.0, seed, dtype)?,
        uniform(&[2, 5, 16], 2.0, seed + 1, dtype)?,
    ))
}

#[test]
fn silu_mul_forward_is_bit_identical_to_the_composed_product() -> Result<()> {
    for dtype in DTYPES {
        let (gate, up) = mlp_case(dtype, 111)?;
        let got = kernels::silu_mul(&gate, &up)?;
        assert_eq!(got.dtype(), dtype);
        assert_identical(&got, &ref_silu_mul(&gate, &up)?, &format!("{dtype:?}"))?;
        let upt = uniform(&[2, 16, 5], 2.0, 112, dtype)?.transpose(1, 2)?;
        assert_identical(
            &kernels::silu_mul(&gate, &upt)?,
            &ref_silu_mul(&gate, &upt)?,
            &format!("{dtype:?} strided up"),
        )?;
    }
    // Long enough to be split over threads (f32's one-pass path), not a multiple of the
    // split, and starting inside its storage (a narrowed view).
    let gate = uniform(&[4, 7, 1000], 4.0, 113, DType::F32)?.narrow(0, 1, 3)?;
    let up = uniform(&[3, 7, 1000], 2.0, 114, DType::F32)?;
    assert_identical(
        &kernels::silu_mul(&gate, &up)?,
        &ref_silu_mul(&gate, &up)?,
        "F32 long",
    )?;
    Ok(())
}

#[test]
fn silu_mul_gradients_equal_the_composed_ones() -> Result<()> {
    for (dtype, rel) in [(DType::F64, 1e-12), (DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        let (gate, up) = mlp_case(dtype, 121)?;
        let r = uniform(gate.dims(), 1.0, 122, upcast(dtype))?;
        let got = grads_of(&[gate.clone(), up.clone()], &r, &|v| {
            Ok(kernels::silu_mul(&v[0], &v[1])?)
        })?;
        let want = grads_of(&[gate.clone(), up.clone()], &r, &|v| {
            ref_silu_mul(&v[0], &v[1])
        })?;
        for (i, name) in ["dgate", "dup"].iter().enumerate() {
            assert_close(&got[i], &want[i], rel, &format!("{dtype:?} {name}"))?;
        }
    }
    Ok(())
}

#[test]
fn silu_mul_gradients_match_finite_differences() -> Result<()> {
    let (gate, up) = mlp_case(DType::F64, 131)?;
    let r = uniform(gate.dims(), 1.0, 132, DType::F64)?;
    let f = |v: &[Tensor]| Ok(kernels::silu_mul(&v[0], &v[1])?);
    for which in 0..2 {
        check_finite_differences(&[gate.clone(), up.clone()], which, &r, &f, "silu_mul")?;
    }
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
// LoRA: dropout with the down projection, frozen base with the up projection.

fn ref_dropout_matmul(x: &Tensor, a: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    Ok(teamtune_llama::kernels::seeded_dropout(x, p, seed)?.matmul(&a.t()?)?)
}

/// The training forward's LoRA projection before the fused op: frozen base, `h B^T * scale`
/// cast to the base's dtype, sum.
fn ref_lora_linear(x: &Tensor, w: &Tensor, h: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let y = x.apply_op2(w, teamtune_llama::kernels::FrozenMatmul)?;
    let u = (h.matmul(&b.t()?)? * scale)?.to_dtype(y.dtype())?;
    Ok((y + u)?)
}

#[test]
fn dropout_matmul_equals_seeded_dropout_then_matmul() -> Result<()> {
    let x = uniform(&[37, 24], 2.0, 151, DType::F32)?;
    let a = uniform(&[8, 24], 0.3, 152, DType::F32)?;
    for (p, seed) in [(0.2f32, 7u64), (0.5, 8)] {
        let got = kernels::dropout_matmul(&x, &a, p, seed)?;
        let want = ref_dropout_matmul(&x, &a, p, seed)?;
        assert_identical(&got, &want, &format!("p {p} seed {seed}"))?;
    }
    assert!(
        max_abs_diff(
            &kernels::dropout_matmul(&x, &a, 0.2, 7)?,
            &kernels::dropout_matmul(&x, &a, 0.2, 9)?
        )? > 0.0,
        "the mask must depend on the seed"
    );
    // Gradients (the mask drawn again in the backward) equal the composed ones.
    let r = uniform(&[37, 8], 1.0, 153, DType::F32)?;
    let got = grads_of(&[x.clone(), a.clone()], &r, &|v| {
        Ok(kernels::dropout_matmul(&v[0], &v[1], 0.2, 7)?)
    })?;
    let want = grads_of(&[x.clone(), a.clone()], &r, &|v| {
        ref_dropout_matmul(&v[0], &v[1], 0.2, 7)
    })?;
    for (i, name) in ["dx", "da"].iter().enumerate() {
        assert_close(&got[i], &want[i], 1e-6, name)?;
    }
    // The dropped inputs get exactly no gradient.
    let mask = teamtune_llama::kernels::dropout_mask(x.shape(), 0.2, 7, &Device::Cpu)?;
    let dropped_grad = (got[0].abs()? * mask.eq(0.0)?.to_dtype(DType::F32)?)?;
    assert_eq!(max_abs(&dropped_grad)?, 0.0);
    Ok(())
}

#[test]
fn dropout_matmul_gradients_match_finite_differences() -> Result<()> {
    let x = uniform(&[9, 12], 2.0, 161, DType::F64)?;
    let a = uniform(&[4, 12], 0.5, 162, DType::F64)?;
    let r = uniform(&[9, 4], 1.0, 163, DType::F64)?;
    let f = |v: &[Tensor]| Ok(kernels::dropout_matmul(&v[0], &v[1], 0.3, 11)?);
    for which in 0..2 {
        check_finite_differences(&[x.clone(), a.clone()], which, &r, &f, "dropout_matmul")?;
    }
    Ok(())
}

#[test]
fn lora_linear_equals_the_composed_projection() -> Result<()> {
    // Base in the model's dtype, adapter in f32 (as the model keeps its factors).
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let x = uniform(&[13, 24], 2.0, 171, dtype)?;
        let w = uniform(&[40, 24], 0.3, 172, dtype)?;
        let h = uniform(&[13, 8], 1.0, 173, DType::F32)?;
        let b = uniform(&[40, 8], 0.3, 174, DType::F32)?;
        let got = kernels::lora_linear(&x, &w, &h, &b, 2.0)?;
        assert_eq!(got.dtype(), dtype);
        let want = ref_lora_linear(&x, &w, &h, &b, 2.0)?;
        assert_identical(&got, &want, &format!("{dtype:?}"))?;
        let (rel, r_dtype) = match dtype {
            DType::BF16 => (3e-2, DType::F32),
            DType::F64 => (1e-6, DType::F64),
            _ => (1e-6, DType::F32),
        };
        let r = uniform(&[13, 40], 1.0, 175, r_dtype)?;
        let got = grads_of(&[x.clone(), h.clone(), b.clone()], &r, &|v| {
            Ok(kernels::lora_linear(&v[0], &w, &v[1], &v[2], 2.0)?)
        })?;
        let want = grads_of(&[x.clone(), h.clone(), b.clone()], &r, &|v| {
            ref_lora_linear(&v[0], &w, &v[1], &v[2], 2.0)
        })?;
        for (i, name) in ["dx", "dh", "db"].iter().enumerate() {
            assert_close(&got[i], &want[i], rel, &format!("{dtype:?} {name}"))?;
        }
    }
    Ok(())
}

#[test]
fn lora_linear_gradients_match_finite_differences() -> Result<()> {
    let x = uniform(&[7, 10], 2.0, 181, DType::F64)?;
    let w = uniform(&[12, 10], 0.5, 182, DType::F64)?;
    let h = uniform(&[7, 3], 1.0, 183, DType::F64)?;
    let b = uniform(&[12, 3], 0.5, 184, DType::F64)?;
    let r = uniform(&[7, 12], 1.0, 185, DType::F64)?;
    let f = |v: &[Tensor]| Ok(kernels::lora_linear(&v[0], &w, &v[1], &v[2], 1.5)?);
    for which in 0..3 {
        check_finite_differences(
            &[x.clone(), h.clone(), b.clone()],
            which,
            &r,
            &f,
            "lora_linear",
        )?;
    }
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
