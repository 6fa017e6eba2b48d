//! `x W^T` on the CPU for the few rows of a decode step, with `W` kept as 8-bit or 4-bit
//! integers (a scale per block of 32 along `k`, as GGUF's Q8_0 and Q4_0).
//!
//! A decode step reads every weight once and is bound by those bytes: 8-bit weights are a
//! quarter of f32's, 4-bit ones an eighth. candle's quantised matmul rounds the activation to
//! 8 bits (its dot products are 8-bit integer ones), which moves logits enough to flip near
//! ties between top tokens; and it runs on candle's own worker pool, which this crate keeps at
//! one thread on small machines ([`crate::share_cores_with_candle`]). Here the activation is
//! rounded to 16 bits per block of 32 (a scale per block: an error below 2^-16 of the block's
//! largest value, far under the weights' own rounding), the integer products of a block are
//! summed exactly in 32 bits (AVX2's `vpmaddwd`), and each block's sum is scaled and added in
//! f32. Rows are split over rayon's threads.
//!
//! Every output is one chain of the same operations in the same order whatever the number of
//! rows: a sequence gets the same bits alone or in a batch, and the portable loop gives the
//! bits of the AVX2 kernel.

use super::skinny;

/// Values per scale.
pub(crate) const BLOCK: usize = 32;

/// How the integers of a [`QuantRows`] are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuantFormat {
    /// One signed byte per value, `w = q * d` with `d = max |w| / 127` (GGUF's Q8_0).
    Int8,
    /// Two values per byte, `w = (q - 8) * d` with `q` in `0..16` and `d` the block's
    /// largest-magnitude value over -8 (GGUF's Q4_0). Byte `i` of a block holds value `i` in
    /// its low half and value `i + 16` in its high half.
    Int4,
}

impl QuantFormat {
    fn bytes_per_block(self) -> usize {
        match self {
            QuantFormat::Int8 => BLOCK,
            QuantFormat::Int4 => BLOCK / 2,
        }
    }
}

/// A weight `[n, k]` quantised by blocks of 32 along `k` (the last block of a row padded with
/// zeros), for [`QuantRows::matmul_t`].
#[derive(Debug, Clone)]
pub(crate) struct QuantRows {
    format: QuantFormat,
    n: usize,
    k: usize,
    /// Blocks per row (`k / 32` rounded up).
    blocks: usize,
    /// `[n, blocks]`.
    scales: Vec<f32>,
    /// `[n, blocks, bytes per block]`.
    bytes: Vec<u8>,
}

impl QuantRows {
    /// Quantises the row-major `w [n, k]`.
    pub(crate) fn new(format: QuantFormat, w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "a [{n}, {k}] weight has {} values", n * k);
        let blocks = k.div_ceil(BLOCK);
        let per = format.bytes_per_block();
        let mut scales = vec![0f32; n * blocks];
        let mut bytes = vec![0u8; n * blocks * per];
        let mut padded = [0f32; BLOCK];
        for j in 0..n {
            for b in 0..blocks {
                let lo = b * BLOCK;
                let hi = (lo + BLOCK).min(k);
                padded.fill(0.0);
                padded[..hi - lo].copy_from_slice(&w[j * k + lo..j * k + hi]);
                let out = &mut bytes[(j * blocks + b) * per..][..per];
                scales[j * blocks + b] = match format {
                    QuantFormat::Int8 => quantize_int8(&padded, out),
                    QuantFormat::Int4 => quantize_int4(&padded, out),
                };
            }
        }
        QuantRows {
            format,
            n,
            k,
            blocks,
            scales,
            bytes,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.n
    }

    pub(crate) fn cols(&self) -> usize {
        self.k
    }

    /// The f32 values the weight stands for, `[n, k]`.
    #[cfg(test)]
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        self.dequantize_rows(0, self.n, &mut out);
        out
    }

    /// Rows `first..first + count` dequantised into `out` (`[count, k]`).
    #[cfg(test)]
    fn dequantize_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        let per = self.format.bytes_per_block();
        for (i, row) in out.chunks_exact_mut(self.k).take(count).enumerate() {
            let j = first + i;
            for (b, chunk) in row.chunks_mut(BLOCK).enumerate() {
                let d = self.scales[j * self.blocks + b];
                let q = &self.bytes[(j * self.blocks + b) * per..][..per];
                for (p, v) in chunk.iter_mut().enumerate() {
                    *v = self.format.value(q, p) as f32 * d;
                }
            }
        }
    }

    /// `x [m, k] @ W^T` as `[m, n]`.
    pub(crate) fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "{m} rows of {} values", self.k);
        let x = Activations::new(x, m, self.k);
        skinny::by_weight_rows(m, self.n, |first, rows, out_t| {
            #[cfg(target_arch = "x86_64")]
            if skinny::has_avx2_fma() {
                // SAFETY: the CPU has the features; the kernel reads weight rows
                // `first..first + rows` (inside `n`, by the chunking) and the `m` rows of `x`,
                // each `blocks * 32` values long.
                unsafe { avx::dot_rows(self, &x, first, rows, out_t) };
                return;
            }
            portable::dot_rows(self, &x, first, rows, out_t)
        })
    }
}

