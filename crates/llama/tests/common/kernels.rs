//! Helpers of the training-op tests: deterministic inputs, exact and relative comparisons,
//! gradients of random projections, central finite differences, and the composed candle ops
//! each training op replaces (copied from the training forward as it was before them).

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Deterministic uniform values in `[-amp, amp]` (xorshift), as an f64 tensor cast to `dtype`.
pub fn uniform(shape: &[usize], amp: f64, seed: u64, dtype: DType) -> Result<Tensor> {
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

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    assert_eq!(a.dtype(), b.dtype());
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

pub fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// Bit-for-bit equality (NaN-free tensors).
pub fn assert_identical(got: &Tensor, want: &Tensor, what: &str) -> Result<()> {
    let d = max_abs_diff(got, want)?;
    assert!(d == 0.0, "{what}: max |diff| {d:e}, expected bit-identical");
    Ok(())
}

pub fn assert_close(got: &Tensor, want: &Tensor, rel: f64, what: &str) -> Result<()> {
    let d = max_abs_diff(got, want)?;
    let scale = max_abs(want)?.max(1e-30);
    assert!(
        d <= rel * scale,
        "{what}: max |diff| {d:e} > {rel:e} * max |want| {scale:e}"
    );
    Ok(())
}

/// The gradients of `sum(f(inputs) * r)` with respect to each input.
pub fn grads_of(
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
pub fn check_finite_differences(
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

pub fn upcast(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

// ---------------------------------------------------------------------------------------------
// The composed references (the training forward before the custom ops).

pub fn ref_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

pub fn ref_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// `q` `[b, kv, n_rep * t, d]`, `k` `[b, kv, s, d]`, `bias` `[b, 1, t, s]`.
pub fn ref_attention_probs(
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

pub fn ref_silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

// ---------------------------------------------------------------------------------------------
// Inputs.

/// Causal attention over `cached` earlier keys plus `t` new ones, row 1 with its first two
/// keys padding (their own queries see only themselves, as the model's bias does).
pub fn attention_bias(b: usize, t: usize, cached: usize) -> Result<Tensor> {
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

pub struct AttnCase {
    pub q: Tensor,
    pub k: Tensor,
    pub bias: Option<Tensor>,
    pub scale: f64,
}

/// Grouped-query shapes: 2 KV heads, 3 query heads each, stacked along time as the model does.
pub fn attn_case(dtype: DType, with_bias: bool, seed: u64) -> Result<AttnCase> {
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

pub fn rope_tables(b: usize, t: usize, half: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
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
pub fn rope_input(dtype: DType, seed: u64) -> Result<Tensor> {
    Ok(uniform(&[2, 7, 3, 8], 2.0, seed, dtype)?.transpose(1, 2)?)
}

pub const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

// ---------------------------------------------------------------------------------------------
// RMSNorm.

pub fn rms_case(dtype: DType, seed: u64) -> Result<(Tensor, Tensor)> {
    // x as a residual stream [b, t, hidden] and, to cover strides, a transposed view.
    let x = uniform(&[2, 5, 24], 3.0, seed, dtype)?;
    let w = (uniform(&[24], 0.5, seed + 1, dtype)? + 1.0)?;
    Ok((x, w))
}

// ---------------------------------------------------------------------------------------------
// SiLU(gate) * up.

pub fn mlp_case(dtype: DType, seed: u64) -> Result<(Tensor, Tensor)> {
    Ok((
        uniform(&[2, 5, 16], 4.0, seed, dtype)?,
        uniform(&[2, 5, 16], 2.0, seed + 1, dtype)?,
    ))
}
