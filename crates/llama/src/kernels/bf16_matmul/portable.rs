//! The same products and the same order of sums per lane as the AVX-512 kernel, in plain
//! Rust: what a CPU without AVX512-BF16 runs.

use super::{bf16_value, Task, LANES};

pub(super) fn run(t: &Task<'_>) {
    for r in 0..t.rows {
        let xr = &t.x[r * t.stride..r * t.stride + t.pairs];
        for panel in 0..t.panels {
            let w = &t.w[panel * t.stride * LANES..][..t.pairs * LANES];
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
