//! `x W^T` on the CPU for the few rows of a decode step, with `W` kept as 8-bit or 4-bit
//! integers (a scale per block of 32 along `k`, as GGUF's Q8_0 and Q4_0) and `x` kept in f32.
//!
//! A decode step reads every weight once and is bound by those bytes: 8-bit weights are a
//! quarter of f32's, 4-bit ones an eighth. candle's quantised matmul also rounds the activation
//! to 8 bits (its dot products are integer ones), which moves logits enough to flip near ties
//! between top tokens; and it runs on candle's own worker pool, which this crate keeps at one
//! thread on small machines ([`crate::share_cores_with_candle`]). Here each weight is widened
//! to the f32 it stands for (`q * d`, exactly what dequantising gives) right before its FMA,
//! the activation is not rounded at all, and the rows are split over rayon's threads.
//!
//! The products are the very ones of [`super::skinny`] on the dequantised weight, in the same
//! order: the result is bit for bit that of dequantising and multiplying in f32, and a sequence
//! gets the same bits alone or in a batch.

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
        skinny::by_weight_rows(m, self.n, |first, rows, out_t| {
            self.dot_rows(x, m, first, rows, out_t)
        })
    }

    /// `out_t[i * m + r] = W[first + i] . x[r]` for `rows` weight rows.
    fn dot_rows(&self, x: &[f32], m: usize, first: usize, rows: usize, out_t: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if skinny::has_avx2_fma() {
            // SAFETY: the CPU has the features; the kernel reads the weight rows
            // `first..first + rows` and `m` rows of `x`, all inside the slices (asserted in
            // matmul_t and by the chunking).
            unsafe { avx::dot_rows(self, x, m, first, rows, out_t) };
            return;
        }
        // Elsewhere: dequantise the rows, then the f32 kernel (the same products).
        let mut w = vec![0f32; rows * self.k];
        self.dequantize_rows(first, rows, &mut w);
        skinny::dot_rows(x, m, &w, self.k, out_t);
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

    use super::{QuantFormat, QuantRows, BLOCK};

    /// Tiles of 2 weight rows x up to 4 input rows, as skinny's, with each group of 8 weights
    /// widened to f32 once per tile.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(
        w: &QuantRows,
        x: &[f32],
        m: usize,
        first: usize,
        rows: usize,
        out_t: &mut [f32],
    ) {
        match w.format {
            QuantFormat::Int8 => rows_of::<false>(w, x, m, first, rows, out_t),
            QuantFormat::Int4 => rows_of::<true>(w, x, m, first, rows, out_t),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_of<const INT4: bool>(
        w: &QuantRows,
        x: &[f32],
        m: usize,
        first: usize,
        rows: usize,
        out_t: &mut [f32],
    ) {
        let mut j = 0;
        while j < rows {
            let wr = (rows - j).min(2);
            let mut r = 0;
            while r < m {
                let xr = (m - r).min(4);
                let at = (first, j, r);
                match (wr, xr) {
                    (2, 4) => tile::<2, 4, INT4>(w, x, m, at, out_t),
                    (2, 3) => tile::<2, 3, INT4>(w, x, m, at, out_t),
                    (2, 2) => tile::<2, 2, INT4>(w, x, m, at, out_t),
                    (2, _) => tile::<2, 1, INT4>(w, x, m, at, out_t),
                    (_, 4) => tile::<1, 4, INT4>(w, x, m, at, out_t),
                    (_, 3) => tile::<1, 3, INT4>(w, x, m, at, out_t),
                    (_, 2) => tile::<1, 2, INT4>(w, x, m, at, out_t),
                    _ => tile::<1, 1, INT4>(w, x, m, at, out_t),
                }
                r += xr;
            }
            j += wr;
        }
    }

    /// The integers of values `8g..8g + 8` of a block: from its bytes at `at` (8-bit), or from
    /// `raw`, the block's 16 bytes (4-bit: groups 0 and 1 are the low halves of bytes 0..8 and
    /// 8..16, groups 2 and 3 their high halves).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn group<const INT4: bool>(at: *const u8, raw: __m128i, g: usize) -> __m256i {
        if !INT4 {
            return _mm256_cvtepi8_epi32(_mm_loadl_epi64(at.add(8 * g) as *const __m128i));
        }
        let halves = if g < 2 { raw } else { _mm_srli_epi16(raw, 4) };
        let halves = if g.is_multiple_of(2) {
            halves
        } else {
            _mm_srli_si128(halves, 8)
        };
        let nibbles = _mm_and_si128(halves, _mm_set1_epi8(0x0F));
        _mm256_sub_epi32(_mm256_cvtepu8_epi32(nibbles), _mm256_set1_epi32(8))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const R: usize, const C: usize, const INT4: bool>(
        w: &QuantRows,
        x: &[f32],
        m: usize,
        (first, j, r): (usize, usize, usize),
        out_t: &mut [f32],
    ) {
        let k = w.k;
        let per = w.format.bytes_per_block();
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let k8 = k / 8 * 8;
        let xp = x.as_ptr();
        for b in 0..k8.div_ceil(BLOCK) {
            let mut d = [_mm256_setzero_ps(); R];
            let mut at = [std::ptr::null::<u8>(); R];
            let mut raw = [_mm_setzero_si128(); R];
            for a in 0..R {
                let block = (first + j + a) * w.blocks + b;
                d[a] = _mm256_set1_ps(*w.scales.get_unchecked(block));
                at[a] = w.bytes.as_ptr().add(block * per);
                if INT4 {
                    raw[a] = _mm_loadu_si128(at[a] as *const __m128i);
                }
            }
            for g in 0..BLOCK / 8 {
                let p = b * BLOCK + 8 * g;
                if p >= k8 {
                    break;
                }
                let mut wv = [_mm256_setzero_ps(); R];
                for a in 0..R {
                    // q * d, rounded as dequantising rounds it.
                    let ints = group::<INT4>(at[a], raw[a], g);
                    wv[a] = _mm256_mul_ps(_mm256_cvtepi32_ps(ints), d[a]);
                }
                for c in 0..C {
                    let xv = _mm256_loadu_ps(xp.add((r + c) * k + p));
                    for a in 0..R {
                        acc[a][c] = _mm256_fmadd_ps(wv[a], xv, acc[a][c]);
                    }
                }
            }
        }
        for a in 0..R {
            let row = first + j + a;
            for c in 0..C {
                let mut s = super::super::skinny::hsum_avx(acc[a][c]);
                for q in k8..k {
                    let block = row * w.blocks + q / BLOCK;
                    let wq =
                        w.format.value(&w.bytes[block * per..], q % BLOCK) as f32 * w.scales[block];
                    s += wq * x[(r + c) * k + q];
                }
                out_t[(j + a) * m + r + c] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    const FORMATS: [QuantFormat; 2] = [QuantFormat::Int8, QuantFormat::Int4];

    #[test]
    fn equals_dequantising_then_the_f32_kernel_bit_for_bit() {
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
                let want = skinny::matmul_t(&x, m, &q.dequantize(), n, k);
                assert_eq!(got, want, "{format:?} {m}x{n}x{k}");
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
