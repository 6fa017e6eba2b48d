//! `x W^T` on the CPU with bf16 operands and f32 sums: the inference path of
//! `--quantize bf16`.
//!
//! With the ragged decode steps, an eval on the CPU is bound by arithmetic, not by reading
//! weights: the new user turns are prefilled at ~930 tokens/s on SmolLM2-135M, close to what
//! two cores can do with f32 FMAs. AVX512-BF16's `VDPBF16PS` multiplies pairs of bf16 values
//! and adds both products into an f32 lane, twice the products per instruction of an f32 FMA,
//! and bf16 weights are half the bytes of f32 ones. The cost is the rounding of both operands
//! to bf16 (8 significant bits), the precision GPU inference in bf16 runs at; the sums stay
//! f32. Checkpoints trained in bf16 (SmolLM2, LLaMA-3.x) lose nothing in their weights; the
//! activations are what is rounded.
//!
//! Every output is one chain of f32 sums over the pairs of `k` in order, whatever the number
//! of rows or the tile it lands in, so a sequence gets the same bits alone or in a batch.

use rayon::prelude::*;

/// Output columns per panel: one 512-bit register of f32 lanes.
const LANES: usize = 16;
/// Rows of `x` a worker takes at once: their packed pairs stay in L2 while the weight
/// panels stream past.
const ROW_BLOCK: usize = 96;
/// Panels a worker takes at once (the kernel's tile width).
const PANEL_GROUP: usize = 4;

/// `v` rounded to the nearest bf16 (ties to even), as its bits. NaN stays NaN.
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    // No overflow: the largest magnitude bits plus 0x8000 stay below 2^32.
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 a bf16 stands for.
pub(crate) fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Two neighbours along `k` as the kernel reads them: the first in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// A frozen weight `[n, k]` rounded to bf16 and laid out for the kernel: panels of 16 output
/// rows, and in a panel the pairs `(w[j, 2p], w[j, 2p + 1])` of its 16 rows side by side, so
/// one 64-byte load feeds 16 lanes. Rows past `n` and the odd `k`'s last partner are zeros.
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    pairs: usize,
    panels: Vec<u32>,
}

impl PackedBf16 {
    /// Packs the row-major `w [n, k]`.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "a [{n}, {k}] weight has {} values", n * k);
        let pairs = k.div_ceil(2);
        let count = n.div_ceil(LANES);
        let mut panels = vec![0u32; count * pairs * LANES];
        panels
            .par_chunks_mut(pairs * LANES)
            .enumerate()
            .for_each(|(panel, dst)| {
                for lane in 0..LANES {
                    let j = panel * LANES + lane;
                    if j >= n {
                        break;
                    }
                    let row = &w[j * k..(j + 1) * k];
                    for p in 0..pairs {
                        let hi = row.get(2 * p + 1).copied().unwrap_or(0.0);
                        dst[p * LANES + lane] = pair(row[2 * p], hi);
                    }
                }
            });
        PackedBf16 {
            n,
            k,
            pairs,
            panels,
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The bytes of the packed weight.
    #[cfg(test)]
    pub fn packed_bytes(&self) -> usize {
        self.panels.len() * std::mem::size_of::<u32>()
    }

    /// Whether this CPU runs the AVX512-BF16 kernel (otherwise a portable loop gives the same
    /// bf16 products, much slower).
    pub fn has_fast_kernel() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `x [m, k] @ W^T` as `[m, n]`, row-major f32 in and out.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "input of {m} rows of {}", self.k);
        let (n, k, pairs) = (self.n, self.k, self.pairs);
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        let mut xp = vec![0u32; m * pairs];
        xp.par_chunks_mut(pairs)
            .zip(x.par_chunks(k))
            .with_min_len(16)
            .for_each(|(dst, row)| {
                for (p, d) in dst.iter_mut().enumerate() {
                    *d = pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0));
                }
            });
        let panel_count = n.div_ceil(LANES);
        let groups = panel_count.div_ceil(PANEL_GROUP);
        let row_blocks = m.div_ceil(ROW_BLOCK);
        let fast = Self::has_fast_kernel();
        let out_ptr = SharedOut(out.as_mut_ptr());
        // Row block major: a worker's consecutive items share their rows of `x`.
        (0..row_blocks * groups).into_par_iter().for_each(|item| {
            let (rb, g) = (item / groups, item % groups);
            let (r0, r1) = (rb * ROW_BLOCK, ((rb + 1) * ROW_BLOCK).min(m));
            let p0 = g * PANEL_GROUP;
            let np = PANEL_GROUP.min(panel_count - p0);
            let col0 = p0 * LANES;
            let task = Task {
                x: &xp[r0 * pairs..r1 * pairs],
                rows: r1 - r0,
                pairs,
                w: &self.panels[p0 * pairs * LANES..(p0 + np) * pairs * LANES],
                panels: np,
                cols: (n - col0).min(np * LANES),
                // SAFETY: items write disjoint (row block, column group) rectangles of `out`.
                out: unsafe { out_ptr.get().add(r0 * n + col0) },
                ldo: n,
            };
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: the CPU has the features; `Task` holds the bounds the kernel stays in.
                unsafe { avx512::run(&task) };
                return;
            }
            let _ = fast;
            portable::run(&task);
        });
        out
    }
}

