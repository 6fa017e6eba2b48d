//! `x W^T` on the CPU for the few rows of a decode step, with `W` kept as 8-bit or 4-bit
//! integers (a scale per block of 32 along `k`, as GGUF's Q8_0 and Q4_0, and a minimum too
//! as Q4_1). The blocks come from rounding dense weights ([`QuantRows::new`]) or straight
//! from a GGUF file as stored ([`QuantRows::from_blocks`]).
//!
//! A decode step reads every weight once and is bound by those bytes: 8-bit weights are a
//! quarter of f32's, 4-bit ones an eighth. candle's quantised matmul rounds the activation to
//! 8 bits (its dot products are 8-bit integer ones), which moves logits enough to flip near
//! ties between top tokens; and it runs on candle's own worker pool, which this crate keeps at
//! one thread on small machines ([`crate::share_cores_with_candle`]). Here the activation is
//! rounded to 16 bits per block of 32 (a scale per block: an error below 2^-16 of the block's
//! largest value, far under the weights' own rounding), the integer products of a block are
//! summed exactly in 32 bits (`vpmaddwd`), and each block's sum is scaled and added in f32.
//! Rows are split over rayon's threads.
//!
//! Every output is one chain of the same operations in the same order whatever the number of
//! rows: a sequence gets the same bits alone or in a batch. The portable loop
//! ([`portable`]) defines that chain; the AVX2 and AVX-512 kernels give its bits, so a
//! machine's vector width never changes a reply.

use super::skinny;
/// An input rounded for [`QuantRows::dot_rows`] (shared by the weights that read it).
pub(crate) use activations::RoundedInput;

/// A kernel's entry point and its walk over tiles of up to 2 weight rows x 4 input rows, for a
/// module with `tile::<R, C, KIND>(w, x, (first, j, r), out_t)` compiled for `$features`.
#[cfg(target_arch = "x86_64")]
macro_rules! tiled_kernel {
    ($features:literal) => {
        /// `out_t[i * m + r]` = weight row `first + i` dotted with input row `r`, for `rows`
        /// rows.
        ///
        /// # Safety
        /// The CPU has the module's features; rows `first..first + rows` exist in `w`; `x`
        /// has `w`'s blocks.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_rows(
            w: &QuantRows,
            x: &RoundedInput,
            first: usize,
            rows: usize,
            out_t: &mut [f32],
        ) {
            match kind(w.format) {
                INT8 => rows_of::<INT8>(w, x, first, rows, out_t),
                INT4 => rows_of::<INT4>(w, x, first, rows, out_t),
                INT4_MIN => rows_of::<INT4_MIN>(w, x, first, rows, out_t),
                _ => rows_of::<INT8_HALVES>(w, x, first, rows, out_t),
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn rows_of<const KIND: u8>(
            w: &QuantRows,
            x: &RoundedInput,
            first: usize,
            rows: usize,
            out_t: &mut [f32],
        ) {
            let m = x.m;
            let mut j = 0;
            while j < rows {
                let wr = (rows - j).min(2);
                let mut r = 0;
                while r < m {
                    let xr = (m - r).min(4);
                    let at = (first, j, r);
                    match (wr, xr) {
                        (2, 4) => tile::<2, 4, KIND>(w, x, at, out_t),
                        (2, 3) => tile::<2, 3, KIND>(w, x, at, out_t),
                        (2, 2) => tile::<2, 2, KIND>(w, x, at, out_t),
                        (2, _) => tile::<2, 1, KIND>(w, x, at, out_t),
                        (_, 4) => tile::<1, 4, KIND>(w, x, at, out_t),
                        (_, 3) => tile::<1, 3, KIND>(w, x, at, out_t),
                        (_, 2) => tile::<1, 2, KIND>(w, x, at, out_t),
                        _ => tile::<1, 1, KIND>(w, x, at, out_t),
                    }
                    r += xr;
                }
                j += wr;
            }
        }
    };
}

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

/// Values per scale.
pub(crate) const BLOCK: usize = 32;

/// Weight rows widened to f32 at a time by [`QuantRows::matmul_t_many`].
const MANY_ROWS_TILE: usize = 32;

/// How the integers of a [`QuantRows`] are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuantFormat {
    /// One signed byte per value, `w = q * d` with `d = max |w| / 127` (GGUF's Q8_0).
    Int8,
    /// Two values per byte, `w = (q - 8) * d` with `q` in `0..16` and `d` the block's
    /// largest-magnitude value over -8 (GGUF's Q4_0). Byte `i` of a block holds value `i` in
    /// its low half and value `i + 16` in its high half.
    Int4,
    /// Two values per byte as `Int4`, unsigned: `w = q * d + m` with `q` in `0..16` and a
    /// minimum `m` per block (GGUF's Q4_1; Q4_K's sub-blocks of 32 have the same form).
    Int4Min,
    /// One signed byte per value as `Int8`, with a scale for each half of 16 (GGUF's Q6_K
    /// sub-blocks, and the 5-bit integers of Q5_0 widened).
    Int8Halves,
}

