//! The AVX2 kernel: tiles of 2 weight rows x up to 4 input rows; each block of a weight row is
//! widened to 16-bit integers once per tile and multiplied with every input row's block
//! (`vpmaddwd`). Its bits are the portable loop's.

use std::arch::x86_64::*;

use super::{QuantFormat, QuantRows, RoundedInput, BLOCK};

/// The formats as the kernels' const parameter.
pub(super) const INT8: u8 = 0;
pub(super) const INT4: u8 = 1;
pub(super) const INT4_MIN: u8 = 2;
pub(super) const INT8_HALVES: u8 = 3;

pub(super) fn kind(format: QuantFormat) -> u8 {
    match format {
        QuantFormat::Int8 => INT8,
        QuantFormat::Int4 => INT4,
        QuantFormat::Int4Min => INT4_MIN,
        QuantFormat::Int8Halves => INT8_HALVES,
    }
}

tiled_kernel!("avx2,fma");

/// A block's 32 integers as two vectors of 16 (values 0..16 and 16..32).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block<const KIND: u8>(at: *const u8) -> (__m256i, __m256i) {
    if KIND == INT8 || KIND == INT8_HALVES {
        return (
            _mm256_cvtepi8_epi16(_mm_loadu_si128(at as *const __m128i)),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(at.add(16) as *const __m128i)),
        );
    }
    // Byte i holds value i in its low half and value i + 16 in its high half.
    let raw = _mm_loadu_si128(at as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    let low = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
    let high = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
    if KIND == INT4_MIN {
        return (low, high);
    }
    let eight = _mm256_set1_epi16(8);
    (_mm256_sub_epi16(low, eight), _mm256_sub_epi16(high, eight))
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize, const C: usize, const KIND: u8>(
    w: &QuantRows,
    x: &RoundedInput,
    (first, j, r): (usize, usize, usize),
    out_t: &mut [f32],
) {
    // The even blocks' lanes and the odd blocks' (see `portable`).
    let mut even = [[_mm256_setzero_ps(); C]; R];
    let mut odd = [[_mm256_setzero_ps(); C]; R];
    // Int4Min: each block's `m * d_x * sum(q_x)`, summed apart from the lanes.
    let mut minima = [[0f32; C]; R];
    let mut b = 0;
    while b < w.blocks {
        block_into::<R, C, KIND>(w, x, (first + j, r, b), &mut even, &mut minima);
        if b + 1 < w.blocks {
            block_into::<R, C, KIND>(w, x, (first + j, r, b + 1), &mut odd, &mut minima);
        }
        b += 2;
    }
    let m = x.m;
    for a in 0..R {
        for c in 0..C {
            let sum = super::super::skinny::hsum_avx(_mm256_add_ps(even[a][c], odd[a][c]));
            out_t[(j + a) * m + r + c] = if KIND == INT4_MIN {
                sum + minima[a][c]
            } else {
                sum
            };
        }
    }
}

/// Block `b` of weight rows `row..row + R` times block `b` of input rows `r..r + C`, added
/// to `acc`.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn block_into<const R: usize, const C: usize, const KIND: u8>(
    w: &QuantRows,
    x: &RoundedInput,
    (row, r, b): (usize, usize, usize),
    acc: &mut [[__m256; C]; R],
    minima: &mut [[f32; C]; R],
) {
    let per = w.format.bytes_per_block();
    let mut lo = [_mm256_setzero_si256(); R];
    let mut hi = [_mm256_setzero_si256(); R];
    let mut dw = [0f32; R];
    let mut dw_hi = [0f32; R];
    let mut mw = [0f32; R];
    for a in 0..R {
        let at = (row + a) * w.blocks + b;
        (lo[a], hi[a]) = block::<KIND>(w.bytes.as_ptr().add(at * per));
        if KIND == INT8_HALVES {
            dw[a] = *w.scales.get_unchecked(2 * at);
            dw_hi[a] = *w.scales.get_unchecked(2 * at + 1);
        } else {
            dw[a] = *w.scales.get_unchecked(at);
        }
        if KIND == INT4_MIN {
            mw[a] = *w.mins.get_unchecked(at);
        }
    }
    for c in 0..C {
        let at = (r + c) * x.blocks + b;
        let xp = x.low_half(r + c, b).as_ptr();
        let x_lo = _mm256_loadu_si256(xp as *const __m256i);
        let x_hi = _mm256_loadu_si256(xp.add(BLOCK) as *const __m256i);
        let dx = *x.d.get_unchecked(at);
        for a in 0..R {
            if KIND == INT8_HALVES {
                // Each half under its own scale, the low half first.
                let lo_sum = _mm256_madd_epi16(lo[a], x_lo);
                let hi_sum = _mm256_madd_epi16(hi[a], x_hi);
                acc[a][c] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(lo_sum),
                    _mm256_set1_ps(dw[a] * dx),
                    acc[a][c],
                );
                acc[a][c] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(hi_sum),
                    _mm256_set1_ps(dw_hi[a] * dx),
                    acc[a][c],
                );
                continue;
            }
            // At most 4 x 128 x 32767 < 2^24 per lane: exact in i32 and in f32.
            let sum = _mm256_add_epi32(
                _mm256_madd_epi16(lo[a], x_lo),
                _mm256_madd_epi16(hi[a], x_hi),
            );
            acc[a][c] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sum),
                _mm256_set1_ps(dw[a] * dx),
                acc[a][c],
            );
            if KIND == INT4_MIN {
                let sx = *x.sums.get_unchecked(at) as f32;
                minima[a][c] = sx.mul_add(mw[a] * dx, minima[a][c]);
            }
        }
    }
}
