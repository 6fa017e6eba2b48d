//! Attention of a decode step on the CPU: a few query rows per KV head against a long cache.
//!
//! With one new token per sequence, `q k^T` is a handful of rows against thousands of keys.
//! gemm packs the keys (and then the values) into panels for each head of each layer, which
//! costs more than reading them: at 1200 cached tokens and 8 sequences, attention took as long
//! as all the projections. Here each key and value row is read once, straight from the
//! cache buffer, for every query row of its group.
//!
//! Each query row's scores, softmax and weighted sum run in the same order whatever else is in
//! the batch, and padding slots (bias -inf) add exact zeros, so a sequence gets the same bits
//! alone and batched.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::skinny;

/// Query rows per KV head (grouped query heads x new tokens) up to which [`attention`] is
/// used; more (a prefill) go through gemm.
pub(crate) const MAX_QUERY_ROWS: usize = 32;

/// `softmax(q k^T * scale + bias) v` for `q` `[b, g, r, d]`, `k` and `v` `[b, g, s, d]` (views
/// of a cache buffer whose rows are contiguous), f32 on the CPU. `bias` is the additive mask
/// `[b, 1, t, s]` with `r` a multiple of `t` (row `i` uses bias row `i % t`, as grouped-query
/// attention stacks its query heads along time). Returns `[b, g, r, d]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    // The op reads the bias in place (the same bias serves every layer of a forward, so a
    // copy per call would be repeated work); it must be contiguous f32 for that.
    let bias = match bias {
        Some(b) if b.dtype() != DType::F32 => Some(b.to_dtype(DType::F32)?.contiguous()?),
        Some(b) => Some(b.contiguous()?),
        None => None,
    };
    // Cache views have row-major key rows already; a fresh projection is transposed.
    let rows = |t: &Tensor| -> Result<Tensor> {
        let (st, d) = (t.stride(), t.dim(3)?);
        if st[3] == 1 && st[2] == d {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    q.contiguous()?
        .apply_op3_no_bwd(&rows(k)?, &rows(v)?, &DecodeAttention { scale, bias })
}

struct DecodeAttention {
    scale: f64,
    /// The additive mask `[b or 1, 1, t, s]`, contiguous f32 on the CPU.
    bias: Option<Tensor>,
}

/// The offset of `[i, j, 0, 0]` in a 4-d layout whose last two dims are row-major.
fn rows_at(l: &Layout, i: usize, j: usize) -> Result<usize> {
    let (st, dims) = (l.stride(), l.dims());
    if st[3] != 1 || st[2] != dims[3] {
        bail!(
            "decode attention: rows of {:?} (strides {st:?}) are not contiguous",
            dims
        )
    }
    Ok(l.start_offset() + i * st[0] + j * st[1])
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q, k, v) else {
            bail!("decode attention: f32 only")
        };
        let (b, g, r, d) = lq.shape().dims4()?;
        let (kb, kg, s, kd) = lk.shape().dims4()?;
        if (kb, kg, kd) != (b, g, d) || lv.shape() != lk.shape() {
            bail!(
                "decode attention: q {:?}, k {:?}, v {:?}",
                lq.dims(),
                lk.dims(),
                lv.dims()
            )
        }
        let bias_storage = self.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = match &bias_storage {
            Some((storage, layout)) => {
                let (bb, _, t, bs) = layout.shape().dims4()?;
                if (bb != b && bb != 1) || bs != s || r % t != 0 {
                    bail!("decode attention: bias [{bb}, 1, {t}, {bs}] for q rows {r}, keys {s}")
                }
                let Storage::Cpu(CpuStorage::F32(data)) = &**storage else {
                    bail!("decode attention: the bias must be f32 on the CPU")
                };
                let start = layout.start_offset();
                Some((&data[start..start + bb * t * s], bb, t))
            }
            None => None,
        };
        let mut offsets = Vec::with_capacity(b * g);
        for i in 0..b {
            for j in 0..g {
                offsets.push((rows_at(lq, i, j)?, rows_at(lk, i, j)?, rows_at(lv, i, j)?));
            }
        }
        let mut out = vec![0f32; b * g * r * d];
        out.par_chunks_mut(r * d).zip(offsets).enumerate().for_each(
            |(head, (out, (oq, ok, ov)))| {
                let bias = bias.map(|(bias, bb, t)| {
                    let row = if bb == 1 { 0 } else { head / g };
                    (&bias[row * t * s..(row + 1) * t * s], t)
                });
                // A sequence shorter than the batch's longest cache is left-padded: slots that
                // every query row masks out add exact zeros, so their keys and values are not
                // read at all (in a mixed batch they can be most of the cache).
                let first = bias.map_or(0, |(bias, t)| masked_prefix(bias, t, s));
                one_head(
                    &q[oq..oq + r * d],
                    &k[ok + first * d..ok + s * d],
                    &v[ov + first * d..ov + s * d],
                    bias.map(|(bias, t)| (bias, t, first)),
                    self.scale as f32,
                    d,
                    out,
                );
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, g, r, d))))
    }
}

/// The number of leading slots that all `t` rows of `bias` (`[t, s]`) mask out; none when
/// every slot is masked (the softmax then behaves as it would over them all).
fn masked_prefix(bias: &[f32], t: usize, s: usize) -> usize {
    let first = (0..t)
        .map(|i| {
            bias[i * s..(i + 1) * s]
                .iter()
                .position(|&x| x != f32::NEG_INFINITY)
                .unwrap_or(s)
        })
        .min()
        .unwrap_or(0);
    if first == s {
        0
    } else {
        first
    }
}

