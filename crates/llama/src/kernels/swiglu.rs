//! `silu(gate) * up`, the SwiGLU of the MLP, in one pass ([`silu_mul`]), used by inference and
//! training alike.

use candle_core::backend::BackendStorage;
use candle_core::op::{Silu, UnaryOpT};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::cpu::{contiguous_slice, copy_as, each_float, grad_of, mul_in_place};

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
