//! Reproducible dropout masks for LoRA inputs.
//!
//! A mask is a pure function of a seed, so that the same training step draws the same masks
//! when it is run again: a layer recomputed in the backward of gradient checkpointing must see
//! the forward's masks, and a run resumed from a checkpoint must see the masks the interrupted
//! run would have drawn. candle's CPU generator cannot be seeded, so on the CPU the masks come
//! from our own counter-based generator; on an accelerator the device generator is re-seeded
//! per mask (drawing there avoids moving a mask of activation size over the bus).

use candle_core::{DType, Device, Shape, Tensor};
use rayon::prelude::*;

use teamtune_seed::{mix64, GOLDEN_GAMMA};

use crate::error::Result;

/// Mixes several integers into one seed (re-exported from `teamtune-seed`, its one home).
pub use teamtune_seed::mix_seed;

/// The inverted-dropout multiplier for `shape`: each element is `0` with probability `p`,
/// else `1 / (1 - p)` (PyTorch's convention), as f32 on `device`.
pub fn dropout_mask(shape: &Shape, p: f32, seed: u64, device: &Device) -> Result<Tensor> {
    let keep_scale = 1.0 / (1.0 - p);
    if device.is_cpu() {
        // Element pair i takes the bits of mix64(seed + i * gamma): independent of the order in
        // which elements are produced, so the mask is filled in parallel chunks.
        let threshold = (p as f64 * 4_294_967_296.0) as u64;
        let n = shape.elem_count();
        let mut data = vec![0f32; n];
        const PAIRS: usize = 1 << 13;
        data.par_chunks_mut(2 * PAIRS)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, pair) in chunk.chunks_mut(2).enumerate() {
                    let i = (c * PAIRS + j) as u64;
                    let bits = mix64(seed.wrapping_add(i.wrapping_mul(GOLDEN_GAMMA)));
                    for (slot, half) in pair.iter_mut().zip([bits & 0xFFFF_FFFF, bits >> 32]) {
                        *slot = if half < threshold { 0.0 } else { keep_scale };
                    }
                }
            });
        return Ok(Tensor::from_vec(data, shape, device)?);
    }
    device.set_seed(seed)?;
    let u = Tensor::rand(0f32, 1f32, shape, device)?;
    Ok((u.ge(p as f64)?.to_dtype(DType::F32)? * keep_scale as f64)?)
}

/// `x * mask` with a mask drawn from `seed` (see [`dropout_mask`]); `x` must be f32.
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
        // Longer than one chunk and odd: element pair i is mix64(seed + i * gamma) wherever
        // the chunks fall.
        let n = 3 * (1 << 14) + 5;
        let (p, seed) = (0.2f32, 11u64);
        let got = dropout_mask(&Shape::from(n), p, seed, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let threshold = (p as f64 * 4_294_967_296.0) as u64;
        for (e, &g) in got.iter().enumerate() {
            let bits = mix64(seed.wrapping_add((e as u64 / 2).wrapping_mul(GOLDEN_GAMMA)));
            let half = if e % 2 == 0 {
                bits & 0xFFFF_FFFF
            } else {
                bits >> 32
            };
            let want = if half < threshold { 0.0 } else { 1.25 };
            assert_eq!(g, want, "element {e}");
        }
    }

    #[test]
    fn mixed_seeds_depend_on_every_part() {
        let s = mix_seed(&[1, 2, 3]);
        assert_ne!(s, mix_seed(&[1, 2, 4]));
        assert_ne!(s, mix_seed(&[2, 1, 3]));
        assert_eq!(s, mix_seed(&[1, 2, 3]));
    }
}
