//! `x W^T` on the CPU for the few rows of a decode step (one row per sequence in the batch).
//!
//! A decode step is bound by reading the weights. The gemm crate reads them once for a single
//! row, but from two rows on it packs the whole weight into panels at every call, which costs
//! several times the weight's bytes (SmolLM2-135M, 2 threads: 19 ms for one row's projections,
//! 70-110 ms for 2-8 rows), so batching sequences bought little. Here each weight row is read
//! once and dotted with every row of `x` while it sits in L1: 8 rows cost little more than one.
//!
//! Every (weight row, input row) dot product is summed in the same order whatever the number of
//! rows, so a sequence decoded in a batch gets the very same projections as alone.

use rayon::prelude::*;

/// Up to this many rows of `x` go through [`matmul_t`]; more (a prefill) are arithmetic-bound
/// and faster in gemm.
pub(crate) const MAX_ROWS: usize = 16;

/// `x [m, k] @ w [n, k]^T` as `[m, n]` (all row-major, f32).
pub(crate) fn matmul_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    by_weight_rows(m, n, |first, rows, out_t| {
        dot_rows(x, m, &w[first * k..(first + rows) * k], k, out_t)
    })
}

/// The `[m, n]` output of a few-row product whose weight has `n` rows, split over rayon's
/// threads by weight rows: `dot(first, rows, out_t)` fills `out_t[i * m + r]` with weight row
/// `first + i` dotted with input row `r`, for `rows` weight rows.
pub(crate) fn by_weight_rows(
    m: usize,
    n: usize,
    dot: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    by_weight_rows_group(m, &[n], |_, first, rows, out_t| dot(first, rows, out_t))
        .pop()
        .expect("one weight, one output")
}

/// [`by_weight_rows`] for several weights that multiply the same input (`ns[w]` rows each), in
/// one parallel loop: `dot(w, first, rows, out_t)` for weight `w`, never a chunk across two
/// weights. One output `[m, ns[w]]` per weight.
pub(crate) fn by_weight_rows_group(
    m: usize,
    ns: &[usize],
    dot: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) -> Vec<Vec<f32>> {
    let total: usize = ns.iter().sum();
    if m == 0 || total == 0 {
        return ns.iter().map(|&n| vec![0.0; m * n]).collect();
    }
    // Work on the transposed output [rows, m] so each thread owns whole weight rows.
    let mut out_t = vec![0f32; total * m];
    let threads = rayon::current_num_threads().max(1);
    // Several chunks per thread balance the load; even sizes keep the 2-row weight tiles whole.
    let rows_per_chunk = (total.div_ceil(threads * 4)).max(16).next_multiple_of(2);
    // (weight, first row, its slice of out_t): chunks never straddle two weights.
    let mut tasks = Vec::new();
    let mut rest = out_t.as_mut_slice();
    for (w, &n) in ns.iter().enumerate() {
        let mut first = 0;
        while first < n {
            let rows = rows_per_chunk.min(n - first);
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(rows * m);
            tasks.push((w, first, chunk));
            rest = tail;
            first += rows;
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(w, first, chunk)| dot(w, first, chunk.len() / m, chunk));
    if m == 1 && ns.len() == 1 {
        // [n, 1] and [1, n] are the same buffer.
        return vec![out_t];
    }
    let mut outs = Vec::with_capacity(ns.len());
    let mut at = 0;
    for &n in ns {
        let part = &out_t[at * m..(at + n) * m];
        at += n;
        if m == 1 {
            outs.push(part.to_vec());
            continue;
        }
        let mut out = vec![0f32; m * n];
        for (j, row) in part.chunks_exact(m).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                out[r * n + j] = v;
            }
        }
        outs.push(out);
    }
    outs
}

/// Whether the AVX2 + FMA kernels run on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The horizontal sum of the AVX kernel's accumulators, for kernels that must add up in the
/// same order.
#[cfg(target_arch = "x86_64")]
pub(crate) use avx::hsum as hsum_avx;