impl QuantFormat {
    pub(crate) fn bytes_per_block(self) -> usize {
        match self {
            QuantFormat::Int8 | QuantFormat::Int8Halves => BLOCK,
            QuantFormat::Int4 | QuantFormat::Int4Min => BLOCK / 2,
        }
    }

    /// Scales per block of 32: one, or one per half.
    pub(crate) fn scales_per_block(self) -> usize {
        if self == QuantFormat::Int8Halves {
            2
        } else {
            1
        }
    }
}

/// A weight `[n, k]` quantised by blocks of 32 along `k` (the last block of a row padded with
/// zeros), for [`QuantRows::matmul_t`].
#[derive(Debug, Clone)]
pub(crate) struct QuantRows {
    format: QuantFormat,
    n: usize,
    k: usize,
    /// Blocks per row (`k / 32` rounded up).
    blocks: usize,
    /// `[n, blocks, scales per block]`.
    scales: Vec<f32>,
    /// `[n, blocks]` for `Int4Min`, empty otherwise.
    mins: Vec<f32>,
    /// `[n, blocks, bytes per block]`.
    bytes: Vec<u8>,
}

impl QuantRows {
    /// Quantises the row-major `w [n, k]`.
    pub(crate) fn new(format: QuantFormat, w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "a [{n}, {k}] weight has {} values", n * k);
        let blocks = k.div_ceil(BLOCK);
        let per = format.bytes_per_block();
        let spb = format.scales_per_block();
        let mut scales = vec![0f32; n * blocks * spb];
        let mut mins = Vec::new();
        let mut bytes = vec![0u8; n * blocks * per];
        let mut padded = [0f32; BLOCK];
        for j in 0..n {
            for b in 0..blocks {
                let lo = b * BLOCK;
                let hi = (lo + BLOCK).min(k);
                padded.fill(0.0);
                padded[..hi - lo].copy_from_slice(&w[j * k + lo..j * k + hi]);
                let out = &mut bytes[(j * blocks + b) * per..][..per];
                let at = (j * blocks + b) * spb;
                scales[at] = match format {
                    QuantFormat::Int8 => quantize_int8(&padded, out),
                    QuantFormat::Int8Halves => {
                        let (lo, hi) = padded.split_at(BLOCK / 2);
                        let (out_lo, out_hi) = out.split_at_mut(BLOCK / 2);
                        scales[at + 1] = quantize_int8(hi, out_hi);
                        quantize_int8(lo, out_lo)
                    }
                    QuantFormat::Int4 => quantize_int4(&padded, out),
                    QuantFormat::Int4Min => {
                        let (d, m) = quantize_int4_min(&padded, out);
                        mins.push(m);
                        d
                    }
                };
            }
        }
        Self::from_blocks(format, n, k, scales, mins, bytes)
    }

    /// A weight `[n, k]` given as its blocks, e.g. a GGUF file's as stored: `scales` (and for
    /// `Int4Min` `mins`, else nothing) `[n, blocks]`, `bytes` `[n, blocks, bytes per block]`
    /// laid out as [`QuantFormat`] says.
    pub(crate) fn from_blocks(
        format: QuantFormat,
        n: usize,
        k: usize,
        scales: Vec<f32>,
        mins: Vec<f32>,
        bytes: Vec<u8>,
    ) -> Self {
        let blocks = k.div_ceil(BLOCK);
        let want_mins = if format == QuantFormat::Int4Min {
            n * blocks
        } else {
            0
        };
        assert_eq!(
            scales.len(),
            n * blocks * format.scales_per_block(),
            "scales of a [{n}, {k}] {format:?} weight"
        );
        assert_eq!(
            mins.len(),
            want_mins,
            "minima of a [{n}, {k}] {format:?} weight"
        );
        assert_eq!(
            bytes.len(),
            n * blocks * format.bytes_per_block(),
            "blocks of a [{n}, {k}] {format:?} weight"
        );
        QuantRows {
            format,
            n,
            k,
            blocks,
            scales,
            mins,
            bytes,
        }
    }

    /// The same weight with row `j` taken from row `order[j]` (a permutation of `0..n`).
    pub(crate) fn with_rows_in_order(&self, order: &[usize]) -> Self {
        assert_eq!(order.len(), self.n, "an order of {} rows", self.n);
        let per_row = self.blocks * self.format.bytes_per_block();
        let (mut scales, mut mins, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
        let spb = self.format.scales_per_block();
        for &j in order {
            let blocks = j * self.blocks..(j + 1) * self.blocks;
            scales.extend_from_slice(&self.scales[blocks.start * spb..blocks.end * spb]);
            if !self.mins.is_empty() {
                mins.extend_from_slice(&self.mins[blocks]);
            }
            bytes.extend_from_slice(&self.bytes[j * per_row..(j + 1) * per_row]);
        }
        Self::from_blocks(self.format, self.n, self.k, scales, mins, bytes)
    }

    pub(crate) fn rows(&self) -> usize {
        self.n
    }

    pub(crate) fn cols(&self) -> usize {
        self.k
    }

    /// The f32 values the weight stands for, `[n, k]`.
    #[cfg(test)]
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        self.dequantize_rows(0, self.n, &mut out);
        out
    }

    /// `x [m, k] @ W^T` as `[m, n]` for many rows (a prefill): tiles of [`MANY_ROWS_TILE`]
    /// weight rows are widened to f32 (exactly [`Self::dequantize_rows`]) and multiplied by
    /// gemm, tiles split over rayon's threads. Only a tile is ever dense.
    pub(crate) fn matmul_t_many(&self, x: &[f32], m: usize) -> Vec<f32> {
        use rayon::prelude::*;
        assert_eq!(x.len(), m * self.k, "{m} rows of {} values", self.k);
        let (n, k) = (self.n, self.k);
        // Each tile writes its own columns: [tile, m] transposed here, placed after.
        let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(MANY_ROWS_TILE))
            .into_par_iter()
            .map(|t| {
                let first = t * MANY_ROWS_TILE;
                let count = MANY_ROWS_TILE.min(n - first);
                let mut w = vec![0f32; count * k];
                self.dequantize_rows(first, count, &mut w);
                let mut out = vec![0f32; m * count];
                // out [m, count] = x [m, k] @ w^T, w^T read as [k, count] with strides (1, k).
                super::cpu::gemm_f32(
                    m,
                    count,
                    k,
                    &mut out,
                    count,
                    false,
                    (x, k, 1),
                    (&w, 1, k),
                    1,
                );
                (first, out)
            })
            .collect();
        let mut y = vec![0f32; m * n];
        for (first, out) in tiles {
            let count = out.len() / m.max(1);
            for r in 0..m {
                y[r * n + first..r * n + first + count]
                    .copy_from_slice(&out[r * count..(r + 1) * count]);
            }
        }
        y
    }

    /// Rows `first..first + count` dequantised into `out` (`[count, k]`).
    pub(crate) fn dequantize_rows(&self, first: usize, count: usize, out: &mut [f32]) {
        let per = self.format.bytes_per_block();
        for (i, row) in out.chunks_exact_mut(self.k).take(count).enumerate() {
            let j = first + i;
            for (b, chunk) in row.chunks_mut(BLOCK).enumerate() {
                let spb = self.format.scales_per_block();
                let d = &self.scales[(j * self.blocks + b) * spb..][..spb];
                let m = self.mins.get(j * self.blocks + b).copied();
                let q = &self.bytes[(j * self.blocks + b) * per..][..per];
                for (p, v) in chunk.iter_mut().enumerate() {
                    let scaled = self.format.value(q, p) as f32 * d[p * spb / BLOCK];
                    *v = m.map_or(scaled, |m| scaled + m);
                }
            }
        }
    }

    /// `x [m, k] @ W^T` as `[m, n]`.
    pub(crate) fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "{m} rows of {} values", self.k);
        let x = RoundedInput::new(x, m, self.k);
        skinny::by_weight_rows(m, self.n, |first, rows, out_t| {
            self.dot_rows(&x, first, rows, out_t)
        })
    }

    /// Weight rows `first..first + rows` dotted with every row of `x` into `out_t`
    /// (`[rows, m]`), by the widest kernel the CPU runs.
    pub(crate) fn dot_rows(&self, x: &RoundedInput, first: usize, rows: usize, out_t: &mut [f32]) {
        // SAFETY (both kernels): the CPU has the features; the kernel reads weight rows
        // `first..first + rows` (inside `n`, by the chunking) and the `m` rows of `x`, each
        // `blocks * 32` values long.
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            unsafe { avx512::dot_rows(self, x, first, rows, out_t) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if skinny::has_avx2_fma() {
            unsafe { avx2::dot_rows(self, x, first, rows, out_t) };
            return;
        }
        portable::dot_rows(self, x, first, rows, out_t)
    }
}

