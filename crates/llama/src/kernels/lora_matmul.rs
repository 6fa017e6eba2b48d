//! The matmuls of a LoRA projection: the frozen base weight ([`FrozenMatmul`], no weight
//! gradient), LoRA's `dropout(x) A^T` ([`dropout_matmul`]) and the frozen projection plus the
//! up projection ([`lora_linear`]).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use crate::kernels::bf16_base::Bf16Base;
use crate::kernels::dropout::apply_dropout;

use super::cpu::{
    add_in_place, contiguous_slice, copy_as, each_float, grad_of, mul_in_place, scale_in_place,
};

/// `(x * mask) A^T` for `x` `[n, in]` (f32 or f64) and `a` `[r, in]` of the same dtype, with
/// the inverted-dropout mask [`crate::kernels::dropout_mask`] draws from `seed`: the same
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
        base: FrozenBase::Dense(w.clone()),
        scale,
    };
    if !x.device().is_cpu() {
        let y = x.matmul(&w.t()?)?;
        let u = (h.matmul(&b.t()?)? * scale)?.to_dtype(y.dtype())?;
        return y + u;
    }
    x.apply_op3(h, b, op)
}

/// [`lora_linear`] with the frozen weight in bf16 ([`Bf16Base`], CPU and f32 `x` only): the
/// base output and the input gradient through bf16 products, the adapter's part in f32.
pub(crate) fn lora_linear_bf16(
    x: &Tensor,
    base: &Arc<Bf16Base>,
    h: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraLinear {
        base: FrozenBase::Bf16(base.clone()),
        scale,
    };
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
        crate::kernels::dropout::dropout_mask(x.shape(), self.p, self.seed, x.device())
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
        let dropped = match copy_as(x, lx, x.dtype())? {
            CpuStorage::F32(mut v) => {
                apply_dropout(&mut v, self.p, self.seed);
                CpuStorage::F32(v)
            }
            CpuStorage::F64(mut v) => {
                let mask = self.mask(&Tensor::zeros(lx.shape(), DType::F32, &Device::Cpu)?)?;
                let mask: Vec<f64> = mask
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|&m| m as f64)
                    .collect();
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
        let ga = grad.matmul(a)?;
        if x.device().is_cpu() && x.dtype() == DType::F32 && ga.dtype() == DType::F32 {
            // The mask applied in place where it is needed, never stored.
            let dropped = |t: &Tensor| -> Result<Tensor> {
                let mut v = t.flatten_all()?.to_vec1::<f32>()?;
                apply_dropout(&mut v, self.p, self.seed);
                Tensor::from_vec(v, t.shape(), t.device())
            };
            let da = grad.t()?.matmul(&dropped(x)?)?;
            return Ok((grad_of(dropped(&ga)?), grad_of(da)));
        }
        let mask = self.mask(x)?;
        let da = grad.t()?.matmul(&x.mul(&mask)?)?;
        let dx = ga.mul(&mask)?;
        Ok((grad_of(dx), grad_of(da)))
    }
}

/// The frozen weight of a [`LoraLinear`]: dense in the model's dtype, or packed in bf16.
#[derive(Debug, Clone)]
enum FrozenBase {
    Dense(Tensor),
    Bf16(Arc<Bf16Base>),
}

impl FrozenBase {
    /// `x W^T` on the CPU, `[n, out]` in the dtype of `x`.
    fn forward_cpu(&self, x: &CpuStorage, lx: &Layout, out: usize) -> Result<CpuStorage> {
        let (n, k) = lx.shape().dims2()?;
        match self {
            FrozenBase::Dense(w) => {
                let (w_storage, lw) = w.storage_and_layout();
                let candle_core::Storage::Cpu(ws) = &*w_storage else {
                    bail!("lora-linear: the frozen weight is not on the CPU")
                };
                if lw.dims() != [out, k] {
                    bail!(
                        "lora-linear: x {:?} does not fit weight {:?}",
                        lx.shape(),
                        lw.shape()
                    )
                }
                Ok(frozen_matmul_cpu(x, lx, ws, lw)?.0)
            }
            FrozenBase::Bf16(p) => {
                if (p.rows(), p.cols()) != (out, k) {
                    bail!(
                        "lora-linear: x {:?} does not fit weight [{}, {}]",
                        lx.shape(),
                        p.rows(),
                        p.cols()
                    )
                }
                // Read in place when it can be: this runs for every projection of a step.
                let xs = match (x, lx.contiguous_offsets()) {
                    (CpuStorage::F32(v), Some((x0, x1))) => Cow::Borrowed(&v[x0..x1]),
                    _ => match copy_as(x, lx, DType::F32)? {
                        CpuStorage::F32(v) => Cow::Owned(v),
                        _ => bail!("lora-linear: the bf16 base takes f32 input"),
                    },
                };
                Ok(CpuStorage::F32(p.matmul_t(&xs, n)))
            }
        }
    }

    /// `g W`, the input gradient.
    fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        match self {
            FrozenBase::Dense(w) => grad.matmul(w),
            FrozenBase::Bf16(p) => p.input_grad_tensor(grad),
        }
    }
}

#[derive(Debug, Clone)]
struct LoraLinear {
    base: FrozenBase,
    scale: f64,
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
        if nh != n || rb != r || h.dtype() != b.dtype() {
            bail!(
                "lora-linear: x {:?} [.., {k}], h {:?}, b {:?} do not fit",
                lx.shape(),
                lh.shape(),
                lb.shape()
            )
        }
        let y = self.base.forward_cpu(x, lx, out)?;
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
        let dx = self.base.input_grad(grad)?;
        let gs = (grad.to_dtype(h.dtype())? * self.scale)?;
        let dh = gs.matmul(b)?;
        let db = gs.t()?.matmul(h)?;
        Ok((grad_of(dx), grad_of(dh), grad_of(db)))
    }
}

/// `x [m, k] @ w^T` for a frozen `w [n, k]`: the same GEMM as `x.matmul(&w.t())`, but the
/// backward returns only the input gradient `g @ w`. candle's matmul backward would also
/// compute and keep a weight-sized gradient for `w^T` even though nothing trains it.
pub struct FrozenMatmul;

fn frozen_matmul_fwd<S: BackendStorage>(
    x: &S,
    lx: &Layout,
    w: &S,
    lw: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = lw.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen matmul: input [{m}, {k}] does not fit weight [{n}, {k2}]");
    }
    let wt = lw.transpose(0, 1)?;
    let out = x.matmul(w, (1, m, n, k), lx, &wt)?;
    Ok((out, Shape::from((m, n))))
}

/// The CPU forward of [`FrozenMatmul`] (also the base projection of the LoRA training op, so
/// both give the same bits): decode steps, a few rows against contiguous f32 weights, take the
/// skinny kernel; the rest goes to gemm.
fn frozen_matmul_cpu(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    if let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) {
        let ((m, k), (n, kw)) = (lx.shape().dims2()?, lw.shape().dims2()?);
        if let (true, Some((x0, x1)), Some((w0, w1))) = (
            m <= crate::kernels::skinny::MAX_ROWS && kw == k,
            lx.contiguous_offsets(),
            lw.contiguous_offsets(),
        ) {
            let out = crate::kernels::skinny::matmul_t(&xs[x0..x1], m, &ws[w0..w1], n, k);
            return Ok((CpuStorage::F32(out), Shape::from((m, n))));
        }
    }
    frozen_matmul_fwd(x, lx, w, lw)
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        frozen_matmul_cpu(x, lx, w, lw)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        frozen_matmul_fwd(x, lx, w, lw)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}
