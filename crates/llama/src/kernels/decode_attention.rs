//! Attention of a decode step on the CPU: a few query rows per KV head against a long cache.
//!
//! With one new token per sequence, `q k^T` is a handful of rows against thousands of keys.
//! gemm packs the keys (and then the values) into panels for each head of each layer, which
//! costs more than reading them: at 1200 cached tokens and 8 sequences, attention took as long
//! as all the projections. Here each key and value row is read once, straight from the
//! cache buffer, for every query row of its group.
//!
//! A head's keys are cut into chunks of [`KEYS_PER_TASK`], each a task with its own softmax
//! maximum and sum, merged in order after, so that a lone sequence's few heads still keep every
//! thread busy. Each query row's scores, softmax and weighted sum run in the same order
//! whatever else is in the batch (chunks count from the first slot a sequence reads), and
//! padding slots (bias -inf) are not read, so a sequence gets the same bits alone and batched.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::kernels::{rows, skinny};

/// Query rows per KV head (grouped query heads x new tokens) up to which [`attention`] is
/// used; more (a prefill) go through gemm.
pub(crate) const MAX_QUERY_ROWS: usize = 32;

/// `softmax(q k^T * scale + bias) v` for `q` `[b, g, r, d]`, `k` and `v` `[b, g, s, d]` (views
/// of a cache buffer whose rows are contiguous), on the CPU: `q` f32, `k` and `v` both f32 or
/// both f16 (an f16 cache, widened chunk by chunk). `bias` is the additive mask `[b, 1, t, s]`
/// with `r` a multiple of `t` (row `i` uses bias row `i % t`, as grouped-query attention
/// stacks its query heads along time). Returns `[b, g, r, d]`.
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
        let CpuStorage::F32(q) = q else {
            bail!("decode attention: f32 queries only")
        };
        let kv = match (k, v) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => Stored::F32(k, v),
            (CpuStorage::F16(k), CpuStorage::F16(v)) => Stored::F16(k, v),
            _ => bail!("decode attention: keys and values must both be f32 or both f16"),
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
        // Tasks of at most KEYS_PER_TASK keys: (head, first key, keys).
        let mut tasks = Vec::new();
        let mut offsets = Vec::with_capacity(b * g);
        for i in 0..b {
            for j in 0..g {
                let head = i * g + j;
                offsets.push((rows_at(lq, i, j)?, rows_at(lk, i, j)?, rows_at(lv, i, j)?));
                // A sequence shorter than the batch's longest cache is left-padded: slots that
                // every query row masks out add exact zeros, so their keys and values are not
                // read at all (in a mixed batch they can be most of the cache). Chunks start at
                // the first slot read, so a sequence is cut the same alone and in a batch.
                let first =
                    head_bias(bias, head, g, s).map_or(0, |(bias, t)| masked_prefix(bias, t, s));
                let mut lo = first;
                while lo < s {
                    let keys = KEYS_PER_TASK.min(s - lo);
                    tasks.push((head, lo, keys));
                    lo += keys;
                }
            }
        }
        let partials: Vec<Partial> = tasks
            .par_iter()
            .map(|&(head, lo, keys)| {
                let (oq, ok, ov) = offsets[head];
                let (k, v) = (
                    ok + lo * d..ok + (lo + keys) * d,
                    ov + lo * d..ov + (lo + keys) * d,
                );
                let chunk = |k: &[f32], v: &[f32]| {
                    one_chunk(
                        &q[oq..oq + r * d],
                        k,
                        v,
                        head_bias(bias, head, g, s).map(|(bias, t)| (bias, t, lo, s)),
                        self.scale as f32,
                        d,
                    )
                };
                match kv {
                    Stored::F32(ks, vs) => chunk(&ks[k], &vs[v]),
                    Stored::F16(ks, vs) => widened(&ks[k], &vs[v], chunk),
                }
            })
            .collect();
        let mut out = vec![0f32; b * g * r * d];
        let mut at = 0;
        for (head, out) in out.chunks_mut(r * d).enumerate() {
            let count = tasks[at..].iter().take_while(|t| t.0 == head).count();
            merge(&partials[at..at + count], r, d, out);
            at += count;
        }
        Ok((CpuStorage::F32(out), Shape::from((b, g, r, d))))
    }
}

/// The cache's keys and values as stored.
#[derive(Clone, Copy)]
enum Stored<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

