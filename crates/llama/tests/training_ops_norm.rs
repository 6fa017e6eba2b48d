//! RMSNorm, RoPE and `silu(gate) * up` of `teamtune_llama::kernels` against the composed
//! candle ops they replace: forwards bit for bit, gradients equal, and in f64 finite
//! differences (see `training_ops.rs`).

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use common::kernels::*;
use teamtune_llama::kernels;

#[test]
fn rms_norm_forward_is_bit_identical_to_the_composed_norm() -> Result<()> {
    for dtype in DTYPES {
        let (x, w) = rms_case(dtype, 51)?;
        for eps in [1e-5, 1e-6] {
            let got = kernels::rms_norm(&x, &w, eps)?;
            let want = ref_rms_norm(&x, &w, eps)?;
            assert_eq!(got.dtype(), dtype);
            assert_identical(&got, &want, &format!("{dtype:?} eps {eps}"))?;
        }
        // A strided input.
        let xt = uniform(&[2, 24, 5], 3.0, 52, dtype)?.transpose(1, 2)?;
        assert!(!xt.is_contiguous());
        assert_identical(
            &kernels::rms_norm(&xt, &w, 1e-5)?,
            &ref_rms_norm(&xt, &w, 1e-5)?,
            &format!("{dtype:?} strided"),
        )?;
    }
    // A long row, where candle's vectorised sum differs from a naive one.
    let x = uniform(&[3, 576], 2.0, 53, DType::F32)?;
    let w = uniform(&[576], 1.0, 54, DType::F32)?;
    assert_identical(
        &kernels::rms_norm(&x, &w, 1e-5)?,
        &ref_rms_norm(&x, &w, 1e-5)?,
        "hidden 576",
    )?;
    Ok(())
}

#[test]
fn rms_norm_gradients_equal_the_composed_ones_and_the_weight_gets_none() -> Result<()> {
    for (dtype, rel) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let (x, w) = rms_case(dtype, 61)?;
        let r = uniform(x.dims(), 1.0, 62, upcast(dtype))?;
        let got = grads_of(std::slice::from_ref(&x), &r, &|v| {
            Ok(kernels::rms_norm(&v[0], &w, 1e-5)?)
        })?;
        let want = grads_of(std::slice::from_ref(&x), &r, &|v| {
            ref_rms_norm(&v[0], &w, 1e-5)
        })?;
        assert_close(&got[0], &want[0], rel, &format!("{dtype:?} dx"))?;
    }
    let (x, w) = rms_case(DType::F32, 63)?;
    let wv = Var::from_tensor(&w)?;
    let xv = Var::from_tensor(&x)?;
    let grads = kernels::rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-5)?
        .sum_all()?
        .backward()?;
    assert!(grads.get(xv.as_tensor()).is_some());
    assert!(grads.get(wv.as_tensor()).is_none(), "the weight is frozen");
    Ok(())
}

#[test]
fn rms_norm_gradient_matches_finite_differences() -> Result<()> {
    let (x, w) = rms_case(DType::F64, 71)?;
    let r = uniform(x.dims(), 1.0, 72, DType::F64)?;
    check_finite_differences(
        &[x],
        0,
        &r,
        &|v| Ok(kernels::rms_norm(&v[0], &w, 1e-5)?),
        "rms_norm",
    )
}

// ---------------------------------------------------------------------------------------------
// RoPE.

#[test]
fn rope_forward_is_bit_identical_to_the_composed_rotation() -> Result<()> {
    for dtype in DTYPES {
        let x = rope_input(dtype, 81)?;
        let (b, _, t, d) = x.dims4()?;
        let (cos, sin) = rope_tables(b, t, d / 2, dtype)?;
        let got = kernels::rope(&x, &cos, &sin)?;
        let want = ref_rope(&x, &cos, &sin)?;
        assert_eq!(got.dtype(), dtype);
        assert_identical(&got, &want, &format!("{dtype:?}"))?;
        let xc = x.contiguous()?;
        assert_identical(&kernels::rope(&xc, &cos, &sin)?, &want, "contiguous")?;
        // Tables shared by the batch.
        let (c1, s1) = (cos.narrow(0, 0, 1)?, sin.narrow(0, 0, 1)?);
        assert_identical(
            &kernels::rope(&x, &c1, &s1)?,
            &ref_rope(&x, &c1, &s1)?,
            &format!("{dtype:?} batch-1 tables"),
        )?;
    }
    Ok(())
}

