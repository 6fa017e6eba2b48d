//! Reproducible dropout masks for LoRA inputs.
//!
//! A mask is a pure function of a seed, so that the same training step draws the same masks
//! when it is run again: a layer recomputed in the backward of gradient checkpointing must see
//! the forward's masks, and a run resumed from a checkpoint must see the masks the interrupted
//! run would have drawn. candle's CPU generator cannot be seeded, so on the CPU the masks come
//! from our own counter-based generator; on an accelerator the device generator is re-seeded
//! per mask (drawing there avoids moving a mask of activation size over the bus).
//!
//! The CPU generator hashes each pair of elements' index with two rounds of a 32-bit integer
//! hash keyed by the seed (32-bit multiplies vectorise, eight pairs at a time with AVX2) and
//! gives each element 16 of the bits: `p` is applied as a multiple of 1/65,536 (0.2 is
//! 0.199997). A training step draws a mask for every LoRA projection of every layer twice
//! (forward and backward), so the generator was 7% of a 512-token step as a 64-bit hash per
//! pair, and the mask is applied to the input in place rather than stored.

use candle_core::{DType, Device, Shape, Tensor};
use rayon::prelude::*;

use teamtune_seed::mix64;

use crate::error::Result;

/// Mixes several integers into one seed (re-exported from `teamtune-seed`, its one home).
pub use teamtune_seed::mix_seed;

/// Element pairs per parallel chunk.
const PAIRS: usize = 1 << 13;

/// A 32-bit integer hash with low bias (Wellons' `lowbias32`): a bijection, so distinct pair
/// indices of one key never share their bits.
#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The dropout of one mask: which elements are dropped and what the others are scaled by.
#[derive(Debug, Clone, Copy)]
struct MaskDraw {
    k1: u32,
    k2: u32,
    /// An element is dropped when its 16 bits are below this.
    threshold: u32,
    keep_scale: f32,
}

impl MaskDraw {
    fn new(p: f32, seed: u64) -> Self {
        let key = mix64(seed);
        MaskDraw {
            k1: key as u32,
            k2: (key >> 32) as u32,
            threshold: (p as f64 * 65_536.0).round() as u32,
            keep_scale: 1.0 / (1.0 - p),
        }
    }

    /// The bits of element pair `j` (pairs past 2^32 wrap around).
    #[inline(always)]
    fn pair_bits(&self, j: usize) -> u32 {
        hash32(hash32(j as u32 ^ self.k1) ^ self.k2)
    }

    #[inline(always)]
    fn factor(&self, bits16: u32) -> f32 {
        if bits16 < self.threshold {
            0.0
        } else {
            self.keep_scale
        }
    }

    /// Multiplies `x`, the elements from pair `first_pair` on, by their mask values.
    #[inline(always)]
    fn apply_body(&self, x: &mut [f32], first_pair: usize) {
        let done = x.len() / 16 * 8;
        let mut blocks = x.chunks_exact_mut(16);
        for (b, block) in (&mut blocks).enumerate() {
            let base = first_pair + 8 * b;
            let mut bits = [0u32; 8];
            for (l, v) in bits.iter_mut().enumerate() {
                *v = self.pair_bits(base + l);
            }
            for l in 0..8 {
                block[2 * l] *= self.factor(bits[l] & 0xFFFF);
                block[2 * l + 1] *= self.factor(bits[l] >> 16);
            }
        }
        for (j, pair) in blocks.into_remainder().chunks_mut(2).enumerate() {
            let bits = self.pair_bits(first_pair + done + j);
            for (e, v) in pair.iter_mut().enumerate() {
                *v *= self.factor((bits >> (16 * e)) & 0xFFFF);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn apply_avx2(&self, x: &mut [f32], first_pair: usize) {
        self.apply_body(x, first_pair)
    }

    fn apply(&self, x: &mut [f32], first_pair: usize) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function is compiled for.
            return unsafe { self.apply_avx2(x, first_pair) };
        }
        self.apply_body(x, first_pair)
    }

    /// Applies the whole mask to `x` in parallel chunks (the bits of a pair do not depend on
    /// the chunk it falls in).
    fn apply_all(&self, x: &mut [f32]) {
        x.par_chunks_mut(2 * PAIRS)
            .enumerate()
            .for_each(|(c, chunk)| self.apply(chunk, c * PAIRS));
    }
}

/// `x *= mask` in place, with the CPU mask [`dropout_mask`] draws for `x.len()` elements: the
/// same values as multiplying by the mask, without storing it.
pub fn apply_dropout(x: &mut [f32], p: f32, seed: u64) {
    MaskDraw::new(p, seed).apply_all(x);
}

/// The inverted-dropout multiplier for `shape`: each element is `0` with probability `p`,
/// else `1 / (1 - p)` (PyTorch's convention), as f32 on `device`.
pub fn dropout_mask(shape: &Shape, p: f32, seed: u64, device: &Device) -> Result<Tensor> {
    let keep_scale = 1.0 / (1.0 - p);
    if device.is_cpu() {
        let mut data = vec![1f32; shape.elem_count()];
        apply_dropout(&mut data, p, seed);
        return Ok(Tensor::from_vec(data, shape, device)?);
    }
    device.set_seed(seed)?;
    let u = Tensor::rand(0f32, 1f32, shape, device)?;
    Ok((u.ge(p as f64)?.to_dtype(DType::F32)? * keep_scale as f64)?)
}

/// `x * mask` with a mask drawn from `seed` (see [`dropout_mask`]); `x` must be f32. An op of
/// the graph: gradients flow to `x`.
pub fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let mask = dropout_mask(x.shape(), p, seed, x.device())?;
    Ok(x.mul(&mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_repeat_for_a_seed_and_differ_between_seeds() {
        let shape = Shape::from((64, 128));
        let a = dropout_mask(&shape, 0.2, 7, &Device::Cpu).unwrap();
        let b = dropout_mask(&shape, 0.2, 7, &Device::Cpu).unwrap();
        let c = dropout_mask(&shape, 0.2, 8, &Device::Cpu).unwrap();
        let (a, b, c) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.2).abs() < 0.02, "dropped fraction {dropped}");
        let kept = a.iter().find(|&&v| v != 0.0).unwrap();
        assert!((kept - 1.25).abs() < 1e-6);
        // Odd sizes are filled exactly.
        let odd = dropout_mask(&Shape::from(7), 0.5, 1, &Device::Cpu).unwrap();
        assert_eq!(odd.dims(), &[7]);
    }