/// The output buffer shared by the workers, which write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used for disjoint writes while `matmul_t` holds the buffer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One worker's rectangle: `rows` packed rows of `x` against `panels` panels of the weight,
/// written to `out` (row stride `ldo`), of which the first `cols` columns are real.
struct Task<'a> {
    x: &'a [u32],
    rows: usize,
    pairs: usize,
    w: &'a [u32],
    panels: usize,
    cols: usize,
    out: *mut f32,
    ldo: usize,
}

/// The same products and the same order of sums per lane as the AVX-512 kernel, in plain
/// Rust: what a CPU without AVX512-BF16 runs.
mod portable {
    use super::{bf16_value, Task, LANES};

    pub(super) fn run(t: &Task<'_>) {
        for r in 0..t.rows {
            let xr = &t.x[r * t.pairs..(r + 1) * t.pairs];
            for panel in 0..t.panels {
                let w = &t.w[panel * t.pairs * LANES..(panel + 1) * t.pairs * LANES];
                let mut acc = [0f32; LANES];
                for (p, &xv) in xr.iter().enumerate() {
                    let (xl, xh) = (bf16_value(xv as u16), bf16_value((xv >> 16) as u16));
                    for (lane, a) in acc.iter_mut().enumerate() {
                        let wv = w[p * LANES + lane];
                        let (wl, wh) = (bf16_value(wv as u16), bf16_value((wv >> 16) as u16));
                        *a += xl * wl + xh * wh;
                    }
                }
                for (lane, a) in acc.iter().enumerate() {
                    let c = panel * LANES + lane;
                    if c < t.cols {
                        // SAFETY: `c < cols` and `r < rows` lie inside the task's rectangle.
                        unsafe { *t.out.add(r * t.ldo + c) = *a };
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
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
                let x = t.x.as_ptr().add(r * t.pairs);
                let w = t.w.as_ptr().add(panel * t.pairs * LANES);
                let out = t.out.add(r * t.ldo + panel * LANES);
                let cols = t.cols - panel * LANES;
                macro_rules! tiles {
                    ($($r:literal),*) => {
                        match (rows, panels) {
                            $(
                                ($r, 4) => tile::<$r, 4>(x, t.pairs, w, out, t.ldo, cols),
                                ($r, 3) => tile::<$r, 3>(x, t.pairs, w, out, t.ldo, cols),
                                ($r, 2) => tile::<$r, 2>(x, t.pairs, w, out, t.ldo, cols),
                                ($r, _) => tile::<$r, 1>(x, t.pairs, w, out, t.ldo, cols),
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
        pairs: usize,
        w: *const u32,
        out: *mut f32,
        ldo: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let panel_stride = pairs * LANES;
        for p in 0..pairs {
            let mut b = [_mm512_setzero_si512(); C];
            for c in 0..C {
                b[c] = _mm512_loadu_si512(w.add(c * panel_stride + p * LANES) as *const _);
            }
            for r in 0..R {
                let a: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*x.add(r * pairs + p) as i32));
                for c in 0..C {
                    acc[r][c] = _mm512_dpbf16_ps(
                        acc[r][c],
                        a,
                        std::mem::transmute::<__m512i, __m512bh>(b[c]),
                    );
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
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1] (also the bf16 base's tests' inputs).
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13);
                (h % 20001) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    fn round(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| bf16_value(bf16_bits(x)) as f64).collect()
    }

    /// The exact products of the bf16-rounded operands, summed in f64, and the sum of their
    /// magnitudes (the scale of the f32 rounding error).
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<(f64, f64)> {
        let (x, w) = (round(x), round(w));
        let mut out = Vec::with_capacity(m * n);
        for r in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|p| x[r * k + p] * w[j * k + p]);
                out.push((terms.clone().sum(), terms.map(f64::abs).sum()));
            }
        }
        out
    }

    #[test]
    fn rounds_to_the_nearest_bf16_ties_to_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        assert_eq!(bf16_bits(-2.0), 0xC000);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: to the even one, 1.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: to the even one.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0 + 1e-6), 0x3F81);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7F80);
        assert_eq!(
            bf16_bits(f32::MAX),
            0x7F80,
            "the largest f32 rounds up to infinity"
        );
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(0.15625)), 0.15625, "exact values stay");
    }

    #[test]
    fn matches_a_float64_reference_of_the_rounded_operands() {
        // Odd k (a zero partner), partial panels, partial tiles and more than one row block.
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 7),
            (6, 64, 64),
            (7, 65, 33),
            (13, 100, 577),
            (100, 48, 96),
            (200, 17, 5),
        ] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let got = PackedBf16::new(&w, n, k).matmul_t(&x, m);
            assert_eq!(got.len(), m * n);
            for (i, (g, (e, scale))) in got.iter().zip(reference(&x, m, &w, n, k)).enumerate() {
                assert!(
                    (*g as f64 - e).abs() <= 1e-6 * (1.0 + scale),
                    "{m}x{n}x{k} at {i}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn differs_from_f32_by_the_rounding_of_the_operands_only() {
        // Against the unrounded product the error is bf16's, not an indexing slip: a wrong
        // pair or lane would be off by the size of the values.
        let (m, n, k) = (5, 40, 300);
        let (x, w) = (values(m * k, 7), values(n * k, 8));
        let got = PackedBf16::new(&w, n, k).matmul_t(&x, m);
        for r in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|p| x[r * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                let scale: f64 = (0..k)
                    .map(|p| (x[r * k + p] as f64 * w[j * k + p] as f64).abs())
                    .sum();
                let g = got[r * n + j] as f64;
                assert!((g - exact).abs() <= 2f64.powi(-7) * scale, "{g} vs {exact}");
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_among_others() {
        let (n, k) = (70, 203);
        let packed = PackedBf16::new(&values(n * k, 3), n, k);
        let rows = 131;
        let x = values(rows * k, 4);
        let all = packed.matmul_t(&x, rows);
        for r in [0, 5, 6, 95, 96, 130] {
            let alone = packed.matmul_t(&x[r * k..(r + 1) * k], 1);
            assert_eq!(alone, all[r * n..(r + 1) * n], "row {r}");
        }
    }

    #[test]
    fn the_portable_loop_gives_the_kernels_bits() {
        if !PackedBf16::has_fast_kernel() {
            return; // Nothing to compare with: the portable loop is what runs.
        }
        let (m, n, k) = (9, 37, 129);
        let (x, w) = (values(m * k, 5), values(n * k, 6));
        let packed = PackedBf16::new(&w, n, k);
        let fast = packed.matmul_t(&x, m);
        let pairs = k.div_ceil(2);
        let xp: Vec<u32> = x
            .chunks(k)
            .flat_map(|row| {
                (0..pairs)
                    .map(|p| pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut slow = vec![0f32; m * n];
        portable::run(&Task {
            x: &xp,
            rows: m,
            pairs,
            w: &packed.panels,
            panels: n.div_ceil(LANES),
            cols: n,
            out: slow.as_mut_ptr(),
            ldo: n,
        });
        for (a, b) in fast.iter().zip(&slow) {
            // The hardware adds both products of a pair before the sum; the loop does too,
            // but may round the pair's sum differently (VDPBF16PS flushes denormals).
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