impl QuantFormat {
    /// The signed integer of value `p` of a block.
    fn value(self, q: &[u8], p: usize) -> i32 {
        match self {
            QuantFormat::Int8 | QuantFormat::Int8Halves => q[p] as i8 as i32,
            QuantFormat::Int4 => {
                let byte = q[p % (BLOCK / 2)];
                let nibble = if p < BLOCK / 2 {
                    byte & 0x0F
                } else {
                    byte >> 4
                };
                nibble as i32 - 8
            }
            QuantFormat::Int4Min => {
                let byte = q[p % (BLOCK / 2)];
                (if p < BLOCK / 2 {
                    byte & 0x0F
                } else {
                    byte >> 4
                }) as i32
            }
        }
    }
}

/// Q8_0's rounding: `d = max |w| / 127`, `q = round(w / d)`. Returns `d`.
fn quantize_int8(w: &[f32], out: &mut [u8]) -> f32 {
    let amax = w.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in out.iter_mut().zip(w) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8 as u8;
    }
    d
}

/// Q4_0's rounding: `d` the largest-magnitude value over -8, `q = min(15, trunc(w / d + 8.5))`.
/// Returns `d`.
fn quantize_int4(w: &[f32; BLOCK], out: &mut [u8]) -> f32 {
    let max = w
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * inv + 8.5) as u8).min(15);
    for (i, o) in out.iter_mut().enumerate() {
        *o = q(w[i]) | q(w[i + BLOCK / 2]) << 4;
    }
    d
}

/// Q4_1's rounding: `m` the smallest value, `d = (max - m) / 15`, `q = min(15, trunc((w - m)
/// / d + 0.5))`. Returns `(d, m)`.
fn quantize_int4_min(w: &[f32; BLOCK], out: &mut [u8]) -> (f32, f32) {
    let min = w.iter().copied().fold(f32::INFINITY, f32::min);
    let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| (((v - min) * inv + 0.5) as u8).min(15);
    for (i, o) in out.iter_mut().enumerate() {
        *o = q(w[i]) | q(w[i + BLOCK / 2]) << 4;
    }
    (d, min)
}

#[cfg(test)]
mod tests;