    #[test]
    fn parallel_chunks_give_the_formula_of_each_element_pair() {
        // Longer than one chunk and odd: element pair j is hash32(hash32(j ^ k1) ^ k2), its low
        // 16 bits for the even element and its high 16 for the odd one, wherever the chunks
        // and the eight-pair blocks fall.
        let n = 3 * (1 << 14) + 5;
        let (p, seed) = (0.2f32, 11u64);
        let got = dropout_mask(&Shape::from(n), p, seed, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let key = mix64(seed);
        let (k1, k2) = (key as u32, (key >> 32) as u32);
        let threshold = 13_107; // 0.2 * 65,536, rounded
        for (e, &g) in got.iter().enumerate() {
            let bits = hash32(hash32((e / 2) as u32 ^ k1) ^ k2);
            let half = if e % 2 == 0 {
                bits & 0xFFFF
            } else {
                bits >> 16
            };
            let want = if half < threshold { 0.0 } else { 1.25 };
            assert_eq!(g, want, "element {e}");
        }
        // Applied in place, the mask gives what multiplying by it gives, bit for bit.
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut applied = x.clone();
        apply_dropout(&mut applied, p, seed);
        let multiplied: Vec<f32> = x.iter().zip(&got).map(|(a, m)| a * m).collect();
        assert_eq!(applied, multiplied);
    }

    #[test]
    fn the_hash_spreads_neighbouring_indices() {
        // Consecutive pair indices of one key: each of the 32 output bits is set about half
        // the time, and the drop rate over many masks is p.
        let mut ones = [0u32; 32];
        let n = 1 << 16;
        for j in 0..n {
            let h = hash32(hash32(j ^ 0x1234_5678) ^ 0x9abc_def0);
            for (b, c) in ones.iter_mut().enumerate() {
                *c += (h >> b) & 1;
            }
        }
        for (b, &c) in ones.iter().enumerate() {
            let share = c as f64 / n as f64;
            assert!((share - 0.5).abs() < 0.01, "bit {b}: {share}");
        }
        let mut dropped = 0usize;
        let mut total = 0usize;
        for seed in 0..64u64 {
            let m = dropout_mask(&Shape::from(4096), 0.1, seed, &Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            dropped += m.iter().filter(|&&v| v == 0.0).count();
            total += m.len();
        }
        let rate = dropped as f64 / total as f64;
        assert!((rate - 0.1).abs() < 0.003, "drop rate {rate}");
    }

    #[test]
    fn mixed_seeds_depend_on_every_part() {
        let s = mix_seed(&[1, 2, 3]);
        assert_ne!(s, mix_seed(&[1, 2, 4]));
        assert_ne!(s, mix_seed(&[2, 1, 3]));
        assert_eq!(s, mix_seed(&[1, 2, 3]));
    }
}
