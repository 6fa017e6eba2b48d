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
//! On CPUs with AMX (Intel Sapphire Rapids and later) the same products run on the tile
//! unit ([`amx`]): `TDPBF16PS` multiplies a 16-row tile of `x` by a 16-column panel over 32
//! values of `k` in one instruction, 16 times the work of a `VDPBF16PS`. It sums each step's 32
//! products in its own order (not the AVX-512 kernel's chain), so its last bits differ from the
//! other kernels'; `TEAMTUNE_NO_AMX=1` runs the AVX-512 kernel instead, to compare.
//!
//! Each output's sums run in one order whatever the number of rows or the tile it lands in
//! (the rows of a tile are computed apart), so a sequence gets the same bits alone or in a
//! batch, with any of the kernels.

use std::sync::OnceLock;

use rayon::prelude::*;

mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;
#[cfg(test)]
pub(crate) mod tests;

/// Output columns per panel: one 512-bit register of f32 lanes.
const LANES: usize = 16;
/// Rows of `x` a worker takes at once: their packed pairs stay in L2 while the weight
/// panels stream past.
const ROW_BLOCK: usize = 96;
/// Panels a worker takes at once (the kernel's tile width).
const PANEL_GROUP: usize = 4;
/// Pairs of `k` per AMX step (a tile row of 64 bytes): panels and packed rows of `x` are
/// padded with zeros to a multiple of it, so that a tile never reads past its panel.
const K_STEP: usize = 16;
/// Rows of an AMX tile: packed `x` is padded with zero rows to a multiple of it.
const TILE_ROWS: usize = 16;

/// The kernel this process runs, chosen once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Amx,
    Avx512,
    Portable,
}

fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if std::env::var_os("TEAMTUNE_NO_AMX").is_none() && amx::enable() {
            Kernel::Amx
        } else if PackedBf16::has_avx512_kernel() {
            Kernel::Avx512
        } else {
            Kernel::Portable
        }
    })
}

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
/// one 64-byte load feeds 16 lanes (and 16 pairs of a panel are an AMX tile). Rows past `n`,
/// the odd `k`'s last partner and the pairs past `k` up to a multiple of [`K_STEP`] are zeros.
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    pairs: usize,
    /// Pairs per panel, `pairs` rounded up to [`K_STEP`].
    panel_pairs: usize,
    panels: Vec<u32>,
}

impl PackedBf16 {
    /// Packs the row-major `w [n, k]`.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "a [{n}, {k}] weight has {} values", n * k);
        let pairs = k.div_ceil(2);
        let panel_pairs = pairs.div_ceil(K_STEP) * K_STEP;
        let count = n.div_ceil(LANES);
        let mut panels = vec![0u32; count * panel_pairs * LANES];
        panels
            .par_chunks_mut(panel_pairs * LANES)
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
            panel_pairs,
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

    /// Whether this CPU runs bf16 products in hardware (AMX or AVX512-BF16; otherwise a
    /// portable loop gives the same products, much slower).
    pub fn has_fast_kernel() -> bool {
        kernel() != Kernel::Portable
    }

    /// Whether this CPU has the AVX512-BF16 kernel.
    fn has_avx512_kernel() -> bool {
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
        self.matmul_t_with(kernel(), x, m)
    }

    fn matmul_t_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "input of {m} rows of {}", self.k);
        let (n, k, stride) = (self.n, self.k, self.panel_pairs);
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        // AMX tiles read whole 16-row blocks: the rows past `m` are zeros (their outputs are
        // not written).
        let padded = match kernel {
            Kernel::Amx => m.div_ceil(TILE_ROWS) * TILE_ROWS,
            _ => m,
        };
        let mut xp = vec![0u32; padded * stride];
        xp.par_chunks_mut(stride)
            .zip(x.par_chunks(k))
            .with_min_len(16)
            .for_each(|(dst, row)| {
                for (p, d) in dst[..self.pairs].iter_mut().enumerate() {
                    *d = pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0));
                }
            });
        let panel_count = n.div_ceil(LANES);
        let groups = panel_count.div_ceil(PANEL_GROUP);
        let row_blocks = m.div_ceil(ROW_BLOCK);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let panel_stride = stride * LANES;
        // Row block major: a worker's consecutive items share their rows of `x`.
        (0..row_blocks * groups).into_par_iter().for_each(|item| {
            let (rb, g) = (item / groups, item % groups);
            let (r0, r1) = (rb * ROW_BLOCK, ((rb + 1) * ROW_BLOCK).min(m));
            let p0 = g * PANEL_GROUP;
            let np = PANEL_GROUP.min(panel_count - p0);
            let col0 = p0 * LANES;
            let task = Task {
                x: &xp[r0 * stride..],
                rows: r1 - r0,
                pairs: self.pairs,
                stride,
                w: &self.panels[p0 * panel_stride..(p0 + np) * panel_stride],
                panels: np,
                cols: (n - col0).min(np * LANES),
                // SAFETY: items write disjoint (row block, column group) rectangles of `out`.
                out: unsafe { out_ptr.get().add(r0 * n + col0) },
                ldo: n,
            };
            match kernel {
                // SAFETY: the kernel was chosen for this CPU (and AMX enabled for the
                // process); `Task` holds the bounds the kernels stay in.
                #[cfg(target_arch = "x86_64")]
                Kernel::Amx => unsafe { amx::run(&task) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe { avx512::run(&task) },
                _ => portable::run(&task),
            }
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
/// written to `out` (row stride `ldo`), of which the first `cols` columns are real. Rows of
/// `x` and panels hold `stride` pairs, of which the first `pairs` are real (the rest zeros);
/// `x` runs to the end of the packed rows (for AMX, padded to whole tiles).
struct Task<'a> {
    x: &'a [u32],
    rows: usize,
    pairs: usize,
    stride: usize,
    w: &'a [u32],
    panels: usize,
    cols: usize,
    out: *mut f32,
    ldo: usize,
}
