//! The input rows of a few-row product, rounded to 16-bit integers per block of 32.

use super::BLOCK;

/// The rows of `x` rounded to 16 bits per block of 32: `x = q * d`, `d = max |x| / 32767`,
/// zeros past `k`.
///
/// The integers of blocks `2i` and `2i + 1` are stored together as the AVX-512 kernel reads
/// them: values 0..16 of block `2i`, values 0..16 of block `2i + 1`, then values 16..32 of
/// each (a row with an odd number of blocks ends in a pair whose second block is zeros).
pub(crate) struct RoundedInput {
    pub(super) m: usize,
    pub(super) blocks: usize,
    /// `[m, pairs of blocks, 64]`, laid out as above.
    q: Vec<i16>,
    /// `[m, blocks]`.
    pub(super) d: Vec<f32>,
    /// `[m, blocks]`: the sum of each block's integers (for the minima of `Int4Min`).
    pub(super) sums: Vec<i32>,
}

/// Values per pair of blocks.
const PAIR: usize = 2 * BLOCK;

impl RoundedInput {
    /// Compiled for AVX2 where the CPU has it (an inlined rounding instead of a call per value):
    /// the same operations, so the same integers.
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::skinny::has_avx2_fma() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { Self::new_avx2(x, m, k) };
        }
        Self::new_body(x, m, k)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn new_avx2(x: &[f32], m: usize, k: usize) -> Self {
        Self::new_body(x, m, k)
    }

    #[inline(always)]
    fn new_body(x: &[f32], m: usize, k: usize) -> Self {
        let blocks = k.div_ceil(BLOCK);
        let pairs = blocks.div_ceil(2);
        let mut q = vec![0i16; m * pairs * PAIR];
        let mut d = vec![0f32; m * blocks];
        let mut sums = vec![0i32; m * blocks];
        let mut block = [0i16; BLOCK];
        for r in 0..m {
            for b in 0..blocks {
                let values = &x[r * k + b * BLOCK..r * k + ((b + 1) * BLOCK).min(k)];
                let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
                // A NaN or infinite activation makes its row's outputs NaN, as an f32 product
                // would, instead of being rounded to some integer.
                if !amax.is_finite() || values.iter().any(|v| v.is_nan()) {
                    d[r * blocks + b] = f32::NAN;
                    continue;
                }
                let scale = amax / 32767.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                block.fill(0);
                for (o, v) in block.iter_mut().zip(values) {
                    *o = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
                }
                d[r * blocks + b] = scale;
                sums[r * blocks + b] = block.iter().map(|&v| v as i32).sum();
                let (lo, hi) = block.split_at(BLOCK / 2);
                let at = Self::offset(pairs, r, b);
                q[at..at + BLOCK / 2].copy_from_slice(lo);
                q[at + BLOCK..at + BLOCK + BLOCK / 2].copy_from_slice(hi);
            }
        }
        RoundedInput {
            m,
            blocks,
            q,
            d,
            sums,
        }
    }

    /// Where values 0..16 of row `r`'s block `b` start; values 16..32 are 32 further.
    fn offset(pairs: usize, r: usize, b: usize) -> usize {
        (r * pairs + b / 2) * PAIR + (b % 2) * (BLOCK / 2)
    }

    /// Values 0..16 of row `r`'s block `b`, then 16 further on its values 16..32.
    pub(super) fn low_half(&self, r: usize, b: usize) -> &[i16] {
        let at = Self::offset(self.blocks.div_ceil(2), r, b);
        &self.q[at..at + BLOCK + BLOCK / 2]
    }

    /// The integer of value `p` of row `r`'s block `b`.
    pub(super) fn value(&self, r: usize, b: usize, p: usize) -> i32 {
        let half = self.low_half(r, b);
        (if p < BLOCK / 2 {
            half[p]
        } else {
            half[BLOCK + p - BLOCK / 2]
        }) as i32
    }

    /// The integers of blocks `2 * pair` and `2 * pair + 1` of row `r` as the AVX-512 kernel
    /// reads them (64 values).
    pub(super) fn pair(&self, r: usize, pair: usize) -> &[i16] {
        let at = (r * self.blocks.div_ceil(2) + pair) * PAIR;
        &self.q[at..at + PAIR]
    }
}
