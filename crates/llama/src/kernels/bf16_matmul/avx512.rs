//! The AVX512-BF16 kernel: `VDPBF16PS` on 16 output columns per register.

use super::{Task, LANES};
use std::arch::x86_64::*;

/// Rows per tile: 6 rows x 4 panels are 24 accumulators, 4 weight loads and 6
/// broadcasts per 24 dot products.
const TILE_ROWS: usize = 6;

#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn run(t: &Task<'_>) {
    let mut r = 0;
    while r < t.rows {
        let rows = (t.rows - r).min(TILE_ROWS);
        let mut panel = 0;
        while panel < t.panels {
            let panels = (t.panels - panel).min(4);
            let x = t.x.as_ptr().add(r * t.stride);
            let w = t.w.as_ptr().add(panel * t.stride * LANES);
            let out = t.out.add(r * t.ldo + panel * LANES);
            let cols = t.cols - panel * LANES;
            macro_rules! tiles {
                ($($r:literal),*) => {
                    match (rows, panels) {
                        $(
                            ($r, 4) => tile::<$r, 4>(x, t, w, out, cols),
                            ($r, 3) => tile::<$r, 3>(x, t, w, out, cols),
                            ($r, 2) => tile::<$r, 2>(x, t, w, out, cols),
                            ($r, _) => tile::<$r, 1>(x, t, w, out, cols),
                        )*
                        _ => unreachable!("tiles have 1 to {TILE_ROWS} rows"),
                    }
                };
            }
            tiles!(6, 5, 4, 3, 2, 1);
            panel += panels;
        }
        r += rows;
    }
}

/// `R` rows against `C` panels over all pairs; `cols` of the tile's columns are real.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const R: usize, const C: usize>(
    x: *const u32,
    t: &Task<'_>,
    w: *const u32,
    out: *mut f32,
    cols: usize,
) {
    let (pairs, stride, ldo) = (t.pairs, t.stride, t.ldo);
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let panel_stride = stride * LANES;
    for p in 0..pairs {
        let mut b = [_mm512_setzero_si512(); C];
        for c in 0..C {
            b[c] = _mm512_loadu_si512(w.add(c * panel_stride + p * LANES) as *const _);
        }
        for r in 0..R {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(r * stride + p) as i32));
            for c in 0..C {
                acc[r][c] =
                    _mm512_dpbf16_ps(acc[r][c], a, std::mem::transmute::<__m512i, __m512bh>(b[c]));
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            let first = c * LANES;
            let dst = out.add(r * ldo + first);
            if first + LANES <= cols {
                _mm512_storeu_ps(dst, acc[r][c]);
            } else if first < cols {
                let mask = ((1u32 << (cols - first)) - 1) as u16;
                _mm512_mask_storeu_ps(dst, mask, acc[r][c]);
            }
        }
    }
}
