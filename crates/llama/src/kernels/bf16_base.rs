//! The frozen base of LoRA training in bf16 (`teamtune train --base-dtype bf16`): a
//! projection's weight `W [out, in]` packed twice for the bf16 dot products of
//! [`super::bf16_matmul`], once as itself for the forward `x W^T` and once transposed for the
//! input gradient `g W` (which is `g (W^T)^T`). The weight itself never trains, so nothing
//! else of it is kept: the two packs take the bytes of the f32 weight they replace.
//!
//! The arithmetic is bf16 mixed precision as GPUs run it: both operands of every product
//! rounded to bf16 (8 significant bits), sums in f32. The LoRA factors, their products and
//! gradients, and everything outside the frozen projections stay f32.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::bf16_matmul::PackedBf16;

/// A frozen `W [out, in]` in bf16, laid out for its forward and for its input gradient.
#[derive(Debug)]
pub(crate) struct Bf16Base {
    /// `W` as `[out, in]`: `x W^T`.
    forward: PackedBf16,
    /// `W^T` as `[in, out]`: `g W = g (W^T)^T`.
    backward: PackedBf16,
}

impl Bf16Base {
    /// Packs the row-major f32 `w [out, in]`.
    pub(crate) fn new(w: &[f32], out: usize, inner: usize) -> Self {
        let mut t = vec![0f32; w.len()];
        for (o, row) in w.chunks_exact(inner.max(1)).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                t[i * out + o] = v;
            }
        }
        Bf16Base {
            forward: PackedBf16::new(w, out, inner),
            backward: PackedBf16::new(&t, inner, out),
        }
    }

    /// Output features.
    pub(crate) fn rows(&self) -> usize {
        self.forward.rows()
    }

    /// Input features.
    pub(crate) fn cols(&self) -> usize {
        self.forward.cols()
    }

    /// `x [m, in] W^T` as `[m, out]`.
    pub(crate) fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.forward.matmul_t(x, m)
    }

    /// `g [m, out] W` as `[m, in]`.
    pub(crate) fn input_grad(&self, g: &[f32], m: usize) -> Vec<f32> {
        self.backward.matmul_t(g, m)
    }

    /// The input gradient of a `[m, out]` f32 tensor as a detached `[m, in]` tensor.
    pub(crate) fn input_grad_tensor(&self, grad: &Tensor) -> Result<Tensor> {
        let (m, out) = grad.dims2()?;
        if out != self.rows() {
            candle_core::bail!(
                "bf16 base: gradient [{m}, {out}] does not fit weight [{}, {}]",
                self.rows(),
                self.cols()
            );
        }
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let dx = {
            // Read in place: a copy of a long sequence's gradient is tens of megabytes a call.
            let (storage, layout) = grad.storage_and_layout();
            let (candle_core::Storage::Cpu(CpuStorage::F32(g)), Some((g0, g1))) =
                (&*storage, layout.contiguous_offsets())
            else {
                candle_core::bail!("bf16 base: the gradient is not f32 on the CPU");
            };
            self.input_grad(&g[g0..g1], m)
        };
        Tensor::from_vec(dx, (m, self.cols()), grad.device())
    }
}

/// `x [m, in] W^T` through a [`Bf16Base`], with the input gradient `g W` through its
/// transposed pack (f32 `x` on the CPU). The weight gets no gradient.
pub(crate) struct Bf16FrozenMatmul(pub(crate) Arc<Bf16Base>);

impl CustomOp1 for Bf16FrozenMatmul {
    fn name(&self) -> &'static str {
        "bf16-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let (CpuStorage::F32(xs), Some((x0, x1))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("bf16 base: needs a contiguous f32 input");
        };
        if k != self.0.cols() {
            candle_core::bail!(
                "bf16 base: input [{m}, {k}] does not fit weight [{}, {}]",
                self.0.rows(),
                self.0.cols()
            );
        }
        let out = self.0.matmul_t(&xs[x0..x1], m);
        Ok((CpuStorage::F32(out), Shape::from((m, self.0.rows()))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.input_grad_tensor(grad)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16_matmul::tests::values;
    use crate::kernels::bf16_matmul::{bf16_bits, bf16_value};
    use candle_core::{Device, Var};

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| bf16_value(bf16_bits(x))).collect()
    }

    #[test]
    fn forward_and_input_gradient_are_the_products_of_the_rounded_operands() {
        // Odd sizes: partial panels, an odd inner size (a zero partner in the last pair).
        let (m, out, inner) = (7, 37, 53);
        let (x, w) = (values(m * inner, 1), values(out * inner, 2));
        let base = Arc::new(Bf16Base::new(&w, out, inner));
        let dev = Device::Cpu;
        let xv = Var::from_vec(x.clone(), (m, inner), &dev).unwrap();
        let y = xv
            .as_tensor()
            .apply_op1(Bf16FrozenMatmul(base.clone()))
            .unwrap();
        let g = values(m * out, 3);
        let gt = Tensor::from_vec(g.clone(), (m, out), &dev).unwrap();
        let grads = (y.clone() * &gt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap();
        let (y, dx) = (
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            dx.to_vec1::<f32>().unwrap(),
        );
        // The references in f64 from the bf16-rounded operands: y = x W^T, dx = g W.
        let (xr, wr, gr) = (rounded(&x), rounded(&w), rounded(&g));
        assert_products("y", &y, &xr, (m, out, inner), |o, i| wr[o * inner + i]);
        assert_products("dx", &dx, &gr, (m, inner, out), |i, o| wr[o * inner + i]);
    }

    /// `got [m, n]` against `sum_p a[r, p] * b(j, p)` over `k` terms, in f64.
    fn assert_products(
        name: &str,
        got: &[f32],
        a: &[f32],
        (m, n, k): (usize, usize, usize),
        b: impl Fn(usize, usize) -> f32,
    ) {
        for r in 0..m {
            for j in 0..n {
                let e: f64 = (0..k).map(|p| a[r * k + p] as f64 * b(j, p) as f64).sum();
                let g = got[r * n + j] as f64;
                assert!(
                    (g - e).abs() < 1e-5 * (1.0 + e.abs()),
                    "{name}[{r},{j}] {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn the_weights_bytes_are_those_of_f32_and_no_more() {
        // Two bf16 packs of a weight whose sizes are multiples of the panel width: 2 bytes per
        // value each, 4 in all, what the dense f32 weight took.
        let (out, inner) = (64, 96);
        let base = Bf16Base::new(&values(out * inner, 4), out, inner);
        assert_eq!((base.rows(), base.cols()), (out, inner));
        assert_eq!(
            base.forward.packed_bytes() + base.backward.packed_bytes(),
            out * inner * 4
        );
    }
}
