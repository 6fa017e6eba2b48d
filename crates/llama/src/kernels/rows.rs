//! Loops over one row of scores or logits (maximum, sum, exponentials, softmax and its
//! backward), written so that the compiler vectorises them, with AVX2 and FMA where the CPU has
//! them. Shared by the tiled attention and the fused cross-entropy.

/// The softmax of `scale * x + bias` in place; returns the row's maximum and sum.
pub(crate) fn softmax(x: &mut [f32], scale: f32, bias: Option<&[f32]>) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { avx2::softmax(x, scale, bias) };
    }
    softmax_body(x, scale, bias)
}

/// `exp(scale * x + bias - max) / sum` in place, with a forward's statistics.
pub(crate) fn scaled_exp(x: &mut [f32], scale: f32, bias: Option<&[f32]>, max: f32, sum: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        return unsafe { avx2::scaled_exp(x, scale, bias, max, sum) };
    }
    scaled_exp_body(x, scale, bias, max, sum)
}

/// `dp = scale * p * (dp - sum(dp * p))` in place: the softmax's backward.
pub(crate) fn softmax_grad(p: &[f32], dp: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        return unsafe { avx2::softmax_grad(p, dp, scale) };
    }
    softmax_grad_body(p, dp, scale)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn softmax(x: &mut [f32], scale: f32, bias: Option<&[f32]>) -> (f32, f32) {
        super::softmax_body(x, scale, bias)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn scaled_exp(x: &mut [f32], scale: f32, bias: Option<&[f32]>, max: f32, sum: f32) {
        super::scaled_exp_body(x, scale, bias, max, sum)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn softmax_grad(p: &[f32], dp: &mut [f32], scale: f32) {
        super::softmax_grad_body(p, dp, scale)
    }
}

#[inline(always)]
fn scale_and_bias(x: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    match bias {
        Some(bias) => {
            for (x, b) in x.iter_mut().zip(bias) {
                *x = *x * scale + b;
            }
        }
        None => {
            for x in x.iter_mut() {
                *x *= scale;
            }
        }
    }
}

#[inline(always)]
fn softmax_body(x: &mut [f32], scale: f32, bias: Option<&[f32]>) -> (f32, f32) {
    scale_and_bias(x, scale, bias);
    let max = max(x);
    let sum = exp_sum(x, max);
    let inv = 1.0 / sum;
    for x in x.iter_mut() {
        *x *= inv;
    }
    (max, sum)
}

/// One pass: the same `scale * x + bias`, `exp(. - max)` and `* (1 / sum)` as
/// [`softmax_body`], rounded the same way, so a recomputed row equals the forward's.
#[inline(always)]
fn scaled_exp_body(x: &mut [f32], scale: f32, bias: Option<&[f32]>, max: f32, sum: f32) {
    let inv = 1.0 / sum;
    match bias {
        Some(bias) => {
            for (x, b) in x.iter_mut().zip(bias) {
                *x = exp(*x * scale + b - max) * inv;
            }
        }
        None => {
            for x in x.iter_mut() {
                *x = exp(*x * scale - max) * inv;
            }
        }
    }
}

/// `x = exp(x - max)` in place, returning the sum (eight lanes, in the same order as
/// before). Two passes: the compiler vectorises the exponentials only in a loop of their own.
#[inline(always)]
fn exp_sum(x: &mut [f32], max: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] += c[l];
        }
    }
    let mut s = fold(lanes);
    for v in chunks.remainder() {
        s += *v;
    }
    s
}

#[inline(always)]
fn softmax_grad_body(p: &[f32], dp: &mut [f32], scale: f32) {
    let mut lanes = [0f32; 8];
    let mut pc = p.chunks_exact(8);
    let mut gc = dp.chunks_exact(8);
    for (p, g) in (&mut pc).zip(&mut gc) {
        for l in 0..8 {
            lanes[l] += p[l] * g[l];
        }
    }
    let mut dot = fold(lanes);
    for (p, g) in pc.remainder().iter().zip(gc.remainder()) {
        dot += p * g;
    }
    for (g, p) in dp.iter_mut().zip(p) {
        *g = p * (*g - dot) * scale;
    }
}

/// The maximum of a non-empty row, in eight lanes.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let mut m = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    m
}

#[inline(always)]
fn fold(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// `e^x` to about one ulp for `x <= 0` (Cody-Waite reduction and Cephes' polynomial),
/// branch-free so that it vectorises; 0 below `-87` (and for `-inf`, a masked score).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // SAFETY: `xc` is clamped, so `n + 127` is in [2, 254]: the conversion cannot overflow.
    // (`as i32` saturates, a scalar fix-up per lane that kept every loop calling this from
    // vectorising: exp was 13% of a 2,048-token training step, 3% after.)
    let biased: i32 = unsafe { (n + 127.0).to_int_unchecked() };
    let two_n = f32::from_bits((biased as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * two_n
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_recomputed_row_equals_the_forward_row_bit_for_bit() {
        let raw: Vec<f32> = (0..77)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let bias: Vec<f32> = (0..77)
            .map(|i| if i % 5 == 0 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        for b in [Some(bias.as_slice()), None] {
            let mut forward = raw.clone();
            let (max, sum) = super::softmax(&mut forward, 0.125, b);
            let mut again = raw.clone();
            super::scaled_exp(&mut again, 0.125, b, max, sum);
            assert_eq!(forward, again);
            let total: f32 = forward.iter().sum();
            assert!((total - 1.0).abs() < 1e-6, "{total}");
        }
    }

    #[test]
    fn exp_is_within_two_ulps_of_the_library_and_zero_when_masked() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let want = x.exp();
            let got = super::exp(x);
            worst = worst.max(((got - want) / want).abs() as f64);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-200.0), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
    }
}
