//! The LoRA term of inference, `y[r] += scale * B (A x[r])`, for chosen rows with chosen
//! adapters, as one CPU pass.
//!
//! At decode time a LoRA product is tiny (rank 8: `8 * in + out * 8` multiply-adds a row) and
//! composing it from candle ops (a gather, two matmuls, a scale, a scatter-add per adapter)
//! costs far more in op overhead than in arithmetic: with the study's adapter on all seven
//! projections, a 16-row decode step of SmolLM2 ran 36% slower than the base model, and
//! four adapters in one batch slower again. Here every row is one loop over its adapter's
//! factors, the same loop whatever rows or adapters share the step, so a sequence gets the
//! same bits alone or in any batch.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::cpu::contiguous_slice;

/// One adapter's factors for one projection and the rows (of `x` and `y`) that take it.
pub struct RowGroup {
    /// `A` `[rank, in]`, f32.
    pub a: Tensor,
    /// `B` `[out, rank]`, f32.
    pub b: Tensor,
    pub scale: f32,
    pub rows: Vec<u32>,
}

/// `y` `[n, out]` plus, on each group's rows, `scale * B (A x[r])` for `x` `[n, in]`; all f32
/// and on the CPU (the caller composes candle ops elsewhere).
pub fn add_lora_rows(y: &Tensor, x: &Tensor, groups: Vec<RowGroup>) -> Result<Tensor> {
    y.apply_op2_no_bwd(x, &LoraRows { groups })
}

struct LoraRows {
    groups: Vec<RowGroup>,
}

/// One adapter's factors laid out for [`add_row`]: `A^T` `[in, rank]` and `B^T` `[rank, out]`.
struct Transposed {
    at: Vec<f32>,
    bt: Vec<f32>,
    rank: usize,
    scale: f32,
}

impl Transposed {
    fn new(a: &[f32], b: &[f32], rank: usize, inner: usize, out: usize, scale: f32) -> Self {
        let mut at = vec![0f32; inner * rank];
        for k in 0..rank {
            for i in 0..inner {
                at[i * rank + k] = a[k * inner + i];
            }
        }
        let mut bt = vec![0f32; rank * out];
        for j in 0..out {
            for k in 0..rank {
                bt[k * out + j] = b[j * rank + k];
            }
        }
        Transposed {
            at,
            bt,
            rank,
            scale,
        }
    }
}

/// Consecutive rows of one adapter a worker takes at once. With one row, each step of `A x`
/// waits for the previous add (a chain as long as the input); four rows' chains side by side
/// keep the adder busy.
const ROWS_AT_ONCE: usize = 4;

/// `y_row += scale * B (A x_row)` for each of the `y.len() / out` rows of `y` and `x`. Each of
/// the `rank` sums of `A x` runs over the inputs in order, and each output's sum of `B h` over
/// the rank in order, a multiply then an add per term: the plain loops' bits, whatever rows
/// share the call. The factors are transposed so that those chains run side by side in vector
/// lanes (`rank` of them for `A x`, the outputs for `B h`) instead of one after the other: one
/// chain at a time cost a tuned model's evaluation a sixth of its time.
fn add_rows(y: &mut [f32], x: &[f32], f: &Transposed) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { add_rows_avx512(y, x, f) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::skinny::has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { add_rows_avx2(y, x, f) };
    }
    add_rows_body(y, x, f)
}

