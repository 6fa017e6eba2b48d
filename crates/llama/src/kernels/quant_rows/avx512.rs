//! The AVX-512 kernel: a register holds a pair of blocks (the even one in its low half), so a
//! pair of blocks of a weight row is widened to 16-bit integers in two steps and multiplied
//! with an input row's pair in two `vpmaddwd`. Tiles of up to 2 weight rows x 4 input rows,
//! as the AVX2 kernel. Its bits are the portable loop's: the even blocks' lanes are the low
//! half of each accumulator, the odd blocks' the high half.

use std::arch::x86_64::*;

use super::avx2::{kind, INT4, INT4_MIN, INT8, INT8_HALVES};
use super::{QuantRows, RoundedInput, BLOCK};

/// Whether this kernel runs on this CPU: it has the features, and `TEAMTUNE_NO_AVX512` is not
/// set (it makes an AVX-512 machine run the AVX2 kernel, to measure one beside the other).
pub(super) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE
        .get_or_init(|| std::env::var_os("TEAMTUNE_NO_AVX512").is_none() && cpu_has_features())
}

/// Whether the CPU has what the kernel runs on, whatever the environment says.
pub(super) fn cpu_has_features() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

tiled_kernel!("avx512f,avx512bw,avx2,fma");

/// Two blocks' 64 integers (block `b` at `at`, block `b + 1` right after it) as two vectors of
/// 32: values 0..16 of each block, then values 16..32 of each.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[inline]
unsafe fn pair<const KIND: u8>(at: *const u8) -> (__m512i, __m512i) {
    if KIND == INT8 || KIND == INT8_HALVES {
        let halves = |lo: usize| {
            let second = at.add(BLOCK + lo) as *const __m128i;
            _mm256_loadu2_m128i(second, at.add(lo) as *const __m128i)
        };
        return (
            _mm512_cvtepi8_epi16(halves(0)),
            _mm512_cvtepi8_epi16(halves(BLOCK / 2)),
        );
    }
    // Byte i of a block holds value i in its low half and value i + 16 in its high half.
    let raw = _mm256_loadu_si256(at as *const __m256i);
    let mask = _mm256_set1_epi8(0x0F);
    let low = _mm512_cvtepu8_epi16(_mm256_and_si256(raw, mask));
    let high = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
    if KIND == INT4_MIN {
        return (low, high);
    }
    let eight = _mm512_set1_epi16(8);
    (_mm512_sub_epi16(low, eight), _mm512_sub_epi16(high, eight))
}

/// `[a; 8]` then `[b; 8]`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[inline]
unsafe fn two(a: f32, b: f32) -> __m512 {
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b))
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const R: usize, const C: usize, const KIND: u8>(
    w: &QuantRows,
    x: &RoundedInput,
    (first, j, r): (usize, usize, usize),
    out_t: &mut [f32],
) {
    let per = w.format.bytes_per_block();
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    // Int4Min: each block's `m * d_x * sum(q_x)`, summed apart from the lanes.
    let mut minima = [[0f32; C]; R];
    let whole_pairs = w.blocks / 2;
    for p in 0..whole_pairs {
        let b = 2 * p;
        let mut lo = [_mm512_setzero_si512(); R];
        let mut hi = [_mm512_setzero_si512(); R];
        let mut dw = [_mm512_setzero_ps(); R];
        let mut dw_hi = [_mm512_setzero_ps(); R];
        let mut mw = [[0f32; 2]; R];
        for a in 0..R {
            let at = (first + j + a) * w.blocks + b;
            (lo[a], hi[a]) = pair::<KIND>(w.bytes.as_ptr().add(at * per));
            if KIND == INT8_HALVES {
                let s = w.scales.as_ptr().add(2 * at);
                dw[a] = two(*s, *s.add(2));
                dw_hi[a] = two(*s.add(1), *s.add(3));
            } else {
                dw[a] = two(*w.scales.get_unchecked(at), *w.scales.get_unchecked(at + 1));
            }
            if KIND == INT4_MIN {
                mw[a] = [*w.mins.get_unchecked(at), *w.mins.get_unchecked(at + 1)];
            }
        }
        for c in 0..C {
            let at = (r + c) * x.blocks + b;
            let xp = x.pair(r + c, p).as_ptr();
            let x_lo = _mm512_loadu_si512(xp as *const __m512i);
            let x_hi = _mm512_loadu_si512(xp.add(BLOCK) as *const __m512i);
            let (d0, d1) = (*x.d.get_unchecked(at), *x.d.get_unchecked(at + 1));
            let dx = two(d0, d1);
            for a in 0..R {
                if KIND == INT8_HALVES {
                    // Each half under its own scale, the low half first.
                    let lo_sum = _mm512_madd_epi16(lo[a], x_lo);
                    let hi_sum = _mm512_madd_epi16(hi[a], x_hi);
                    acc[a][c] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(lo_sum),
                        _mm512_mul_ps(dw[a], dx),
                        acc[a][c],
                    );
                    acc[a][c] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(hi_sum),
                        _mm512_mul_ps(dw_hi[a], dx),
                        acc[a][c],
                    );
                    continue;
                }
                // At most 4 x 128 x 32767 < 2^24 per lane: exact in i32 and in f32.
                let sum = _mm512_add_epi32(
                    _mm512_madd_epi16(lo[a], x_lo),
                    _mm512_madd_epi16(hi[a], x_hi),
                );
                acc[a][c] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw[a], dx), acc[a][c]);
                if KIND == INT4_MIN {
                    let (s0, s1) = (*x.sums.get_unchecked(at), *x.sums.get_unchecked(at + 1));
                    minima[a][c] = (s0 as f32).mul_add(mw[a][0] * d0, minima[a][c]);
                    minima[a][c] = (s1 as f32).mul_add(mw[a][1] * d1, minima[a][c]);
                }
            }
        }
    }
    if w.blocks % 2 == 1 {
        last_block::<R, C, KIND>(w, x, (first + j, r, w.blocks - 1), &mut acc, &mut minima);
    }
    let m = x.m;
    for a in 0..R {
        for c in 0..C {
            let v = acc[a][c];
            let even = _mm512_castps512_ps256(v);
            let odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
            let sum = super::super::skinny::hsum_avx(_mm256_add_ps(even, odd));
            out_t[(j + a) * m + r + c] = if KIND == INT4_MIN {
                sum + minima[a][c]
            } else {
                sum
            };
        }
    }
}

