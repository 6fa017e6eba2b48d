use super::*;
use crate::kernels::skinny::tests::values;

const FORMATS: [QuantFormat; 4] = [
    QuantFormat::Int8,
    QuantFormat::Int4,
    QuantFormat::Int4Min,
    QuantFormat::Int8Halves,
];

/// `x W^T` in f64 from the dequantised weight and the unrounded `x`, with the bound the
/// activations' rounding allows (half a step of each block's scale, times the weights).
fn reference(q: &QuantRows, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (n, k) = (q.n, q.k);
    let w = q.dequantize();
    let acts = RoundedInput::new(x, m, k);
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

/// Each vector kernel this CPU has, run directly (not through the dispatch), against the
/// portable loop: the same bits for every format, an odd and an even number of blocks, a
/// row count that ends in partial tiles, and weight rows taken from the middle.
#[test]
fn the_portable_loop_gives_the_kernels_bits() {
    type Kernel = unsafe fn(&QuantRows, &RoundedInput, usize, usize, &mut [f32]);
    #[allow(unused_mut)]
    let mut kernels: Vec<(&str, Kernel)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if skinny::has_avx2_fma() {
            kernels.push(("avx2", avx2::dot_rows));
        }
        if avx512::cpu_has_features() {
            kernels.push(("avx512", avx512::dot_rows));
        }
    }
    eprintln!(
        "kernels checked against the portable loop: {:?}",
        kernels.iter().map(|k| k.0).collect::<Vec<_>>()
    );
    // 7 blocks (the last one a partial block), 8 blocks, and a single block.
    for (m, n, k) in [(6, 19, 200), (5, 11, 256), (3, 5, 20)] {
        let (x, w) = (values(m * k, 5), values(n * k, 6));
        for format in FORMATS {
            let q = QuantRows::new(format, &w, n, k);
            let acts = RoundedInput::new(&x, m, k);
            let (first, rows) = (1, n - 2);
            let mut want = vec![0f32; rows * m];
            portable::dot_rows(&q, &acts, first, rows, &mut want);
            for (name, kernel) in &kernels {
                let mut got = vec![f32::NAN; rows * m];
                // SAFETY: the CPU has the kernel's features (checked above); rows
                // `first..first + rows` exist.
                unsafe { kernel(&q, &acts, first, rows, &mut got) };
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{name} {format:?} {m}x{n}x{k}: weight row {} input row {}",
                        first + i / m,
                        i % m
                    );
                }
            }
            // The dispatch too.
            let all = q.matmul_t(&x, m);
            for (i, e) in want.iter().enumerate() {
                let (j, r) = (first + i / m, i % m);
                assert_eq!(all[r * n + j].to_bits(), e.to_bits(), "{format:?}");
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
                let spb = format.scales_per_block();
                for p in b * BLOCK..((b + 1) * BLOCK).min(k) {
                    // The scale of the value's block, or of its half of the block.
                    let d = q.scales[(j * q.blocks + b) * spb + (p % BLOCK) * spb / BLOCK];
                    assert!(d != 0.0);
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

/// Many rows (a prefill) through tiles of widened weight rows and gemm: the f32 product of the
/// dequantised weight and the unrounded input, for a row count past a tile and not a multiple
/// of it, in every format.
#[test]
fn many_rows_take_the_dequantised_weight_through_gemm() {
    let (m, n, k) = (37, 150, 100);
    let (x, w) = (values(m * k, 11), values(n * k, 12));
    for format in FORMATS {
        let q = QuantRows::new(format, &w, n, k);
        let wd = q.dequantize();
        let got = q.matmul_t_many(&x, m);
        for r in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|p| x[r * k + p] as f64 * wd[j * k + p] as f64)
                    .sum();
                let err = (got[r * n + j] as f64 - want).abs();
                assert!(
                    err <= 1e-5 * (1.0 + want.abs()),
                    "{format:?} [{r}, {j}]: {} vs {want}",
                    got[r * n + j]
                );
            }
        }
    }
}