/// The same loops in 16-lane registers: each lane is still one output's chain, so the bits
/// do not change.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn add_rows_avx512(y: &mut [f32], x: &[f32], f: &Transposed) {
    add_rows_body(y, x, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_rows_avx2(y: &mut [f32], x: &[f32], f: &Transposed) {
    add_rows_body(y, x, f)
}

#[inline(always)]
fn add_rows_body(y: &mut [f32], x: &[f32], f: &Transposed) {
    let inner = f.at.len() / f.rank.max(1);
    let out = f.bt.len() / f.rank.max(1);
    let rows = y.len() / out.max(1);
    if f.rank == 8 {
        // The study's rank: a fixed length the compiler turns into one vector per row.
        match rows {
            4 => rank8_rows::<4>(y, x, f, inner, out),
            3 => rank8_rows::<3>(y, x, f, inner, out),
            2 => rank8_rows::<2>(y, x, f, inner, out),
            _ => {
                for (y_row, x_row) in y.chunks_exact_mut(out).zip(x.chunks_exact(inner)) {
                    rank8_rows::<1>(y_row, x_row, f, inner, out);
                }
            }
        }
        return;
    }
    for (y_row, x_row) in y.chunks_exact_mut(out).zip(x.chunks_exact(inner)) {
        // Sums start at -0.0, as `Iterator::sum` does.
        let mut h = vec![-0.0f32; f.rank];
        for (i, &xi) in x_row.iter().enumerate() {
            let col = &f.at[i * f.rank..(i + 1) * f.rank];
            for (hk, &a) in h.iter_mut().zip(col) {
                *hk += a * xi;
            }
        }
        add_up_projection(y_row, &h, f);
    }
}

/// `R` rows with a rank-8 adapter: each row's eight sums of `A x` as in one row alone, the
/// rows' chains interleaved.
#[inline(always)]
fn rank8_rows<const R: usize>(y: &mut [f32], x: &[f32], f: &Transposed, inner: usize, out: usize) {
    assert!(x.len() == R * inner && y.len() == R * out && f.at.len() == 8 * inner);
    #[cfg(target_arch = "x86_64")]
    let h = if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX; the lengths are asserted above.
        unsafe { simd::rank8_down::<R>(x, &f.at, inner) }
    } else {
        rank8_down::<R>(x, &f.at, inner)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let h = rank8_down::<R>(x, &f.at, inner);
    // `y += scale * B h` for the R rows together, each output's sum over the rank in order:
    // a block of B's transposed rows is read once for all R rows.
    const BLOCK: usize = 64;
    let mut j0 = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let blocks = out / BLOCK;
        // SAFETY: the CPU has AVX-512F; whole blocks only, inside `out` (lengths asserted).
        unsafe { simd::rank8_up_blocks::<R>(y, &h, f, out, blocks) };
        j0 = blocks * BLOCK;
    }
    while j0 < out {
        let width = BLOCK.min(out - j0);
        let mut u = [[-0.0f32; BLOCK]; R];
        for k in 0..8 {
            let b = &f.bt[k * out + j0..k * out + j0 + width];
            for (ur, hr) in u.iter_mut().zip(&h) {
                let hk = hr[k];
                for (uj, &bv) in ur[..width].iter_mut().zip(b) {
                    *uj += bv * hk;
                }
            }
        }
        for (r, ur) in u.iter().enumerate() {
            let y_row = &mut y[r * out + j0..r * out + j0 + width];
            for (yj, uj) in y_row.iter_mut().zip(&ur[..width]) {
                *yj += f.scale * uj;
            }
        }
        j0 += width;
    }
}

/// The eight sums of `A x` for each of `R` rows, over the inputs in order, a multiply then an
/// add per term (sums start at -0.0, as `Iterator::sum` does).
#[inline(always)]
fn rank8_down<const R: usize>(x: &[f32], at: &[f32], inner: usize) -> [[f32; 8]; R] {
    let mut h = [[-0.0f32; 8]; R];
    for i in 0..inner {
        let col: &[f32; 8] = at[i * 8..(i + 1) * 8].try_into().expect("rank 8");
        for (r, hr) in h.iter_mut().enumerate() {
            let xi = x[r * inner + i];
            for k in 0..8 {
                hr[k] += col[k] * xi;
            }
        }
    }
    h
}

