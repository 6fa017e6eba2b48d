//! The training forward's fused kernels, each a candle custom op with its own backward.
//!
//! candle's fused RMSNorm, RoPE and last-dim softmax have no backward, and the composed,
//! differentiable forms keep every intermediate alive until the backward (candle's graph holds
//! each op's inputs): the attention softmax alone kept about six `[batch, heads, time, keys]`
//! tensors per layer. These ops keep only what their backward needs, which their callers keep
//! anyway:
//!
//! - [`attention_probs`]: `softmax(q k^T * scale + bias)` over the last dim, the `q k^T` product
//!   included, so that the scores are never stored: only the probabilities (the output, which
//!   the following `probs @ v` keeps) and `q`, `k`. Backward:
//!   `ds = scale * y * (g - sum(g * y))`, `dq = ds k`, `dk = ds^T q`.
//! - [`rms_norm`]: transformers' RMSNorm with a frozen weight; keeps its input only (the
//!   residual stream, alive anyway). Backward to the input only: no weight gradient.
//! - [`rope`]: rotate-half RoPE; keeps nothing but the shared cos/sin tables. Backward: the
//!   gradient rotated back.
//! - [`silu_mul`]: `silu(gate) * up`, keeping only its inputs. Backward to both.
//! - [`dropout_matmul`]: LoRA's `dropout(x) A^T` with a seeded mask that the backward draws
//!   again, so neither the mask nor the dropped input is stored.
//! - [`lora_linear`]: the frozen projection plus LoRA's up projection, `x W^T + scale h B^T`,
//!   without storing the base output or the adapter's unscaled and scaled outputs.
//!
//! Backwards return detached gradients: candle stores a `Var`'s gradient as returned, and one
//! that carried its graph would keep that graph's tensors alive with it.
//!
//! The forwards are hand-written loops (f32, f64, bf16 and f16) on the CPU that round
//! exactly as the composed candle ops they replace (same operations in the same order and
//! precision, f32 for half types where the composed code upcasts), so the logits of a training
//! forward do not move. Backwards are tensor ops, so they run wherever those run. On other
//! devices the functions fall back to the composed ops (no CUDA kernels yet).

use candle_core::backend::BackendStorage;
use candle_core::cpu::kernels::VecOps;
use candle_core::op::{Exp, Silu, Sqrt, UnaryOpT};
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D,
};

/// A gradient as a backward returns it: detached. The tensor ops of a backward record a graph
/// whenever an operand is tracked (`q`, `k`, a `Var`...), and candle stores the gradient of a
/// `Var` as returned: without this, the gradient of a LoRA factor would keep its whole
/// computation (the scores' gradient, the dropout mask, the scaled output gradient) alive
/// until the gradients are dropped.
fn grad_of(t: Tensor) -> Option<Tensor> {
    Some(t.detach())
}

/// The precision a half-precision tensor is upcast to for softmax and normalisation.
fn upcast(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

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

/// RMSNorm as transformers computes it: `x / sqrt(mean(x^2) + eps)` in (at least) f32, cast
/// back to the dtype of `x`, times `weight` (`[hidden]`). The weight is frozen: it gets no
/// gradient.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNorm { eps };
    if !x.device().is_cpu() {
        return op.composed(x, weight);
    }
    x.apply_op2(&weight.contiguous()?, op)
}

/// Rotate-half RoPE on `x` `[b, heads, t, head_dim]` with `cos`, `sin` `[b or 1, t,
/// head_dim / 2]` in the dtype of `x`: `x * [cos, cos] + [-x2, x1] * [sin, sin]`. The tables
/// get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Rope.composed(x, cos, sin);
    }
    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

/// `silu(gate) * up`, the SwiGLU of the MLP (same shapes).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() {
        return gate.silu()? * up;
    }
    gate.apply_op2(up, SiluMul)
}

// ---------------------------------------------------------------------------------------------
// Helpers for the CPU loops.

/// f32 and f64, the precisions the softmax and the normalisation run in, with candle's own
/// scalar kernels (so the results are bit-identical to its unary ops).
trait Float: WithDType {
    fn exp_(self) -> Self;
    fn sqrt_(self) -> Self;
}

impl Float for f32 {
    fn exp_(self) -> f32 {
        <Exp as UnaryOpT>::f32(self)
    }
    fn sqrt_(self) -> f32 {
        <Sqrt as UnaryOpT>::f32(self)
    }
}

impl Float for f64 {
    fn exp_(self) -> f64 {
        <Exp as UnaryOpT>::f64(self)
    }
    fn sqrt_(self) -> f64 {
        <Sqrt as UnaryOpT>::f64(self)
    }
}

