use super::*;

/// The kernels this CPU can run, the portable loop first.
fn kernels() -> Vec<Kernel> {
    let mut all = vec![Kernel::Portable];
    if PackedBf16::has_avx512_kernel() {
        all.push(Kernel::Avx512);
    }
    if amx::enable() {
        all.push(Kernel::Amx);
    }
    all
}

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
        let packed = PackedBf16::new(&w, n, k);
        let want = reference(&x, m, &w, n, k);
        for kernel in kernels() {
            let got = packed.matmul_t_with(kernel, &x, m);
            assert_eq!(got.len(), m * n);
            for (i, (g, (e, scale))) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - e).abs() <= 1e-6 * (1.0 + scale),
                    "{kernel:?} {m}x{n}x{k} at {i}: {g} vs {e}"
                );
            }
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
    for kernel in kernels() {
        let all = packed.matmul_t_with(kernel, &x, rows);
        // Rows at the edges of AMX tiles (16, and blocks of 32), of the AVX-512 kernel's
        // tiles (6) and of a worker's row block (96).
        for r in [0, 5, 6, 15, 16, 17, 31, 32, 95, 96, 130] {
            let alone = packed.matmul_t_with(kernel, &x[r * k..(r + 1) * k], 1);
            assert_eq!(alone, all[r * n..(r + 1) * n], "{kernel:?} row {r}");
            let first = r.min(rows - 3);
            let three = packed.matmul_t_with(kernel, &x[first * k..(first + 3) * k], 3);
            assert_eq!(
                three[(r - first) * n..][..n],
                all[r * n..(r + 1) * n],
                "{kernel:?} row {r} among 3"
            );
        }
    }
}

/// The AVX-512 kernel and the portable loop: the same products and order of sums (the
/// hardware may round a pair's sum differently: VDPBF16PS flushes denormals).
#[test]
fn the_portable_loop_follows_the_avx512_kernel() {
    if !PackedBf16::has_avx512_kernel() {
        return; // Nothing to compare with: the portable loop is what runs.
    }
    let (m, n, k) = (9, 37, 129);
    let (x, w) = (values(m * k, 5), values(n * k, 6));
    let packed = PackedBf16::new(&w, n, k);
    let fast = packed.matmul_t_with(Kernel::Avx512, &x, m);
    let slow = packed.matmul_t_with(Kernel::Portable, &x, m);
    for (a, b) in fast.iter().zip(&slow) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

/// On an AMX machine the process runs the AMX kernel unless `TEAMTUNE_NO_AMX` is set, and the
/// prompt-sized products that make it worth having (hundreds of rows, a model's widths) agree
/// with the AVX-512 kernel's to f32 rounding.
#[test]
fn amx_runs_where_the_cpu_has_it_and_agrees_with_avx512() {
    if !amx::enable() {
        assert_ne!(kernel(), Kernel::Amx);
        return;
    }
    if std::env::var_os("TEAMTUNE_NO_AMX").is_none() {
        assert_eq!(kernel(), Kernel::Amx);
    }
    let (m, n, k) = (200, 96, 576);
    let (x, w) = (values(m * k, 9), values(n * k, 10));
    let packed = PackedBf16::new(&w, n, k);
    let amx = packed.matmul_t_with(Kernel::Amx, &x, m);
    let avx = packed.matmul_t_with(Kernel::Avx512, &x, m);
    let mut differ = 0;
    for (a, b) in amx.iter().zip(&avx) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        differ += usize::from(a != b);
    }
    // Their orders of sums differ: if every bit agreed, the AMX path would not be running.
    assert!(differ > 0, "AMX gave the AVX-512 kernel's bits everywhere");
}
