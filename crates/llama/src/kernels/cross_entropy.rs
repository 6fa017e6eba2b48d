//! The LM head and the next-token loss as one op: `-log softmax(x W^T)[target]` per row, a
//! block of rows at a time, so that the `[tokens, vocab]` logits never exist (nor their
//! log-softmax and its intermediates, which the composed form keeps for its backward).
//!
//! The head's weight is frozen, so the only gradient is the one of `x`, and it does not depend
//! on anything the backward brings but one number per row: when `x` is tracked, the forward
//! computes `d nll / d x = (softmax(x W^T) - onehot(target)) W` while each block's logits are at
//! hand, keeps it (`[rows, hidden]`, a few hundred times smaller than the logits), and the
//! backward scales its rows by the incoming gradient. No logit is computed twice.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::cpu::{contiguous_slice, gemm_f32};
use super::rows;

/// Rows whose logits exist at once (`ROWS x vocab` floats: 25 MB for a 49k vocabulary).
const ROWS: usize = 128;

/// `-log softmax(x w^T)[targets[i]]` for each row `i` of `x` `[n, h]` and a frozen `w`
/// `[vocab, h]`: `[n]` in f32 (f64 for f64 inputs). The gradient flows to `x` only.
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    let (vocab, wh) = w.dims2()?;
    if wh != h || targets.len() != n {
        bail!(
            "linear cross-entropy: x {:?}, w {:?} and {} targets do not fit",
            x.shape(),
            w.shape(),
            targets.len()
        )
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("linear cross-entropy: target {t} is outside the vocabulary of {vocab}")
    }
    let fused = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !fused {
        return composed(x, w, targets);
    }
    let op = LinearCrossEntropy {
        w: w.contiguous()?,
        targets: targets.to_vec(),
        keep_grad: x.track_op(),
        grad: Mutex::new(None),
    };
    x.contiguous()?.apply_op1(op)
}

/// The composed form (other dtypes and devices): logits in f32 at least, log-softmax, gather.
fn composed(x: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let logits = x.matmul(&w.t()?)?;
    let logits = match logits.dtype() {
        DType::F64 => logits,
        _ => logits.to_dtype(DType::F32)?,
    };
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = Tensor::new(targets, x.device())?.unsqueeze(1)?;
    logp.gather(&idx, 1)?.squeeze(1)?.neg()
}

struct LinearCrossEntropy {
    w: Tensor,
    targets: Vec<u32>,
    /// Whether the forward keeps `d nll / d x` for a backward.
    keep_grad: bool,
    grad: Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h) = lx.shape().dims2()?;
        let x = contiguous_slice::<f32>(x, lx, "x")?;
        let (storage, lw) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            bail!("linear cross-entropy: the weight is not on the CPU")
        };
        let w = contiguous_slice::<f32>(w, lw, "the LM head")?;
        let vocab = w.len() / h.max(1);
        let threads = candle_core::utils::get_num_threads();
        let mut nll = vec![0f32; n];
        let mut dx = if self.keep_grad {
            vec![0f32; n * h]
        } else {
            Vec::new()
        };
        let mut logits = vec![0f32; ROWS.min(n) * vocab];
        for (c, nll_c) in nll.chunks_mut(ROWS).enumerate() {
            let rows = nll_c.len();
            let row0 = c * ROWS;
            let xc = &x[row0 * h..(row0 + rows) * h];
            let lc = &mut logits[..rows * vocab];
            gemm_f32(
                rows,
                vocab,
                h,
                lc,
                vocab,
                false,
                (xc, h, 1),
                (w, 1, h),
                threads,
            );
            let targets = &self.targets[row0..row0 + rows];
            lc.par_chunks_mut(vocab)
                .zip(nll_c.par_iter_mut())
                .zip(targets.par_iter())
                .for_each(|((l, nll), &t)| {
                    let picked = l[t as usize];
                    // The row becomes its softmax: the gradient of its logits, once the target
                    // gets its -1.
                    let (max, sum) = rows::softmax(l, 1.0, None);
                    *nll = -((picked - max) - sum.ln());
                    l[t as usize] -= 1.0;
                });
            if self.keep_grad {
                let dc = &mut dx[row0 * h..(row0 + rows) * h];
                gemm_f32(
                    rows,
                    h,
                    vocab,
                    dc,
                    h,
                    false,
                    (lc, vocab, 1),
                    (w, h, 1),
                    threads,
                );
            }
        }
        if self.keep_grad {
            *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(dx);
        }
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _nll: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(dx) = self.grad.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            bail!("linear cross-entropy: a backward without a forward that kept its gradient")
        };
        let dx = Tensor::from_vec(dx, x.shape().clone(), x.device())?;
        Ok(Some(dx.broadcast_mul(&grad.unsqueeze(1)?)?.detach()))
    }
}