/// The rank-8 loops written with vector instructions: the compiler left the eight sums of
/// `A x` as scalar operations with spills (a tuned model's evaluation spent a seventh of its
/// time there), and kept the 64 partial outputs of `B h` on the stack. Each lane does what
/// the plain loop does for its sum (a multiply, rounded, then an add), so the bits are the
/// same.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::Transposed;

    /// [`super::rank8_down`]: one 8-lane register per row, one lane per sum.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn rank8_down<const R: usize>(
        x: &[f32],
        at: &[f32],
        inner: usize,
    ) -> [[f32; 8]; R] {
        debug_assert!(x.len() >= R * inner && at.len() >= 8 * inner);
        let mut h = [_mm256_set1_ps(-0.0); R];
        for i in 0..inner {
            let col = _mm256_loadu_ps(at.as_ptr().add(i * 8));
            for (r, hr) in h.iter_mut().enumerate() {
                let xi = _mm256_set1_ps(*x.get_unchecked(r * inner + i));
                *hr = _mm256_add_ps(*hr, _mm256_mul_ps(col, xi));
            }
        }
        let mut out = [[0f32; 8]; R];
        for (o, hr) in out.iter_mut().zip(h) {
            _mm256_storeu_ps(o.as_mut_ptr(), hr);
        }
        out
    }

    /// `y += scale * B h` on the first `blocks` blocks of 64 outputs of each of `R` rows: each
    /// output's sum over the rank in order, in registers (four 16-lane registers a row).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rank8_up_blocks<const R: usize>(
        y: &mut [f32],
        h: &[[f32; 8]; R],
        f: &Transposed,
        out: usize,
        blocks: usize,
    ) {
        debug_assert!(y.len() >= R * out && f.bt.len() >= 8 * out && blocks * 64 <= out);
        let scale = _mm512_set1_ps(f.scale);
        let bt = f.bt.as_ptr();
        for block in 0..blocks {
            let j0 = block * 64;
            let mut u = [[_mm512_set1_ps(-0.0); 4]; R];
            for k in 0..8 {
                let b = bt.add(k * out + j0);
                let bv = [
                    _mm512_loadu_ps(b),
                    _mm512_loadu_ps(b.add(16)),
                    _mm512_loadu_ps(b.add(32)),
                    _mm512_loadu_ps(b.add(48)),
                ];
                for (ur, hr) in u.iter_mut().zip(h) {
                    let hk = _mm512_set1_ps(hr[k]);
                    for (uq, bq) in ur.iter_mut().zip(bv) {
                        *uq = _mm512_add_ps(*uq, _mm512_mul_ps(bq, hk));
                    }
                }
            }
            for (r, ur) in u.iter().enumerate() {
                let yr = y.as_mut_ptr().add(r * out + j0);
                for (q, uq) in ur.iter().enumerate() {
                    let yq = yr.add(16 * q);
                    let sum = _mm512_add_ps(_mm512_loadu_ps(yq), _mm512_mul_ps(scale, *uq));
                    _mm512_storeu_ps(yq, sum);
                }
            }
        }
    }
}

/// `y_row += scale * B h`, each output's sum over the rank in order, 64 outputs at a time on
/// the stack.
#[inline(always)]
fn add_up_projection(y_row: &mut [f32], h: &[f32], f: &Transposed) {
    const BLOCK: usize = 64;
    let out = y_row.len();
    let mut j0 = 0;
    while j0 < out {
        let width = BLOCK.min(out - j0);
        let mut u = [-0.0f32; BLOCK];
        for (k, &hk) in h.iter().enumerate() {
            let b = &f.bt[k * out + j0..k * out + j0 + width];
            for (uj, &bv) in u[..width].iter_mut().zip(b) {
                *uj += bv * hk;
            }
        }
        for (yj, uj) in y_row[j0..j0 + width].iter_mut().zip(&u[..width]) {
            *yj += f.scale * uj;
        }
        j0 += width;
    }
}