/// Runs `f(row_index, row)` on every `row_len`-long row of `data`, split over candle's CPU
/// threads when there is enough work.
fn par_rows<T: Send>(data: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if row_len == 0 || data.is_empty() {
        return;
    }
    let rows = data.len() / row_len;
    let threads = candle_core::utils::get_num_threads().min(rows);
    if threads <= 1 || data.len() < (1 << 15) {
        for (i, row) in data.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
        return;
    }
    let per_thread = rows.div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        for (c, chunk) in data.chunks_mut(per_thread * row_len).enumerate() {
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(c * per_thread + i, row);
                }
            });
        }
    });
}

/// Runs `$body` on the elements (`Vec<T>`, bound to `$v`) of a float storage and wraps them
/// back into a storage of the same dtype.
macro_rules! each_float {
    ($storage:expr, $what:literal, |$v:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(mut $v) => {
                $body;
                CpuStorage::F32($v)
            }
            CpuStorage::F64(mut $v) => {
                $body;
                CpuStorage::F64($v)
            }
            CpuStorage::BF16(mut $v) => {
                $body;
                CpuStorage::BF16($v)
            }
            CpuStorage::F16(mut $v) => {
                $body;
                CpuStorage::F16($v)
            }
            other => bail!("{}: unsupported dtype {:?}", $what, other.dtype()),
        }
    };
}

/// The elements of a contiguous `layout` of `storage` as a slice.
fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Some((from, to)) = layout.contiguous_offsets() else {
        bail!("{what} must be contiguous")
    };
    Ok(&T::cpu_storage_as_slice(storage)?[from..to])
}

/// A contiguous copy of `storage` under `layout`, in `dtype` (candle's own conversion).
fn copy_as(storage: &CpuStorage, layout: &Layout, dtype: DType) -> Result<CpuStorage> {
    storage.to_dtype(layout, dtype)
}

fn into_f32(s: CpuStorage) -> Result<Vec<f32>> {
    f32::cpu_storage_data(s)
}

fn into_f64(s: CpuStorage) -> Result<Vec<f64>> {
    f64::cpu_storage_data(s)
}

// ---------------------------------------------------------------------------------------------
// Attention probabilities.

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
                let (bb, one, t, bs) = layout.shape().dims4()?;
                if one != 1 || bs != s || (bb != b && bb != 1) || t == 0 || r % t != 0 {
                    bail!(
                        "attention-probs: bias {:?} does not fit scores [{b}, {g}, {r}, {s}]",
                        layout.shape()
                    )
                }
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