/// The rows of `x` rounded to 16 bits per block of 32: `x = q * d`, `d = max |x| / 32767`,
/// zeros past `k`.
struct Activations {
    m: usize,
    blocks: usize,
    /// `[m, blocks * 32]`.
    q: Vec<i16>,
    /// `[m, blocks]`.
    d: Vec<f32>,
}

impl Activations {
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let blocks = k.div_ceil(BLOCK);
        let mut q = vec![0i16; m * blocks * BLOCK];
        let mut d = vec![0f32; m * blocks];
        for r in 0..m {
            for b in 0..blocks {
                let values = &x[r * k + b * BLOCK..r * k + ((b + 1) * BLOCK).min(k)];
                let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
                // A NaN or infinite activation makes its row's outputs NaN, as an f32 product
                // would, instead of being rounded to some integer.
                if !amax.is_finite() || values.iter().any(|v| v.is_nan()) {
                    d[r * blocks + b] = f32::NAN;
                    continue;
                }
                let scale = amax / 32767.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                let out = &mut q[(r * blocks + b) * BLOCK..][..values.len()];
                for (o, v) in out.iter_mut().zip(values) {
                    *o = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
                }
                d[r * blocks + b] = scale;
            }
        }
        Activations { m, blocks, q, d }
    }
}

/// The same sums as the AVX2 kernel, in the same order: eight lanes, lane `l` of a block the
/// integer sum of values `2l, 2l + 1, 16 + 2l, 17 + 2l` (`vpmaddwd` of each half, then added),
/// scaled and added in f32 with a fused multiply-add, and the lanes added up as `hsum_avx`.
mod portable {
    use super::{Activations, QuantRows, BLOCK};

    pub(super) fn dot_rows(
        w: &QuantRows,
        x: &Activations,
        first: usize,
        rows: usize,
        out_t: &mut [f32],
    ) {
        let per = w.format.bytes_per_block();
        for i in 0..rows {
            let j = first + i;
            for r in 0..x.m {
                let mut lanes = [0f32; 8];
                for b in 0..w.blocks {
                    let bytes = &w.bytes[(j * w.blocks + b) * per..][..per];
                    let xq = &x.q[(r * x.blocks + b) * BLOCK..][..BLOCK];
                    let scale = w.scales[j * w.blocks + b] * x.d[r * x.blocks + b];
                    for (l, lane) in lanes.iter_mut().enumerate() {
                        let sum: i32 = [2 * l, 2 * l + 1, 16 + 2 * l, 17 + 2 * l]
                            .iter()
                            .map(|&p| w.format.value(bytes, p) * xq[p] as i32)
                            .sum();
                        *lane = (sum as f32).mul_add(scale, *lane);
                    }
                }
                let [a, b, c, d, e, f, g, h] = lanes;
                out_t[i * x.m + r] = ((a + e) + (c + g)) + ((b + f) + (d + h));
            }
        }
    }
}

impl QuantFormat {
    /// The signed integer of value `p` of a block.
    fn value(self, q: &[u8], p: usize) -> i32 {
        match self {
            QuantFormat::Int8 => q[p] as i8 as i32,
            QuantFormat::Int4 => {
                let byte = q[p % (BLOCK / 2)];
                let nibble = if p < BLOCK / 2 {
                    byte & 0x0F
                } else {
                    byte >> 4
                };
                nibble as i32 - 8
            }
        }
    }
}

/// Q8_0's rounding: `d = max |w| / 127`, `q = round(w / d)`. Returns `d`.
fn quantize_int8(w: &[f32; BLOCK], out: &mut [u8]) -> f32 {
    let amax = w.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in out.iter_mut().zip(w) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8 as u8;
    }
    d
}