impl CustomOp2 for LoraRows {
    fn name(&self) -> &'static str {
        "lora-rows"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        ly: &Layout,
        xs: &CpuStorage,
        lx: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, out) = ly.shape().dims2()?;
        let (nx, inner) = lx.shape().dims2()?;
        if nx != n {
            bail!("lora rows: {n} output rows for {nx} input rows");
        }
        let mut y = contiguous_slice::<f32>(ys, ly, "y")?.to_vec();
        let x = contiguous_slice::<f32>(xs, lx, "x")?;
        // Which group each row takes (a row is in at most one).
        let mut group_of = vec![usize::MAX; n];
        for (g, group) in self.groups.iter().enumerate() {
            for &r in &group.rows {
                match group_of.get_mut(r as usize) {
                    Some(slot) => *slot = g,
                    None => bail!("lora rows: row {r} of {n}"),
                }
            }
        }
        let guards: Vec<_> = self
            .groups
            .iter()
            .map(|g| (g.a.storage_and_layout(), g.b.storage_and_layout()))
            .collect();
        let mut factors = Vec::with_capacity(guards.len());
        for (group, ((sa, la), (sb, lb))) in self.groups.iter().zip(&guards) {
            let (Storage::Cpu(a), Storage::Cpu(b)) = (&**sa, &**sb) else {
                bail!("lora rows: the factors are not on the CPU")
            };
            let (a, b) = (
                contiguous_slice::<f32>(a, la, "A")?,
                contiguous_slice::<f32>(b, lb, "B")?,
            );
            let rank = a.len() / inner.max(1);
            if a.len() != rank * inner || b.len() != out * rank {
                bail!(
                    "lora rows: factors of {} and {} values for [{out}, {inner}]",
                    a.len(),
                    b.len()
                );
            }
            factors.push(Transposed::new(a, b, rank, inner, out, group.scale));
        }
        // Chunks of consecutive rows; in each, runs of rows with the same adapter together.
        y.par_chunks_mut((ROWS_AT_ONCE * out).max(1))
            .zip(x.par_chunks((ROWS_AT_ONCE * inner).max(1)))
            .zip(group_of.par_chunks(ROWS_AT_ONCE))
            .for_each(|((y, x), groups)| {
                let mut r = 0;
                while r < groups.len() {
                    let g = groups[r];
                    let run = groups[r..].iter().take_while(|&&h| h == g).count();
                    if let Some(f) = factors.get(g) {
                        add_rows(
                            &mut y[r * out..(r + run) * out],
                            &x[r * inner..(r + run) * inner],
                            f,
                        );
                    }
                    r += run;
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let h = (i ^ seed)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .rotate_left(17);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Against the composed ops: `y[rows] + scale * (x[rows] A^T) B^T`, each group on its
    /// rows, other rows unchanged; ranks on the stack and past it.
    #[test]
    fn adds_each_groups_product_to_its_rows_only() {
        // Runs of 1 to 4 consecutive rows of one adapter (rows are taken 4 at a time).
        let (n, inner, out) = (19, 37, 71);
        let (x, y) = (random((n, inner), 1), random((n, out), 2));
        let specs = [
            (8, 0.5f32, vec![0u32, 3, 4, 10, 11, 12, 13, 14, 15, 16, 17]),
            (80, 2.0, vec![1, 7, 8, 9]),
        ];
        let groups = groups_again(&specs, inner, out);
        let mut want: Vec<Vec<f32>> = y.to_vec2().unwrap();
        for g in &groups {
            for &r in &g.rows {
                let xr = x.i(r as usize).unwrap().unsqueeze(0).unwrap();
                let u = xr
                    .matmul(&g.a.t().unwrap())
                    .unwrap()
                    .matmul(&g.b.t().unwrap())
                    .unwrap();
                let u: Vec<f32> = (u * g.scale as f64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (w, u) in want[r as usize].iter_mut().zip(u) {
                    *w += u;
                }
            }
        }
        let got: Vec<Vec<f32>> = add_lora_rows(&y, &x, groups).unwrap().to_vec2().unwrap();
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "row {r}: {a} vs {b}"
                );
            }
        }
        // The bits of the plain loops: each sum in order, a multiply then an add per term.
        for (g, spec) in groups_again(&specs, inner, out).iter().zip(&specs) {
            let (a, b) = (g.a.to_vec2::<f32>().unwrap(), g.b.to_vec2::<f32>().unwrap());
            let (x_rows, y_rows) = (x.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
            for &r in &spec.2 {
                let h: Vec<f32> = a
                    .iter()
                    .map(|a_row| {
                        a_row
                            .iter()
                            .zip(&x_rows[r as usize])
                            .map(|(a, x)| a * x)
                            .sum()
                    })
                    .collect();
                for (j, b_row) in b.iter().enumerate() {
                    let u: f32 = b_row.iter().zip(&h).map(|(b, h)| b * h).sum();
                    let want = y_rows[r as usize][j] + spec.1 * u;
                    assert_eq!(
                        got[r as usize][j].to_bits(),
                        want.to_bits(),
                        "row {r} output {j}"
                    );
                }
            }
        }
        // A row's term does not depend on the other rows or groups of the call.
        // Row 4 ran alone, row 13 among four, row 17 as the second of two.
        let (a, b) = (random((8, inner), 10), random((out, 8), 20));
        for r in [4usize, 13, 17] {
            let alone = add_lora_rows(
                &y,
                &x,
                vec![RowGroup {
                    a: a.clone(),
                    b: b.clone(),
                    scale: 0.5,
                    rows: vec![r as u32],
                }],
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
            assert_eq!(alone[r], got[r], "row {r}");
        }
        // Rows of no group are untouched, bit for bit.
        let y_rows: Vec<Vec<f32>> = y.to_vec2().unwrap();
        for r in [2, 5, 6, 18] {
            assert_eq!(got[r], y_rows[r]);
        }
    }

    /// The groups of `specs` (rank, scale, rows), factors a fixed function of their index;
    /// again for each call, which consumes its groups.
    fn groups_again(specs: &[(usize, f32, Vec<u32>)], inner: usize, out: usize) -> Vec<RowGroup> {
        specs
            .iter()
            .enumerate()
            .map(|(i, (rank, scale, rows))| RowGroup {
                a: random((*rank, inner), 10 + i as u64),
                b: random((out, *rank), 20 + i as u64),
                scale: *scale,
                rows: rows.clone(),
            })
            .collect()
    }
}
