//! `softmax(q k^T * scale + bias)` as one training op ([`attention_probs`]): the scores are
//! never stored, only the probabilities and `q`, `k`.

use candle_core::backend::BackendStorage;
use candle_core::cpu::kernels::VecOps;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D,
};

use super::cpu::{
    contiguous_slice, copy_as, grad_of, into_f32, par_rows, scale_in_place, upcast, Float,
};

/// `softmax(q k^T * scale + bias)` over the last dim, for `q` `[b, g, r, d]` and `k`
/// `[b, g, s, d]`: `[b, g, r, s]` in the dtype of `q` (computed in f32 for half types, with the
/// product and the scaling in the dtype of `q`, as the composed form). `bias` (additive, 0 or
/// -inf) is `[b or 1, 1, t, s]` with `r` a multiple of `t`: score row `i` uses bias row
/// `i % t`, which is how grouped-query attention stacks its `r / t` query heads along time.
/// Gradients flow to `q` and `k`, not to the bias.
pub fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let op = AttentionProbs { scale };
    if !q.device().is_cpu() {
        return op.composed(q, k, bias);
    }
    match bias {
        Some(bias) => q.apply_op3(k, &bias.contiguous()?, op),
        None => q.apply_op2(k, op),
    }
}

#[derive(Debug, Clone, Copy)]
struct AttentionProbs {
    scale: f64,
}

/// The bias of one forward: its elements and how score rows map onto its rows.
struct Bias<'a> {
    storage: &'a CpuStorage,
    layout: &'a Layout,
    batch: usize,
    t: usize,
}

impl AttentionProbs {
    /// The composed ops this op replaces (used on devices without a kernel).
    fn composed(&self, q: &Tensor, k: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, g, r, _) = q.dims4()?;
        let s = k.dim(2)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let scores = scores.to_dtype(upcast(scores.dtype()))?;
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
        candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(q.dtype())
    }

    fn fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, g, r, d) = lq.shape().dims4()?;
        let (bk, gk, s, dk) = lk.shape().dims4()?;
        if (bk, gk, dk) != (b, g, d) {
            bail!(
                "attention-probs: q {:?} does not fit k {:?}",
                lq.shape(),
                lk.shape()
            )
        }
        let bias = match bias {
            None => None,
            Some((storage, layout)) => {
                let (bb, t) = bias_rows("attention-probs", layout, (b, g, r, s))?;
                Some(Bias {
                    storage,
                    layout,
                    batch: bb,
                    t,
                })
            }
        };
        let shape = Shape::from((b, g, r, s));
        let scores = q.matmul(k, (b * g, r, s, d), lq, &lk.transpose(2, 3)?)?;
        let contiguous = Layout::contiguous(&shape);
        let rows = (g * r, r);
        let probs = match scores {
            CpuStorage::F32(mut v) => {
                scale_in_place(&mut v, self.scale);
                softmax_rows(&mut v, s, rows, bias.as_ref())?;
                CpuStorage::F32(v)
            }
            CpuStorage::F64(mut v) => {
                scale_in_place(&mut v, self.scale);
                softmax_rows(&mut v, s, rows, bias.as_ref())?;
                CpuStorage::F64(v)
            }
            // Half types: product and scaling in the half type, softmax in f32.
            CpuStorage::BF16(mut v) => {
                scale_in_place(&mut v, self.scale);
                let mut f = into_f32(copy_as(&CpuStorage::BF16(v), &contiguous, DType::F32)?)?;
                softmax_rows(&mut f, s, rows, bias.as_ref())?;
                copy_as(&CpuStorage::F32(f), &contiguous, DType::BF16)?
            }
            CpuStorage::F16(mut v) => {
                scale_in_place(&mut v, self.scale);
                let mut f = into_f32(copy_as(&CpuStorage::F16(v), &contiguous, DType::F32)?)?;
                softmax_rows(&mut f, s, rows, bias.as_ref())?;
                copy_as(&CpuStorage::F32(f), &contiguous, DType::F16)?
            }
            other => bail!("attention-probs: unsupported dtype {:?}", other.dtype()),
        };
        Ok((probs, shape))
    }

    /// `ds = scale * y * (g - sum(g * y))`, then the two products of `q k^T`'s backward.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let dtype = y.dtype();
        let work = upcast(dtype);
        let yw = y.to_dtype(work)?;
        let gw = grad.to_dtype(work)?;
        let dot = (&gw * &yw)?.sum_keepdim(D::Minus1)?;
        let ds = (gw.broadcast_sub(&dot)? * &yw)?;
        drop((gw, yw, dot));
        let ds = (ds.to_dtype(dtype)? * self.scale)?;
        let dq = ds.matmul(k)?;
        let dk = ds.t()?.matmul(q)?;
        Ok((dq, dk))
    }
}