thread_local! {
    /// A task's keys and values widened from f16: one chunk's worth, reused by every task the
    /// thread runs (a chunk's attention calls nothing that could run another task meanwhile).
    static WIDENED: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `f` of a chunk's f16 keys and values widened to f32 (exactly: every f16 is an f32), so an
/// f16 cache gives the bits an f32 cache holding the same rounded values gives.
fn widened<R>(k: &[f16], v: &[f16], f: impl FnOnce(&[f32], &[f32]) -> R) -> R {
    WIDENED.with(|buffers| {
        let mut buffers = buffers.borrow_mut();
        let (kw, vw) = &mut *buffers;
        kw.resize(k.len(), 0.0);
        vw.resize(v.len(), 0.0);
        widen(k, kw);
        widen(v, vw);
        f(kw, vw)
    })
}

/// `out[i] = from[i]` as f32. `half`'s slice conversion calls a function per 8 values, which
/// cost more than the bytes it saved; here the loop is compiled with F16C where the CPU has it.
fn widen(from: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has the features; the loop stays inside both slices.
        return unsafe { widen_f16c(from, out) };
    }
    from.convert_to_f32_slice(out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(from: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(from.len(), out.len());
    let whole = from.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let h = _mm_loadu_si128(from.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    for (o, h) in out[whole..].iter_mut().zip(&from[whole..]) {
        *o = h.to_f32();
    }
}

/// Keys per task of a decode step's attention. A lone sequence has as few heads as the model
/// has KV heads (3 for SmolLM2: two threads would split them 2 to 1), so each head's keys are
/// cut into chunks with their own softmax maximum and sum, merged after (the split of
/// flash-decoding).
const KEYS_PER_TASK: usize = 128;

/// Bias rows `[t, s]` of `head` (heads of one sequence share its rows), and `t`.
fn head_bias(
    bias: Option<(&[f32], usize, usize)>,
    head: usize,
    g: usize,
    s: usize,
) -> Option<(&[f32], usize)> {
    bias.map(|(bias, bb, t)| {
        let row = if bb == 1 { 0 } else { head / g };
        (&bias[row * t * s..(row + 1) * t * s], t)
    })
}

/// One chunk of keys of one head, for each query row: the largest score, the sum of
/// `exp(score - max)`, and `sum exp(score - max) v` (`[r, d]`).
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// The bias rows of a chunk: the head's rows `[t, s]`, `t`, the chunk's first slot `lo` and
/// `s`.
type ChunkBias<'a> = Option<(&'a [f32], usize, usize, usize)>;

/// `q` `[r, d]` against `k`, `v` `[keys, d]` (slots `lo..lo + keys` of the cache). The loops
/// are compiled for AVX2 where the CPU has it (wider vectors and an inlined `floor` for the
/// exponential): the same operations in the same order, so the same bits.
fn one_chunk(q: &[f32], k: &[f32], v: &[f32], bias: ChunkBias, scale: f32, d: usize) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if skinny::has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { one_chunk_avx2(q, k, v, bias, scale, d) };
    }
    one_chunk_body(q, k, v, bias, scale, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn one_chunk_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: ChunkBias,
    scale: f32,
    d: usize,
) -> Partial {
    one_chunk_body(q, k, v, bias, scale, d)
}

#[inline(always)]
fn one_chunk_body(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: ChunkBias,
    scale: f32,
    d: usize,
) -> Partial {
    let r = q.len() / d;
    let keys = k.len() / d;
    // Scores transposed, [keys, r]: each key row read once for every query row.
    let mut scores_t = vec![0f32; keys * r];
    skinny::dot_rows(q, r, k, d, &mut scores_t);
    let mut probs = vec![0f32; r * keys];
    let (mut max, mut sum) = (vec![0f32; r], vec![0f32; r]);
    for i in 0..r {
        let row = &mut probs[i * keys..(i + 1) * keys];
        for (j, p) in row.iter_mut().enumerate() {
            *p = scores_t[j * r + i] * scale;
        }
        if let Some((bias, t, lo, s)) = bias {
            let bias_row = &bias[(i % t) * s + lo..][..keys];
            for (p, b) in row.iter_mut().zip(bias_row) {
                *p += b;
            }
        }
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        max[i] = m;
        if m == f32::NEG_INFINITY {
            // The row masks this whole chunk (but may see others): it adds nothing, where
            // exp(-inf - -inf) would be NaN.
            row.fill(0.0);
            continue;
        }
        for p in row.iter_mut() {
            *p = rows::exp(*p - m);
        }
        sum[i] = row.iter().sum();
    }
    // out[i] = sum_j probs[i, j] v[j]: each value row read once.
    let mut out = vec![0f32; r * d];
    for (j, vr) in v.chunks_exact(d).enumerate() {
        for i in 0..r {
            let p = probs[i * keys + j];
            if p == 0.0 {
                continue;
            }
            for (o, x) in out[i * d..(i + 1) * d].iter_mut().zip(vr) {
                *o += p * x;
            }
        }
    }
    Partial { max, sum, out }
}

/// A head's chunks merged, in order, into `out` `[r, d]`: each chunk weighed by
/// `exp(its max - the max of all)`, the whole divided by the weighed sums.
fn merge(chunks: &[Partial], r: usize, d: usize, out: &mut [f32]) {
    // No keys at all: nothing to weigh (the zeros of `out`).
    if chunks.is_empty() {
        return;
    }
    for i in 0..r {
        let m = chunks
            .iter()
            .map(|c| c.max[i])
            .fold(f32::NEG_INFINITY, f32::max);
        let row = &mut out[i * d..(i + 1) * d];
        let mut sum = 0f32;
        for c in chunks {
            let w = rows::exp(c.max[i] - m);
            sum += w * c.sum[i];
            for (o, x) in row.iter_mut().zip(&c.out[i * d..(i + 1) * d]) {
                *o += w * x;
            }
        }
        for o in row.iter_mut() {
            *o /= sum;
        }
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

    /// Caches longer than a task's keys: several chunks per head, merged, and a padded row
    /// whose first read slot is not a chunk boundary of the others: the composed attention
    /// still, and the padded row's bits are those it has alone.
    #[test]
    fn chunks_of_a_long_cache_merge_to_the_composed_attention() {
        let dev = Device::Cpu;
        let (g, rep, d) = (3, 3, 16);
        let s = 2 * KEYS_PER_TASK + 45;
        let pad = 71;
        let k = Tensor::randn(0f32, 1., (2, g, s, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, g, s, d), &dev).unwrap();
        let q = (Tensor::randn(0f32, 1., (2, g, rep, d), &dev).unwrap() * 3.0).unwrap();
        let mut bias = vec![0f32; 2 * s];
        bias[s..s + pad]
            .iter_mut()
            .for_each(|b| *b = f32::NEG_INFINITY);
        let bias = Tensor::from_vec(bias, (2, 1, 1, s), &dev).unwrap();
        let got = attention(&q, &k, &v, Some(&bias), 0.25).unwrap();
        let want = composed(&q, &k, &v, Some(&bias), 0.25);
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        // Row 1 alone: its own keys only, no padding.
        let alone = attention(
            &q.narrow(0, 1, 1).unwrap(),
            &k.narrow(0, 1, 1).unwrap().narrow(2, pad, s - pad).unwrap(),
            &v.narrow(0, 1, 1).unwrap().narrow(2, pad, s - pad).unwrap(),
            None,
            0.25,
        )
        .unwrap();
        assert_eq!(
            got.narrow(0, 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    /// A query row that masks a whole chunk in the middle but sees the rest (another row sees
    /// it all): the chunk adds nothing to that row.
    #[test]
    fn a_chunk_one_row_masks_whole_adds_nothing_to_it() {
        let dev = Device::Cpu;
        let (g, t, d) = (2, 2, 8);
        let s = 2 * KEYS_PER_TASK + 10;
        let k = Tensor::randn(0f32, 1., (1, g, s, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, g, s, d), &dev).unwrap();
        let q = Tensor::randn(0f32, 1., (1, g, t, d), &dev).unwrap();
        let mut bias = vec![0f32; t * s];
        bias[KEYS_PER_TASK..2 * KEYS_PER_TASK]
            .iter_mut()
            .for_each(|b| *b = f32::NEG_INFINITY);
        let bias = Tensor::from_vec(bias, (1, 1, t, s), &dev).unwrap();
        let got = attention(&q, &k, &v, Some(&bias), 0.3).unwrap();
        let want = composed(&q, &k, &v, Some(&bias), 0.3);
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
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

    /// An f16 cache (keys and values as stored, a left-padding bias, several chunks) gives
    /// the bits of an f32 cache holding the same rounded values, and stays close to the
    /// unrounded attention.
    #[test]
    fn an_f16_cache_gives_the_bits_of_its_values_widened() {
        let dev = Device::Cpu;
        let (b, g, rep, d) = (2, 3, 3, 64);
        let s = 2 * KEYS_PER_TASK + 17;
        let k = Tensor::randn(0f32, 1., (b, g, s + 9, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, g, s + 9, d), &dev).unwrap();
        let q = (Tensor::randn(0f32, 1., (b, g, rep, d), &dev).unwrap() * 2.0).unwrap();
        let mut bias = vec![0f32; b * s];
        bias[s..s + 40]
            .iter_mut()
            .for_each(|x| *x = f32::NEG_INFINITY);
        let bias = Tensor::from_vec(bias, (b, 1, 1, s), &dev).unwrap();
        // Views of a buffer with room, as a cache hands them out.
        let (k16, v16) = (
            k.to_dtype(DType::F16).unwrap(),
            v.to_dtype(DType::F16).unwrap(),
        );
        let view = |t: &Tensor| t.narrow(D::Minus2, 0, s).unwrap();
        let got = attention(&q, &view(&k16), &view(&v16), Some(&bias), 0.125).unwrap();
        let widened = |t: &Tensor| view(&t.to_dtype(DType::F32).unwrap());
        let want = attention(&q, &widened(&k16), &widened(&v16), Some(&bias), 0.125).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let exact = attention(&q, &view(&k), &view(&v), Some(&bias), 0.125).unwrap();
        let err = max_diff(&got, &exact);
        assert!(
            err > 0.0 && err < 5e-3,
            "f16 rounding moved the output by {err}"
        );
        // Mixed storage is refused, not misread.
        assert!(attention(&q, &view(&k16), &view(&v), None, 0.125).is_err());
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