/// A row's last block when it has an odd number: an even block, added to the low halves.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn last_block<const R: usize, const C: usize, const KIND: u8>(
    w: &QuantRows,
    x: &RoundedInput,
    (row, r, b): (usize, usize, usize),
    acc: &mut [[__m512; C]; R],
    minima: &mut [[f32; C]; R],
) {
    let per = w.format.bytes_per_block();
    let low_lanes: __mmask16 = 0x00FF;
    for a in 0..R {
        let at = (row + a) * w.blocks + b;
        let bytes = w.bytes.as_ptr().add(at * per);
        let (lo, hi) = if KIND == INT8 || KIND == INT8_HALVES {
            (
                _mm512_cvtepi8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128(
                    bytes as *const __m128i,
                ))),
                _mm512_cvtepi8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128(
                    bytes.add(BLOCK / 2) as *const __m128i,
                ))),
            )
        } else {
            let raw = _mm_loadu_si128(bytes as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let low = _mm_and_si128(raw, mask);
            let high = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let widen = |v| _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(v));
            if KIND == INT4_MIN {
                (widen(low), widen(high))
            } else {
                let eight = _mm512_set1_epi16(8);
                (
                    _mm512_sub_epi16(widen(low), eight),
                    _mm512_sub_epi16(widen(high), eight),
                )
            }
        };
        for c in 0..C {
            let xb = (r + c) * x.blocks + b;
            // The last pair's second block is zeros: the high halves add nothing.
            let xp = x.pair(r + c, b / 2).as_ptr();
            let x_lo = _mm512_loadu_si512(xp as *const __m512i);
            let x_hi = _mm512_loadu_si512(xp.add(BLOCK) as *const __m512i);
            let dx = *x.d.get_unchecked(xb);
            if KIND == INT8_HALVES {
                let s = w.scales.as_ptr().add(2 * at);
                let lo_sum = _mm512_cvtepi32_ps(_mm512_madd_epi16(lo, x_lo));
                let hi_sum = _mm512_cvtepi32_ps(_mm512_madd_epi16(hi, x_hi));
                let (d_lo, d_hi) = (_mm512_set1_ps(*s * dx), _mm512_set1_ps(*s.add(1) * dx));
                acc[a][c] = _mm512_mask3_fmadd_ps(lo_sum, d_lo, acc[a][c], low_lanes);
                acc[a][c] = _mm512_mask3_fmadd_ps(hi_sum, d_hi, acc[a][c], low_lanes);
                continue;
            }
            let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(
                _mm512_madd_epi16(lo, x_lo),
                _mm512_madd_epi16(hi, x_hi),
            ));
            let scale = _mm512_set1_ps(*w.scales.get_unchecked(at) * dx);
            acc[a][c] = _mm512_mask3_fmadd_ps(sum, scale, acc[a][c], low_lanes);
            if KIND == INT4_MIN {
                let sx = *x.sums.get_unchecked(xb) as f32;
                minima[a][c] = sx.mul_add(*w.mins.get_unchecked(at) * dx, minima[a][c]);
            }
        }
    }
}