/// The batch rows (`b` or 1) and time rows `t` of an additive bias `[b or 1, 1, t, s]` for
/// scores `[b, g, r, s]`, whose row `i` uses bias row `i % t` (`r` a multiple of `t`), or an
/// error naming `op` when it does not fit.
pub(super) fn bias_rows(
    op: &str,
    bias: &Layout,
    (b, g, r, s): (usize, usize, usize, usize),
) -> Result<(usize, usize)> {
    let (bb, one, t, bs) = bias.shape().dims4()?;
    if one != 1 || bs != s || (bb != b && bb != 1) || t == 0 || r % t != 0 {
        bail!(
            "{op}: bias {:?} does not fit scores [{b}, {g}, {r}, {s}]",
            bias.shape()
        )
    }
    Ok((bb, t))
}

/// Adds the bias row of each score row and takes the softmax of every row of `v` in place.
/// `rows = (rows per batch, rows per head)`.
fn softmax_rows<F: Float>(
    v: &mut [F],
    s: usize,
    rows: (usize, usize),
    bias: Option<&Bias<'_>>,
) -> Result<()> {
    let Some(bias) = bias else {
        par_rows(v, s, |_, row| softmax_row::<F, F>(row, None));
        return Ok(());
    };
    match bias.storage.dtype() {
        DType::F32 => {
            let bv = contiguous_slice::<f32>(bias.storage, bias.layout, "attention bias")?;
            par_rows(v, s, |i, row| {
                softmax_row(row, Some(bias_row(bv, bias, rows, s, i)))
            });
        }
        DType::F64 => {
            let bv = contiguous_slice::<f64>(bias.storage, bias.layout, "attention bias")?;
            par_rows(v, s, |i, row| {
                softmax_row(row, Some(bias_row(bv, bias, rows, s, i)))
            });
        }
        d => bail!("attention-probs: bias must be f32 or f64, not {d:?}"),
    }
    Ok(())
}

fn bias_row<'a, B>(
    bv: &'a [B],
    bias: &Bias<'_>,
    rows: (usize, usize),
    s: usize,
    i: usize,
) -> &'a [B] {
    let batch = if bias.batch == 1 { 0 } else { i / rows.0 };
    let q = (i % rows.1) % bias.t;
    let from = (batch * bias.t + q) * s;
    &bv[from..from + s]
}

/// As candle's composed softmax: `x + bias`, `max`, `exp(x - max)`, `sum` (candle's vector
/// sum), `e / sum`.
fn softmax_row<F: Float, B: WithDType>(row: &mut [F], bias: Option<&[B]>) {
    if let Some(bias) = bias {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += F::from_f64(b.to_f64());
        }
    }
    let mut max = row[0];
    for &x in &row[1..] {
        max = <F as VecOps>::max(max, x);
    }
    for x in row.iter_mut() {
        *x = (*x - max).exp_();
    }
    let mut sum = F::zero();
    // SAFETY: `row` holds `row.len()` elements and `sum` is a valid place to write.
    unsafe { <F as VecOps>::vec_reduce_sum(row.as_ptr(), &mut sum, row.len()) };
    for x in row.iter_mut() {
        *x /= sum;
    }
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(q, lq, k, lk, None)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dq, dk) = self.backward(q, k, y, grad)?;
        Ok((grad_of(dq), grad_of(dk)))
    }
}

impl CustomOp3 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        bias: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(q, lq, k, lk, Some((bias, lb)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk) = self.backward(q, k, y, grad)?;
        Ok((grad_of(dq), grad_of(dk), None))
    }
}