/// `v * scale + 0`, exactly as candle's affine op rounds it in the dtype of `v`.
fn scale_in_place<T: WithDType>(v: &mut [T], scale: f64) {
    let (mul, add) = (T::from_f64(scale), T::from_f64(0.0));
    for x in v.iter_mut() {
        *x = *x * mul + add;
    }
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

// ---------------------------------------------------------------------------------------------
// RMSNorm.

#[derive(Debug, Clone, Copy)]
struct RmsNorm {
    eps: f64,
}

impl RmsNorm {
    fn composed(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(upcast(dtype))?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        normed.broadcast_mul(weight)
    }
}

/// Normalises every `h`-long row of `v` in place, rounding as candle's composed ops:
/// `sum(x * x)` (candle's vector sum) `* (1/h) + 0`, `* 1 + eps`, `sqrt`, `x / that`.
fn normalize_rows<F: Float>(v: &mut [F], h: usize, eps: f64) {
    let (mean, zero, one, eps) = (
        F::from_f64(1.0 / h as f64),
        F::from_f64(0.0),
        F::from_f64(1.0),
        F::from_f64(eps),
    );
    let mut sq = vec![F::zero(); h];
    for row in v.chunks_mut(h) {
        for (s, &x) in sq.iter_mut().zip(row.iter()) {
            *s = x * x;
        }
        let mut sum = F::zero();
        // SAFETY: `sq` holds `h` elements and `sum` is a valid place to write.
        unsafe { <F as VecOps>::vec_reduce_sum(sq.as_ptr(), &mut sum, h) };
        let var = sum * mean + zero;
        let den = (var * one + eps).sqrt_();
        for x in row.iter_mut() {
            *x /= den;
        }
    }
}

fn mul_rows<T: WithDType>(v: &mut [T], w: &[T]) {
    for row in v.chunks_mut(w.len()) {
        for (x, &w) in row.iter_mut().zip(w) {
            *x *= w;
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-frozen-weight"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = lx.dims().last().copied().unwrap_or(0);
        if lw.dims() != [h] {
            bail!(
                "rms-norm: weight {:?} does not fit input {:?}",
                lw.shape(),
                lx.shape()
            )
        }
        let dtype = x.dtype();
        if w.dtype() != dtype {
            bail!("rms-norm: weight {:?} but input {dtype:?}", w.dtype())
        }
        let shape = lx.shape().clone();
        if h == 0 || shape.elem_count() == 0 {
            return Ok((copy_as(x, lx, dtype)?, shape));
        }
        let contiguous = Layout::contiguous(&shape);
        let normed = match upcast(dtype) {
            DType::F32 => {
                let mut v = into_f32(copy_as(x, lx, DType::F32)?)?;
                normalize_rows(&mut v, h, self.eps);
                CpuStorage::F32(v)
            }
            DType::F64 => {
                let mut v = into_f64(copy_as(x, lx, DType::F64)?)?;
                normalize_rows(&mut v, h, self.eps);
                CpuStorage::F64(v)
            }
            d => bail!("rms-norm: unsupported dtype {d:?}"),
        };
        let normed = if normed.dtype() == dtype {
            normed
        } else {
            copy_as(&normed, &contiguous, dtype)?
        };
        let out = each_float!(normed, "rms-norm", |v| mul_rows(
            &mut v,
            contiguous_slice(w, lw, "rms-norm weight")?
        ));
        Ok((out, shape))
    }

    /// `n = x r` with `r = 1/sqrt(mean(x^2) + eps)`, `dn = g w`:
    /// `dx = r (dn - n mean(dn n))`, in (at least) f32.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dtype = x.dtype();
        let work = upcast(dtype);
        let xw = x.to_dtype(work)?;
        let r = (xw.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let n = xw.broadcast_mul(&r)?;
        drop(xw);
        let dn = grad.broadcast_mul(w)?.to_dtype(work)?;
        let dot = (&dn * &n)?.mean_keepdim(D::Minus1)?;
        let dx = (dn - n.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        Ok((grad_of(dx.to_dtype(dtype)?), None))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE.

#[derive(Debug, Clone, Copy)]
struct Rope;

impl Rope {
    fn composed(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Rotates every row of `v` (contiguous `[b, h, t, 2 * half]`) in place:
/// `x1 c - x2 s`, `x2 c + x1 s` (which round as `x1 c + (-x2) s` and `x2 c + x1 s`).
fn rope_rows<T: WithDType>(
    v: &mut [T],
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize),
    half: usize,
) {
    let (h, t, table_batch) = dims;
    for (i, row) in v.chunks_mut(2 * half).enumerate() {
        let batch = if table_batch == 1 { 0 } else { i / (h * t) };
        let from = (batch * t + i % t) * half;
        let (c, s) = (&cos[from..from + half], &sin[from..from + half]);
        let (x1, x2) = row.split_at_mut(half);
        for j in 0..half {
            let (a, b) = (x1[j], x2[j]);
            x1[j] = a * c[j] - b * s[j];
            x2[j] = b * c[j] + a * s[j];
        }
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope-rotate-half"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = lx.shape().dims4()?;
        let (bc, tc, half) = lc.shape().dims3()?;
        if ls.shape() != lc.shape() || tc != t || 2 * half != d || (bc != b && bc != 1) {
            bail!(
                "rope: tables {:?}/{:?} do not fit input {:?}",
                lc.shape(),
                ls.shape(),
                lx.shape()
            )
        }
        let dtype = x.dtype();
        if cos.dtype() != dtype || sin.dtype() != dtype {
            bail!("rope: tables must be {dtype:?}")
        }
        let dims = (h, t, bc);
        let out = each_float!(copy_as(x, lx, dtype)?, "rope", |v| rope_rows(
            &mut v,
            contiguous_slice(cos, lc, "cos")?,
            contiguous_slice(sin, ls, "sin")?,
            dims,
            half
        ));
        Ok((out, lx.shape().clone()))
    }

    /// The inverse rotation of the gradient: `[g1 c + g2 s, g2 c - g1 s]`.
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let half = cos.dim(D::Minus1)?;
        let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let g1 = grad.narrow(D::Minus1, 0, half)?;
        let g2 = grad.narrow(D::Minus1, half, half)?;
        let d1 = (g1.broadcast_mul(&c)? + g2.broadcast_mul(&s)?)?;
        let d2 = (g2.broadcast_mul(&c)? - g1.broadcast_mul(&s)?)?;
        Ok((grad_of(Tensor::cat(&[&d1, &d2], D::Minus1)?), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// SiLU(gate) * up.

#[derive(Debug, Clone, Copy)]
struct SiluMul;

fn mul_in_place<T: WithDType>(v: &mut [T], u: &[T]) {
    for (x, &u) in v.iter_mut().zip(u) {
        *x *= u;
    }
}

/// `silu(g) * u` in one pass over f32 slices, split over rayon's threads when long (the MLP
/// of a batched decode step or a prefill). Each element rounds as candle's silu kernel followed
/// by its multiplication, so the result is bit-identical to the composed ops.
fn silu_mul_f32(gate: &[f32], up: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let mut out = vec![0f32; gate.len()];
    let body = |(o, (g, u)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = <Silu as UnaryOpT>::f32(g) * u;
        }
    };
    if gate.len() <= CHUNK {
        body((&mut out[..], (gate, up)));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(body);
    }
    out
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        lg: &Layout,
        up: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lg.shape() != lu.shape() || gate.dtype() != up.dtype() {
            bail!(
                "silu-mul: gate {:?} {:?} and up {:?} {:?} differ",
                lg.shape(),
                gate.dtype(),
                lu.shape(),
                up.dtype()
            )
        }
        if let (CpuStorage::F32(g), CpuStorage::F32(u)) = (gate, up) {
            if let (Some((g0, g1)), Some((u0, u1))) =
                (lg.contiguous_offsets(), lu.contiguous_offsets())
            {
                let out = silu_mul_f32(&g[g0..g1], &u[u0..u1]);
                return Ok((CpuStorage::F32(out), lg.shape().clone()));
            }
        }
        // candle's own silu kernel, then `* up` in the same dtype.
        let silu = gate.unary_impl::<Silu>(lg)?;
        let up_copy;
        let (up, lu) = if lu.is_contiguous() {
            (up, lu.clone())
        } else {
            up_copy = copy_as(up, lu, up.dtype())?;
            (&up_copy, Layout::contiguous(lu.shape()))
        };
        let out = each_float!(silu, "silu-mul", |v| mul_in_place(
            &mut v,
            contiguous_slice(up, &lu, "up")?
        ));
        Ok((out, lg.shape().clone()))
    }

    /// `dup = g silu(gate)`, `dgate = (g up) silu'(gate)` with candle's own form of the silu
    /// derivative, `sigmoid(x) (1 - silu(x)) + silu(x)`.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let silu = gate.silu()?;
        let sigmoid = (gate.neg()?.exp()? + 1.)?.recip()?;
        let dsilu = ((sigmoid * silu.affine(-1., 1.)?)? + &silu)?;
        let dgate = ((grad * up)? * dsilu)?;
        let dup = (grad * silu)?;
        Ok((grad_of(dgate), grad_of(dup)))
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA: dropout and the down projection, the frozen base and the up projection.

/// `(x * mask) A^T` for `x` `[n, in]` (f32 or f64) and `a` `[r, in]` of the same dtype, with
/// the inverted-dropout mask [`crate::dropout::dropout_mask`] draws from `seed`: the same
/// values as `seeded_dropout(x, p, seed)?.matmul(&a.t()?)`, but neither the mask nor the
/// dropped input is kept for the backward: it draws the mask again from the seed. Gradients
/// flow to `x` and `a`.
pub fn dropout_matmul(x: &Tensor, a: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let op = DropoutMatmul { p, seed };
    if !x.device().is_cpu() {
        return x.mul(&op.mask(x)?)?.matmul(&a.t()?);
    }
    x.apply_op2(a, op)
}

/// `x W^T + (scale * (h B^T))` cast to the dtype of `x`: a frozen projection (`w` `[out, in]`,
/// no gradient) plus a LoRA up projection (`h` `[n, r]` and `b` `[out, r]` in f32, or f64 for
/// an f64 model) of `x` `[n, in]`, as one op that keeps only its inputs and output (the base
/// output, `h B^T` and its scaled copy are not stored). Gradients flow to `x`, `h` and `b`.
pub fn lora_linear(x: &Tensor, w: &Tensor, h: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let op = LoraLinear {
        w: w.clone(),
        scale,
    };
    if !x.device().is_cpu() {
        let y = x.matmul(&w.t()?)?;
        let u = (h.matmul(&b.t()?)? * scale)?.to_dtype(y.dtype())?;
        return y + u;
    }
    x.apply_op3(h, b, op)
}

#[derive(Debug, Clone, Copy)]
struct DropoutMatmul {
    p: f32,
    seed: u64,
}

impl DropoutMatmul {
    /// The mask of `x`'s shape in the dtype of `x` (drawn in f32).
    fn mask(&self, x: &Tensor) -> Result<Tensor> {
        crate::dropout::dropout_mask(x.shape(), self.p, self.seed, x.device())
            .map_err(candle_core::Error::wrap)?
            .to_dtype(x.dtype())
    }
}

impl CustomOp2 for DropoutMatmul {
    fn name(&self) -> &'static str {
        "dropout-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = lx.shape().dims2()?;
        let (r, ka) = la.shape().dims2()?;
        if ka != k || a.dtype() != x.dtype() {
            bail!(
                "dropout-matmul: x {:?} {:?} does not fit a {:?} {:?}",
                lx.shape(),
                x.dtype(),
                la.shape(),
                a.dtype()
            )
        }
        let mask =
            crate::dropout::dropout_mask(lx.shape(), self.p, self.seed, &candle_core::Device::Cpu)
                .map_err(candle_core::Error::wrap)?
                .flatten_all()?
                .to_vec1::<f32>()?;
        let dropped = match copy_as(x, lx, x.dtype())? {
            CpuStorage::F32(mut v) => {
                mul_in_place(&mut v, &mask);
                CpuStorage::F32(v)
            }
            CpuStorage::F64(mut v) => {
                let mask: Vec<f64> = mask.iter().map(|&m| m as f64).collect();
                mul_in_place(&mut v, &mask);
                CpuStorage::F64(v)
            }
            other => bail!("dropout-matmul: unsupported dtype {:?}", other.dtype()),
        };
        let out = dropped.matmul(
            a,
            (1, n, r, k),
            &Layout::contiguous((n, k)),
            &la.transpose(0, 1)?,
        )?;
        Ok((out, Shape::from((n, r))))
    }

    /// `dA = g^T (x * mask)`, `dx = (g A) * mask`, with the mask drawn again.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mask = self.mask(x)?;
        let da = grad.t()?.matmul(&x.mul(&mask)?)?;
        let dx = grad.matmul(a)?.mul(&mask)?;
        Ok((grad_of(dx), grad_of(da)))
    }
}

#[derive(Debug, Clone)]
struct LoraLinear {
    w: Tensor,
    scale: f64,
}

fn add_in_place<T: WithDType>(v: &mut [T], u: &[T]) {
    for (x, &u) in v.iter_mut().zip(u) {
        *x += u;
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        h: &CpuStorage,
        lh: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = lx.shape().dims2()?;
        let (nh, r) = lh.shape().dims2()?;
        let (out, rb) = lb.shape().dims2()?;
        let (w_storage, lw) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w_storage else {
            bail!("lora-linear: the frozen weight is not on the CPU")
        };
        if lw.dims() != [out, k] || nh != n || rb != r || h.dtype() != b.dtype() {
            bail!(
                "lora-linear: x {:?}, weight {:?}, h {:?}, b {:?} do not fit",
                lx.shape(),
                lw.shape(),
                lh.shape(),
                lb.shape()
            )
        }
        let (y, _) = crate::lora::frozen_matmul_cpu(x, lx, w, lw)?;
        let u = match h.matmul(b, (1, n, out, r), lh, &lb.transpose(0, 1)?)? {
            CpuStorage::F32(mut v) => {
                scale_in_place(&mut v, self.scale);
                CpuStorage::F32(v)
            }
            CpuStorage::F64(mut v) => {
                scale_in_place(&mut v, self.scale);
                CpuStorage::F64(v)
            }
            other => bail!("lora-linear: unsupported adapter dtype {:?}", other.dtype()),
        };
        let contiguous = Layout::contiguous((n, out));
        let u = if u.dtype() == y.dtype() {
            u
        } else {
            copy_as(&u, &contiguous, y.dtype())?
        };
        let y = each_float!(y, "lora-linear", |v| add_in_place(
            &mut v,
            contiguous_slice(&u, &contiguous, "lora output")?
        ));
        Ok((y, Shape::from((n, out))))
    }

    /// `dx = g W`, `dh = (g * scale) B`, `dB = (g * scale)^T h` (the adapter part in the dtype
    /// of `h`).
    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.matmul(&self.w)?;
        let gs = (grad.to_dtype(h.dtype())? * self.scale)?;
        let dh = gs.matmul(b)?;
        let db = gs.t()?.matmul(h)?;
        Ok((grad_of(dx), grad_of(dh), grad_of(db)))
    }
}