/// Q4_0's rounding: `d` the largest-magnitude value over -8, `q = min(15, trunc(w / d + 8.5))`.
/// Returns `d`.
fn quantize_int4(w: &[f32; BLOCK], out: &mut [u8]) -> f32 {
    let max = w
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * inv + 8.5) as u8).min(15);
    for (i, o) in out.iter_mut().enumerate() {
        *o = q(w[i]) | q(w[i + BLOCK / 2]) << 4;
    }
    d
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{Activations, QuantFormat, QuantRows, BLOCK};

    /// Tiles of 2 weight rows x up to 4 input rows: each block of a weight row is widened to
    /// 16-bit integers once per tile and multiplied with every input row's block.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(
        w: &QuantRows,
        x: &Activations,
        first: usize,
        rows: usize,
        out_t: &mut [f32],
    ) {
        match w.format {
            QuantFormat::Int8 => rows_of::<false>(w, x, first, rows, out_t),
            QuantFormat::Int4 => rows_of::<true>(w, x, first, rows, out_t),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_of<const INT4: bool>(
        w: &QuantRows,
        x: &Activations,
        first: usize,
        rows: usize,
        out_t: &mut [f32],
    ) {
        let m = x.m;
        let mut j = 0;
        while j < rows {
            let wr = (rows - j).min(2);
            let mut r = 0;
            while r < m {
                let xr = (m - r).min(4);
                let at = (first, j, r);
                match (wr, xr) {
                    (2, 4) => tile::<2, 4, INT4>(w, x, at, out_t),
                    (2, 3) => tile::<2, 3, INT4>(w, x, at, out_t),
                    (2, 2) => tile::<2, 2, INT4>(w, x, at, out_t),
                    (2, _) => tile::<2, 1, INT4>(w, x, at, out_t),
                    (_, 4) => tile::<1, 4, INT4>(w, x, at, out_t),
                    (_, 3) => tile::<1, 3, INT4>(w, x, at, out_t),
                    (_, 2) => tile::<1, 2, INT4>(w, x, at, out_t),
                    _ => tile::<1, 1, INT4>(w, x, at, out_t),
                }
                r += xr;
            }
            j += wr;
        }
    }

    /// A block's 32 integers as two vectors of 16 (values 0..16 and 16..32).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const INT4: bool>(at: *const u8) -> (__m256i, __m256i) {
        if INT4 {
            // Byte i holds value i in its low half and value i + 16 in its high half.
            let raw = _mm_loadu_si128(at as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let eight = _mm256_set1_epi16(8);
            let low = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
            let high = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
            (_mm256_sub_epi16(low, eight), _mm256_sub_epi16(high, eight))
        } else {
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(at as *const __m128i)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(at.add(16) as *const __m128i)),
            )
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const R: usize, const C: usize, const INT4: bool>(
        w: &QuantRows,
        x: &Activations,
        (first, j, r): (usize, usize, usize),
        out_t: &mut [f32],
    ) {
        let per = w.format.bytes_per_block();
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..w.blocks {
            let mut lo = [_mm256_setzero_si256(); R];
            let mut hi = [_mm256_setzero_si256(); R];
            let mut dw = [0f32; R];
            for a in 0..R {
                let at = (first + j + a) * w.blocks + b;
                (lo[a], hi[a]) = block::<INT4>(w.bytes.as_ptr().add(at * per));
                dw[a] = *w.scales.get_unchecked(at);
            }
            for c in 0..C {
                let at = (r + c) * x.blocks + b;
                let xp = x.q.as_ptr().add(at * BLOCK);
                let x_lo = _mm256_loadu_si256(xp as *const __m256i);
                let x_hi = _mm256_loadu_si256(xp.add(16) as *const __m256i);
                let dx = *x.d.get_unchecked(at);
                for a in 0..R {
                    // At most 4 x 127 x 32767 < 2^24 per lane: exact in i32 and in f32.
                    let sum = _mm256_add_epi32(
                        _mm256_madd_epi16(lo[a], x_lo),
                        _mm256_madd_epi16(hi[a], x_hi),
                    );
                    acc[a][c] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(sum),
                        _mm256_set1_ps(dw[a] * dx),
                        acc[a][c],
                    );
                }
            }
        }
        let m = x.m;
        for a in 0..R {
            for c in 0..C {
                out_t[(j + a) * m + r + c] = super::super::skinny::hsum_avx(acc[a][c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::skinny::tests::values;

    const FORMATS: [QuantFormat; 2] = [QuantFormat::Int8, QuantFormat::Int4];

    /// `x W^T` in f64 from the dequantised weight and the unrounded `x`, with the bound the
    /// activations' rounding allows (half a step of each block's scale, times the weights).
    fn reference(q: &QuantRows, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
        let (n, k) = (q.n, q.k);
        let w = q.dequantize();
        let acts = Activations::new(x, m, k);
        let mut want = vec![0f64; m * n];
        let mut bound = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let wp = w[j * k + p] as f64;
                    want[r * n + j] += wp * x[r * k + p] as f64;
                    bound[r * n + j] += wp.abs() * acts.d[r * acts.blocks + p / BLOCK] as f64 * 0.5;
                }
            }
        }
        (want, bound)
    }

    #[test]
    fn within_the_activations_rounding_of_the_dequantised_product() {
        // k not a multiple of 8 or 32, a single weight row, and 16 input rows.
        for (m, n, k) in [
            (1, 1, 5),
            (3, 5, 37),
            (4, 33, 64),
            (5, 17, 100),
            (16, 70, 576),
        ] {
            for format in FORMATS {
                let (x, w) = (values(m * k, 1), values(n * k, 2));
                let q = QuantRows::new(format, &w, n, k);
                let got = q.matmul_t(&x, m);
                let (want, bound) = reference(&q, &x, m);
                for i in 0..m * n {
                    let err = (got[i] as f64 - want[i]).abs();
                    // The rounding of the 16-bit activations, plus f32 sums.
                    let allowed = bound[i] + 1e-6 * (1.0 + want[i].abs());
                    assert!(
                        err <= allowed,
                        "{format:?} {m}x{n}x{k} [{i}]: {} vs {} (allowed {allowed:e})",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }

    #[test]
    fn the_portable_loop_gives_the_kernels_bits() {
        let (m, n, k) = (6, 19, 200);
        let (x, w) = (values(m * k, 5), values(n * k, 6));
        for format in FORMATS {
            let q = QuantRows::new(format, &w, n, k);
            let acts = Activations::new(&x, m, k);
            let mut portable_t = vec![0f32; n * m];
            portable::dot_rows(&q, &acts, 0, n, &mut portable_t);
            let got = q.matmul_t(&x, m);
            for j in 0..n {
                for r in 0..m {
                    assert_eq!(
                        got[r * n + j].to_bits(),
                        portable_t[j * m + r].to_bits(),
                        "{format:?} row {r} column {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_weights_are_within_half_a_step_of_the_originals() {
        let (n, k) = (7, 100);
        let w: Vec<f32> = values(n * k, 9).iter().map(|v| v * 3.0).collect();
        for format in FORMATS {
            let q = QuantRows::new(format, &w, n, k);
            let back = q.dequantize();
            for j in 0..n {
                for b in 0..k.div_ceil(BLOCK) {
                    let d = q.scales[j * q.blocks + b];
                    assert!(d != 0.0);
                    for p in b * BLOCK..((b + 1) * BLOCK).min(k) {
                        let (orig, got) = (w[j * k + p], back[j * k + p]);
                        // Q4_0 reaches -8 steps but only +7: a value past +7 steps is clamped
                        // there and may be off by up to a whole step.
                        let clamped = format == QuantFormat::Int4 && got == 7.0 * d;
                        let bound = if clamped { d.abs() } else { d.abs() * 0.5 };
                        assert!(
                            (orig - got).abs() <= bound * (1.0 + 1e-6),
                            "{format:?} row {j} value {p}: {orig} -> {got} (step {d})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_among_others() {
        let (n, k) = (37, 203);
        let w = values(n * k, 3);
        let x = values(9 * k, 4);
        for format in FORMATS {
            let q = QuantRows::new(format, &w, n, k);
            let all = q.matmul_t(&x, 9);
            for r in 0..9 {
                let alone = q.matmul_t(&x[r * k..(r + 1) * k], 1);
                assert_eq!(alone, all[r * n..(r + 1) * n], "{format:?} row {r}");
            }
        }
    }

    #[test]
    fn a_non_finite_activation_gives_its_row_nan_and_leaves_the_others() {
        let (m, n, k) = (3, 5, 70);
        let w = values(n * k, 7);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = values(m * k, 8);
            x[k + 40] = bad;
            for format in FORMATS {
                let q = QuantRows::new(format, &w, n, k);
                let got = q.matmul_t(&x, m);
                assert!(got[n..2 * n].iter().all(|v| v.is_nan()), "{format:?} {bad}");
                assert!(got[..n].iter().chain(&got[2 * n..]).all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn zero_blocks_and_the_extremes_round_trip() {
        let mut w = vec![0f32; 64];
        w[40] = -2.0;
        w[41] = 2.0;
        w[63] = 1.0;
        for format in FORMATS {
            let back = QuantRows::new(format, &w, 1, 64).dequantize();
            assert!(back[..32].iter().all(|&v| v == 0.0), "{format:?}");
            assert!((back[40] + 2.0).abs() < 1e-6, "{format:?}: {}", back[40]);
        }
        // Q8_0 is symmetric; Q4_0 reaches -8 steps but only +7.
        let q8 = QuantRows::new(QuantFormat::Int8, &w, 1, 64).dequantize();
        assert!((q8[41] - 2.0).abs() < 1e-6, "{}", q8[41]);
        assert_eq!(
            QuantRows::new(QuantFormat::Int4, &w, 1, 64).dequantize()[41],
            1.75
        );
    }
}
