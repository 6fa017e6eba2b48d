//! The LoRA matmuls of `teamtune_llama::kernels` (dropout with the down projection, frozen base
//! with the up projection) against the composed ops they replace (see `training_ops.rs`).

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::kernels::*;
use teamtune_llama::kernels;

// ---------------------------------------------------------------------------------------------
// LoRA: dropout with the down projection, frozen base with the up projection.

fn ref_dropout_matmul(x: &Tensor, a: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    Ok(teamtune_llama::kernels::seeded_dropout(x, p, seed)?.matmul(&a.t()?)?)
}

/// The training forward's LoRA projection before the fused op: frozen base, `h B^T * scale`
/// cast to the base's dtype, sum.
fn ref_lora_linear(x: &Tensor, w: &Tensor, h: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let y = x.apply_op2(w, teamtune_llama::kernels::FrozenMatmul)?;
    let u = (h.matmul(&b.t()?)? * scale)?.to_dtype(y.dtype())?;
    Ok((y + u)?)
}

#[test]
fn dropout_matmul_equals_seeded_dropout_then_matmul() -> Result<()> {
    let x = uniform(&[37, 24], 2.0, 151, DType::F32)?;
    let a = uniform(&[8, 24], 0.3, 152, DType::F32)?;
    for (p, seed) in [(0.2f32, 7u64), (0.5, 8)] {
        let got = kernels::dropout_matmul(&x, &a, p, seed)?;
        let want = ref_dropout_matmul(&x, &a, p, seed)?;
        assert_identical(&got, &want, &format!("p {p} seed {seed}"))?;
    }
    assert!(
        max_abs_diff(
            &kernels::dropout_matmul(&x, &a, 0.2, 7)?,
            &kernels::dropout_matmul(&x, &a, 0.2, 9)?
        )? > 0.0,
        "the mask must depend on the seed"
    );
    // Gradients (the mask drawn again in the backward) equal the composed ones.
    let r = uniform(&[37, 8], 1.0, 153, DType::F32)?;
    let got = grads_of(&[x.clone(), a.clone()], &r, &|v| {
        Ok(kernels::dropout_matmul(&v[0], &v[1], 0.2, 7)?)
    })?;
    let want = grads_of(&[x.clone(), a.clone()], &r, &|v| {
        ref_dropout_matmul(&v[0], &v[1], 0.2, 7)
    })?;
    for (i, name) in ["dx", "da"].iter().enumerate() {
        assert_close(&got[i], &want[i], 1e-6, name)?;
    }
    // The dropped inputs get exactly no gradient.
    let mask = teamtune_llama::kernels::dropout_mask(x.shape(), 0.2, 7, &Device::Cpu)?;
    let dropped_grad = (got[0].abs()? * mask.eq(0.0)?.to_dtype(DType::F32)?)?;
    assert_eq!(max_abs(&dropped_grad)?, 0.0);
    Ok(())
}

#[test]
fn dropout_matmul_gradients_match_finite_differences() -> Result<()> {
    let x = uniform(&[9, 12], 2.0, 161, DType::F64)?;
    let a = uniform(&[4, 12], 0.5, 162, DType::F64)?;
    let r = uniform(&[9, 4], 1.0, 163, DType::F64)?;
    let f = |v: &[Tensor]| Ok(kernels::dropout_matmul(&v[0], &v[1], 0.3, 11)?);
    for which in 0..2 {
        check_finite_differences(&[x.clone(), a.clone()], which, &r, &f, "dropout_matmul")?;
    }
    Ok(())
}

#[test]
fn lora_linear_equals_the_composed_projection() -> Result<()> {
    // Base in the model's dtype, adapter in f32 (as the model keeps its factors).
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let x = uniform(&[13, 24], 2.0, 171, dtype)?;
        let w = uniform(&[40, 24], 0.3, 172, dtype)?;
        let h = uniform(&[13, 8], 1.0, 173, DType::F32)?;
        let b = uniform(&[40, 8], 0.3, 174, DType::F32)?;
        let got = kernels::lora_linear(&x, &w, &h, &b, 2.0)?;
        assert_eq!(got.dtype(), dtype);
        let want = ref_lora_linear(&x, &w, &h, &b, 2.0)?;
        assert_identical(&got, &want, &format!("{dtype:?}"))?;
        let (rel, r_dtype) = match dtype {
            DType::BF16 => (3e-2, DType::F32),
            DType::F64 => (1e-6, DType::F64),
            _ => (1e-6, DType::F32),
        };
        let r = uniform(&[13, 40], 1.0, 175, r_dtype)?;
        let got = grads_of(&[x.clone(), h.clone(), b.clone()], &r, &|v| {
            Ok(kernels::lora_linear(&v[0], &w, &v[1], &v[2], 2.0)?)
        })?;
        let want = grads_of(&[x.clone(), h.clone(), b.clone()], &r, &|v| {
            ref_lora_linear(&v[0], &w, &v[1], &v[2], 2.0)
        })?;
        for (i, name) in ["dx", "dh", "db"].iter().enumerate() {
            assert_close(&got[i], &want[i], rel, &format!("{dtype:?} {name}"))?;
        }
    }
    Ok(())
}

#[test]
fn lora_linear_gradients_match_finite_differences() -> Result<()> {
    let x = uniform(&[7, 10], 2.0, 181, DType::F64)?;
    let w = uniform(&[12, 10], 0.5, 182, DType::F64)?;
    let h = uniform(&[7, 3], 1.0, 183, DType::F64)?;
    let b = uniform(&[12, 3], 0.5, 184, DType::F64)?;
    let r = uniform(&[7, 12], 1.0, 185, DType::F64)?;
    let f = |v: &[Tensor]| Ok(kernels::lora_linear(&v[0], &w, &v[1], &v[2], 1.5)?);
    for which in 0..3 {
        check_finite_differences(
            &[x.clone(), h.clone(), b.clone()],
            which,
            &r,
            &f,
            "lora_linear",
        )?;
    }
    Ok(())
}
