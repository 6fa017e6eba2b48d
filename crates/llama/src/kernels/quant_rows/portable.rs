//! The arithmetic every kernel of this module follows, written out as plain loops: the AVX2
//! and AVX-512 kernels give its bits.
//!
//! For each (weight row, input row) there are two sets of eight f32 lanes, one for the even
//! blocks and one for the odd blocks (an AVX-512 register holds a pair of blocks: the even one
//! in its low half). Lane `l` of block `b` is the exact integer sum of values `2l, 2l + 1,
//! 16 + 2l, 17 + 2l` (`vpmaddwd` of each half, added), fused-multiply-added into its set
//! under `d_w * d_x`; `Int8Halves` adds the low half's pair under its scale, then the high
//! half's under its own. At the end the two sets are added lane by lane and the eight lanes as
//! [`crate::kernels::skinny::hsum_avx`] adds them. `Int4Min`'s minima add `m * d_x * sum(q_x)`
//! per block to a sum of their own, added last.

use super::{QuantFormat, QuantRows, RoundedInput};

pub(super) fn dot_rows(
    w: &QuantRows,
    x: &RoundedInput,
    first: usize,
    rows: usize,
    out_t: &mut [f32],
) {
    let per = w.format.bytes_per_block();
    for i in 0..rows {
        let j = first + i;
        for r in 0..x.m {
            let mut sets = [[0f32; 8]; 2];
            let mut minima = 0f32;
            for b in 0..w.blocks {
                let bytes = &w.bytes[(j * w.blocks + b) * per..][..per];
                let dx = x.d[r * x.blocks + b];
                let dot = |p: [usize; 2]| -> f32 {
                    p.iter()
                        .map(|&p| w.format.value(bytes, p) * x.value(r, b, p))
                        .sum::<i32>() as f32
                };
                for (l, lane) in sets[b % 2].iter_mut().enumerate() {
                    let (lo, hi) = ([2 * l, 2 * l + 1], [16 + 2 * l, 17 + 2 * l]);
                    if w.format == QuantFormat::Int8Halves {
                        let d = &w.scales[(j * w.blocks + b) * 2..][..2];
                        *lane = dot(lo).mul_add(d[0] * dx, *lane);
                        *lane = dot(hi).mul_add(d[1] * dx, *lane);
                    } else {
                        let scale = w.scales[j * w.blocks + b] * dx;
                        *lane = (dot(lo) + dot(hi)).mul_add(scale, *lane);
                    }
                }
                if let Some(&m) = w.mins.get(j * w.blocks + b) {
                    let xb = r * x.blocks + b;
                    minima = (x.sums[xb] as f32).mul_add(m * x.d[xb], minima);
                }
            }
            let lanes: [f32; 8] = std::array::from_fn(|l| sets[0][l] + sets[1][l]);
            let [a, b, c, d, e, f, g, h] = lanes;
            let sum = ((a + e) + (c + g)) + ((b + f) + (d + h));
            out_t[i * x.m + r] = if w.mins.is_empty() { sum } else { sum + minima };
        }
    }
}