#[test]
fn rope_gradients_equal_the_composed_ones() -> Result<()> {
    for (dtype, rel) in [(DType::F64, 1e-12), (DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        let x = rope_input(dtype, 91)?;
        let (b, _, t, d) = x.dims4()?;
        let (cos, sin) = rope_tables(b, t, d / 2, dtype)?;
        let r = uniform(x.dims(), 1.0, 92, upcast(dtype))?;
        let got = grads_of(std::slice::from_ref(&x), &r, &|v| {
            Ok(kernels::rope(&v[0], &cos, &sin)?)
        })?;
        let want = grads_of(std::slice::from_ref(&x), &r, &|v| {
            ref_rope(&v[0], &cos, &sin)
        })?;
        assert_close(&got[0], &want[0], rel, &format!("{dtype:?} dx"))?;
    }
    Ok(())
}

#[test]
fn rope_gradient_matches_finite_differences() -> Result<()> {
    let x = rope_input(DType::F64, 101)?;
    let (b, _, t, d) = x.dims4()?;
    let (cos, sin) = rope_tables(b, t, d / 2, DType::F64)?;
    let r = uniform(x.dims(), 1.0, 102, DType::F64)?;
    check_finite_differences(
        &[x],
        0,
        &r,
        &|v| Ok(kernels::rope(&v[0], &cos, &sin)?),
        "rope",
    )
}

#[test]
fn silu_mul_forward_is_bit_identical_to_the_composed_product() -> Result<()> {
    for dtype in DTYPES {
        let (gate, up) = mlp_case(dtype, 111)?;
        let got = kernels::silu_mul(&gate, &up)?;
        assert_eq!(got.dtype(), dtype);
        assert_identical(&got, &ref_silu_mul(&gate, &up)?, &format!("{dtype:?}"))?;
        let upt = uniform(&[2, 16, 5], 2.0, 112, dtype)?.transpose(1, 2)?;
        assert_identical(
            &kernels::silu_mul(&gate, &upt)?,
            &ref_silu_mul(&gate, &upt)?,
            &format!("{dtype:?} strided up"),
        )?;
    }
    // Long enough to be split over threads (f32's one-pass path), not a multiple of the
    // split, and starting inside its storage (a narrowed view).
    let gate = uniform(&[4, 7, 1000], 4.0, 113, DType::F32)?.narrow(0, 1, 3)?;
    let up = uniform(&[3, 7, 1000], 2.0, 114, DType::F32)?;
    assert_identical(
        &kernels::silu_mul(&gate, &up)?,
        &ref_silu_mul(&gate, &up)?,
        "F32 long",
    )?;
    Ok(())
}

/// The gradients of the fused op against the composed ops', within `rel` of the largest.
fn check_silu_mul_gradients(
    gate: &Tensor,
    up: &Tensor,
    r: &Tensor,
    rel: f64,
    what: &str,
) -> Result<()> {
    let got = grads_of(&[gate.clone(), up.clone()], r, &|v| {
        Ok(kernels::silu_mul(&v[0], &v[1])?)
    })?;
    let want = grads_of(&[gate.clone(), up.clone()], r, &|v| {
        ref_silu_mul(&v[0], &v[1])
    })?;
    for (i, name) in ["dgate", "dup"].iter().enumerate() {
        assert_close(&got[i], &want[i], rel, &format!("{what} {name}"))?;
    }
    Ok(())
}

#[test]
fn silu_mul_gradients_equal_the_composed_ones() -> Result<()> {
    for (dtype, rel) in [(DType::F64, 1e-12), (DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        let (gate, up) = mlp_case(dtype, 121)?;
        let r = uniform(gate.dims(), 1.0, 122, upcast(dtype))?;
        check_silu_mul_gradients(&gate, &up, &r, rel, &format!("{dtype:?}"))?;
    }
    // f32 long enough for the one-pass backward to split over threads, with gates far into
    // both tails of the sigmoid.
    let gate = uniform(&[3, 7, 1000], 30.0, 123, DType::F32)?;
    let up = uniform(&[3, 7, 1000], 2.0, 124, DType::F32)?;
    let r = uniform(gate.dims(), 1.0, 125, DType::F32)?;
    check_silu_mul_gradients(&gate, &up, &r, 1e-6, "F32 long")
}

#[test]
fn silu_mul_gradients_match_finite_differences() -> Result<()> {
    let (gate, up) = mlp_case(DType::F64, 131)?;
    let r = uniform(gate.dims(), 1.0, 132, DType::F64)?;
    let f = |v: &[Tensor]| Ok(kernels::silu_mul(&v[0], &v[1])?);
    for which in 0..2 {
        check_finite_differences(&[gate.clone(), up.clone()], which, &r, &f, "silu_mul")?;
    }
    Ok(())
}