/// `out_t[j * m + r] = w[j] . x[r]` for the weight rows of `w`.
pub(crate) fn dot_rows(x: &[f32], m: usize, w: &[f32], k: usize, out_t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has the features; the kernel reads only inside the slices' lengths
        // (checked by the debug assertions above and the tiling bounds below).
        unsafe { avx::dot_rows(x, m, w, k, out_t) };
        return;
    }
    portable::dot_rows(x, m, w, k, out_t);
}

/// Eight partial sums per product, added up in a fixed order: the same for any `m`.
mod portable {
    pub(super) fn dot_rows(x: &[f32], m: usize, w: &[f32], k: usize, out_t: &mut [f32]) {
        for (j, wr) in w.chunks_exact(k).enumerate() {
            for r in 0..m {
                out_t[j * m + r] = dot(wr, &x[r * k..(r + 1) * k]);
            }
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        let (ac, at) = a.split_at(a.len() / 8 * 8);
        let (bc, bt) = b.split_at(ac.len());
        for (ca, cb) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
            for l in 0..8 {
                lanes[l] += ca[l] * cb[l];
            }
        }
        let mut s = lanes.iter().sum::<f32>();
        for (p, q) in at.iter().zip(bt) {
            s += p * q;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// Tiles of 2 weight rows x up to 4 input rows: 8 accumulators, 6 loads per 8 FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(x: &[f32], m: usize, w: &[f32], k: usize, out_t: &mut [f32]) {
        let n = w.len() / k;
        let mut j = 0;
        while j < n {
            let wr = (n - j).min(2);
            let mut r = 0;
            while r < m {
                let xr = (m - r).min(4);
                match (wr, xr) {
                    (2, 4) => tile::<2, 4>(x, w, k, m, j, r, out_t),
                    (2, 3) => tile::<2, 3>(x, w, k, m, j, r, out_t),
                    (2, 2) => tile::<2, 2>(x, w, k, m, j, r, out_t),
                    (2, _) => tile::<2, 1>(x, w, k, m, j, r, out_t),
                    (_, 4) => tile::<1, 4>(x, w, k, m, j, r, out_t),
                    (_, 3) => tile::<1, 3>(x, w, k, m, j, r, out_t),
                    (_, 2) => tile::<1, 2>(x, w, k, m, j, r, out_t),
                    _ => tile::<1, 1>(x, w, k, m, j, r, out_t),
                }
                r += xr;
            }
            j += wr;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<const R: usize, const C: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        m: usize,
        j: usize,
        r: usize,
        out_t: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let k8 = k / 8 * 8;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut p = 0;
        while p < k8 {
            let mut wv = [_mm256_setzero_ps(); R];
            for (a, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add((j + a) * k + p));
            }
            for b in 0..C {
                let xv = _mm256_loadu_ps(xp.add((r + b) * k + p));
                for a in 0..R {
                    acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
            p += 8;
        }
        for a in 0..R {
            for b in 0..C {
                let mut s = hsum(acc[a][b]);
                for q in k8..k {
                    s += w[(j + a) * k + q] * x[(r + b) * k + q];
                }
                out_t[(j + a) * m + r + b] = s;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|p| x[r * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        out
    }

    /// `len` values in [-1, 1] in steps of 0.001, a fixed function of `seed` (no generator):
    /// the inputs of the few-row kernels' tests.
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_a_float64_reference_for_odd_shapes() {
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 7),
            (4, 33, 64),
            (5, 17, 100),
            (16, 70, 576),
        ] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let got = matmul_t(&x, m, &w, n, k);
            for (g, e) in got.iter().zip(reference(&x, m, &w, n, k)) {
                assert!(
                    (*g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{m}x{n}x{k}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_among_others() {
        let (n, k) = (37, 203);
        let w = values(n * k, 3);
        let x = values(9 * k, 4);
        let all = matmul_t(&x, 9, &w, n, k);
        for r in 0..9 {
            let alone = matmul_t(&x[r * k..(r + 1) * k], 1, &w, n, k);
            assert_eq!(alone, all[r * n..(r + 1) * n], "row {r}");
        }
    }
}
