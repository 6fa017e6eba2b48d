//! RMSNorm with a frozen weight and rotate-half RoPE as training ops ([`rms_norm`], [`rope`]):
//! each keeps only its input (the norm) or nothing but the shared tables (RoPE).

use candle_core::backend::BackendStorage;
use candle_core::cpu::kernels::VecOps;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D,
};

use super::cpu::{
    contiguous_slice, copy_as, each_float, grad_of, into_f32, into_f64, upcast, Float,
};

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
