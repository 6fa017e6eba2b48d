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

/// `y_row += scale * B (A x_row)`. Each of the `rank` sums of `A x` runs over the inputs in
/// order, and each output's sum of `B h` over the rank in order, a multiply then an add per
/// term: the plain loops' bits. The factors are transposed so that those chains run side by
/// side in vector lanes (`rank` of them for `A x`, the outputs for `B h`) instead of one after
/// the other: one chain at a time cost a tuned model's evaluation a sixth of its time.
fn add_row(y_row: &mut [f32], x_row: &[f32], f: &Transposed) {
    #[cfg(target_arch = "x86_64")]
    if super::skinny::has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { add_row_avx2(y_row, x_row, f) };
    }
    add_row_body(y_row, x_row, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_row_avx2(y_row: &mut [f32], x_row: &[f32], f: &Transposed) {
    add_row_body(y_row, x_row, f)
}

#[inline(always)]
fn add_row_body(y_row: &mut [f32], x_row: &[f32], f: &Transposed) {
    // Sums start at -0.0, as `Iterator::sum` does.
    let mut h = [-0.0f32; 8];
    let mut h_heap;
    let h: &mut [f32] = if f.rank == 8 {
        // The study's rank: a fixed length the compiler turns into one vector.
        for (i, &xi) in x_row.iter().enumerate() {
            let col: &[f32; 8] = f.at[i * 8..(i + 1) * 8].try_into().expect("rank 8");
            for k in 0..8 {
                h[k] += col[k] * xi;
            }
        }
        &mut h
    } else {
        h_heap = vec![-0.0f32; f.rank];
        for (i, &xi) in x_row.iter().enumerate() {
            let col = &f.at[i * f.rank..(i + 1) * f.rank];
            for (hk, &a) in h_heap.iter_mut().zip(col) {
                *hk += a * xi;
            }
        }
        &mut h_heap
    };
    let out = y_row.len();
    let mut u = vec![-0.0f32; out];
    for (k, &hk) in h.iter().enumerate() {
        for (uj, &b) in u.iter_mut().zip(&f.bt[k * out..(k + 1) * out]) {
            *uj += b * hk;
        }
    }
    for (yj, uj) in y_row.iter_mut().zip(&u) {
        *yj += f.scale * uj;
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
        y.par_chunks_mut(out.max(1))
            .zip(x.par_chunks(inner.max(1)))
            .zip(group_of.par_iter())
            .with_min_len(4)
            .for_each(|((y_row, x_row), &g)| {
                if let Some(f) = factors.get(g) {
                    add_row(y_row, x_row, f);
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
        let (n, inner, out) = (11, 37, 23);
        let (x, y) = (random((n, inner), 1), random((n, out), 2));
        let specs = [(8, 0.5f32, vec![0u32, 3, 4, 10]), (80, 2.0, vec![1, 7])];
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
        let (a, b) = (random((8, inner), 10), random((out, 8), 20));
        let alone = add_lora_rows(
            &y,
            &x,
            vec![RowGroup {
                a: a.clone(),
                b: b.clone(),
                scale: 0.5,
                rows: vec![4],
            }],
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        assert_eq!(alone[4], got[4]);
        // Rows of no group are untouched, bit for bit.
        let y_rows: Vec<Vec<f32>> = y.to_vec2().unwrap();
        for r in [2, 5, 6, 8, 9] {
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
