//! `silu(gate) * up`, the SwiGLU of the MLP, in one pass ([`silu_mul`]), used by inference and
//! training alike.

use candle_core::backend::BackendStorage;
use candle_core::op::{Silu, UnaryOpT};
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor,
};

use super::cpu::{contiguous_slice, copy_as, each_float, grad_of, mul_in_place};
use super::rows::exp;

/// `silu(gate) * up`, the SwiGLU of the MLP (same shapes).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() {
        return gate.silu()? * up;
    }
    gate.apply_op2(up, SiluMul)
}

#[derive(Debug, Clone, Copy)]
struct SiluMul;

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

/// The gradients of `silu(g) * u` for the incoming gradient `gr`, in one pass: `(dgate,
/// dup)`. The sigmoid takes `e^-|g|` (an exponential of a non-positive number, the one the
/// vectorised [`exp`] is exact to an ulp for) and the side of `g` picks its form.
fn silu_mul_backward_f32(gate: &[f32], up: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let mut dgate = vec![0f32; gate.len()];
    let mut dup = vec![0f32; gate.len()];
    let body = |(dg, du): (&mut [f32], &mut [f32]), start: usize| {
        let end = start + dg.len();
        let (g, u, gr) = (&gate[start..end], &up[start..end], &grad[start..end]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { silu_mul_grad_avx2(g, u, gr, dg, du) };
        }
        silu_mul_grad_body(g, u, gr, dg, du)
    };
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, pair)| body(pair, c * CHUNK));
    (dgate, dup)
}

#[inline(always)]
fn silu_mul_grad_body(g: &[f32], u: &[f32], gr: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..dg.len() {
        let z = exp(-g[i].abs());
        let sigmoid = if g[i] >= 0.0 {
            1.0 / (1.0 + z)
        } else {
            z / (1.0 + z)
        };
        let silu = g[i] * sigmoid;
        let dsilu = sigmoid * (1.0 - silu) + silu;
        dg[i] = gr[i] * u[i] * dsilu;
        du[i] = gr[i] * silu;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_grad_avx2(g: &[f32], u: &[f32], gr: &[f32], dg: &mut [f32], du: &mut [f32]) {
    silu_mul_grad_body(g, u, gr, dg, du)
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
    /// derivative, `sigmoid(x) (1 - silu(x)) + silu(x)`: one pass over f32 on the CPU (eleven
    /// elementwise ops and their buffers otherwise).
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if gate.device().is_cpu()
            && [gate, up, grad].iter().all(|t| t.dtype() == DType::F32)
            && gate.shape() == grad.shape()
            && up.shape() == grad.shape()
        {
            let grad = grad.contiguous()?;
            let guards = [gate, up, &grad].map(|t| t.storage_and_layout());
            let mut slices = Vec::with_capacity(3);
            for (storage, layout) in &guards {
                if let Storage::Cpu(cpu) = &**storage {
                    if layout.is_contiguous() {
                        slices.push(contiguous_slice::<f32>(cpu, layout, "swiglu")?);
                    }
                }
            }
            if let [g, u, gr] = slices[..] {
                let (dgate, dup) = silu_mul_backward_f32(g, u, gr);
                drop(guards);
                let shape = grad.shape();
                return Ok((
                    Some(Tensor::from_vec(dgate, shape, &Device::Cpu)?),
                    Some(Tensor::from_vec(dup, shape, &Device::Cpu)?),
                ));
            }
        }
        let silu = gate.silu()?;
        let sigmoid = (gate.neg()?.exp()? + 1.)?.recip()?;
        let dsilu = ((sigmoid * silu.affine(-1., 1.)?)? + &silu)?;
        let dgate = ((grad * up)? * dsilu)?;
        let dup = (grad * silu)?;
        Ok((grad_of(dgate), grad_of(dup)))
    }
}