/// One KV head: `q` `[r, d]`, `k` and `v` `[s, d]` (the cache from slot `first` on), bias
/// `[t, first + s]`; writes `out` `[r, d]`.
fn one_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<(&[f32], usize, usize)>,
    scale: f32,
    d: usize,
    out: &mut [f32],
) {
    let r = q.len() / d;
    let s = k.len() / d;
    // Scores transposed, [s, r]: each key row read once for every query row.
    let mut scores_t = vec![0f32; s * r];
    skinny::dot_rows(q, r, k, d, &mut scores_t);
    let mut probs = vec![0f32; r * s];
    for i in 0..r {
        let row = &mut probs[i * s..(i + 1) * s];
        for (j, p) in row.iter_mut().enumerate() {
            *p = scores_t[j * r + i] * scale;
        }
        if let Some((bias, t, first)) = bias {
            let stride = first + s;
            let bias_row = &bias[(i % t) * stride + first..(i % t + 1) * stride];
            for (p, b) in row.iter_mut().zip(bias_row) {
                *p += b;
            }
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for p in row.iter_mut() {
            *p = (*p - max).exp();
            sum += *p;
        }
        for p in row.iter_mut() {
            *p /= sum;
        }
    }
    // out[i] = sum_j probs[i, j] v[j]: each value row read once.
    out.fill(0.0);
    for (j, vr) in v.chunks_exact(d).enumerate() {
        for i in 0..r {
            let p = probs[i * s + j];
            if p == 0.0 {
                continue;
            }
            for (o, x) in out[i * d..(i + 1) * d].iter_mut().zip(vr) {
                *o += p * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64) -> Tensor {
        let (b, g, r, _) = q.dims4().unwrap();
        let s = k.dim(2).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let scores = match bias {
            Some(bias) => {
                let t = bias.dim(2).unwrap();
                scores
                    .reshape((b, g, r / t, t, s))
                    .unwrap()
                    .broadcast_add(&bias.unsqueeze(2).unwrap())
                    .unwrap()
                    .reshape((b, g, r, s))
                    .unwrap()
            }
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v.contiguous().unwrap())
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Cache-like views (rows of a larger buffer), grouped queries over 2 new tokens, and a
    /// left-padding bias: the same as candle's composed attention.
    #[test]
    fn equals_the_composed_attention_on_cache_views() {
        let dev = Device::Cpu;
        let (b, g, rep, t, s, d) = (3, 2, 3, 2, 37, 16);
        let kb = Tensor::randn(0f32, 1., (b, g, 50, d), &dev).unwrap();
        let vb = Tensor::randn(0f32, 1., (b, g, 50, d), &dev).unwrap();
        let (k, v) = (
            kb.narrow(D::Minus2, 0, s).unwrap(),
            vb.narrow(D::Minus2, 0, s).unwrap(),
        );
        let q = Tensor::randn(0f32, 1., (b, g, rep * t, d), &dev).unwrap();
        // Row 1 has 5 padding slots in front; the last new token of every row sees all.
        let mut bias = vec![0f32; b * t * s];
        for j in 0..5 {
            for q in 0..t {
                bias[(t + q) * s + j] = f32::NEG_INFINITY;
            }
        }
        for row in 0..b {
            bias[(row * t) * s + s - 1] = f32::NEG_INFINITY;
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, s), &dev).unwrap();
        let scale = 0.25;
        for bias in [None, Some(&bias)] {
            let got = attention(&q, &k, &v, bias, scale).unwrap();
            let want = composed(&q, &k, &v, bias, scale);
            assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        }
    }

    #[test]
    fn only_slots_every_row_masks_are_skipped() {
        let n = f32::NEG_INFINITY;
        // Two query rows over 5 slots: the second sees slot 1, so only slot 0 is skipped.
        assert_eq!(masked_prefix(&[n, n, n, 0., 0., n, 0., n, 0., 0.], 2, 5), 1);
        assert_eq!(masked_prefix(&[n, n, 0., n, 0.], 1, 5), 2);
        assert_eq!(masked_prefix(&[0., n, n], 1, 3), 0);
        assert_eq!(
            masked_prefix(&[n, n, n], 1, 3),
            0,
            "all masked: nothing skipped"
        );
    }

    /// A row alone and the same row in a batch beside a longer one (left-padded to it): the
    /// same bits.
    #[test]
    fn a_row_gets_the_same_bits_alone_and_padded_in_a_batch() {
        let dev = Device::Cpu;
        let (g, r, d) = (2, 3, 8);
        let k = Tensor::randn(0f32, 1., (1, g, 20, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, g, 20, d), &dev).unwrap();
        let q = Tensor::randn(0f32, 1., (2, g, r, d), &dev).unwrap();
        let alone = attention(&q.narrow(0, 0, 1).unwrap(), &k, &v, None, 0.3).unwrap();
        // Row 0: 9 padding slots (zeros), then its 20 keys; row 1: 29 keys of its own.
        let pad = Tensor::zeros((1, g, 9, d), DType::F32, &dev).unwrap();
        let other_k = Tensor::randn(0f32, 1., (1, g, 29, d), &dev).unwrap();
        let other_v = Tensor::randn(0f32, 1., (1, g, 29, d), &dev).unwrap();
        let kk = Tensor::cat(&[Tensor::cat(&[&pad, &k], 2).unwrap(), other_k], 0).unwrap();
        let vv = Tensor::cat(&[Tensor::cat(&[&pad, &v], 2).unwrap(), other_v], 0).unwrap();
        let mut bias = vec![0f32; 2 * 29];
        bias[..9].iter_mut().for_each(|b| *b = f32::NEG_INFINITY);
        let bias = Tensor::from_vec(bias, (2, 1, 1, 29), &dev).unwrap();
        let batched = attention(&q, &kk, &vv, Some(&bias), 0.3).unwrap();
        let row0 = batched.narrow(0, 0, 1).unwrap();
        assert_eq!(
            row0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
