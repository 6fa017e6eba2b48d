//! Deterministic randomness: SplitMix64 (Steele, Lea and Flood, 2014) and the seed mixing built
//! on its finaliser.
//!
//! Owns: the one small generator every crate draws from where a result must replay bit for bit
//! from a seed (LoRA initialisation, dropout masks, shuffles, train/validation splits, benchmark
//! inputs), and [`mix_seed`], which turns several integers (a run seed, a step, a layer) into one
//! well-spread seed. Must not own: distributions beyond uniform integers and floats, anything that
//! knows what is being seeded.
//!
//! Changing a constant here changes every seeded result of the project (adapters, masks, splits):
//! the tests below pin the sequence.

/// SplitMix64's increment, the odd integer closest to 2^64 / golden ratio.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a bijective mix of a 64-bit value in which every input bit affects
/// every output bit.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes `parts` into one well-spread 64-bit seed (the finaliser per part, folded).
pub fn mix_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0x243F_6A88_85A3_08D3, |acc, &p| {
        mix64(acc ^ mix64(p.wrapping_add(GOLDEN_GAMMA)))
    })
}

/// The SplitMix64 generator: a 64-bit counter advanced by [`GOLDEN_GAMMA`] and finalised.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose first output is `mix64(seed + GOLDEN_GAMMA)`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), by scaling [`Self::next_f64`]: the draw the shuffles of the
    /// data crate have always used, kept so that their orders replay.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_f64() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// Fisher-Yates shuffle of `v`.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_splitmix64s() {
        // Reference values of SplitMix64 seeded with 1234567 (Vigna's splitmix64.c).
        let mut g = SplitMix64::new(1_234_567);
        let got: Vec<u64> = (0..5).map(|_| g.next_u64()).collect();
        assert_eq!(
            got,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423,
                4_593_380_528_125_082_431,
                16_408_922_859_458_223_821
            ]
        );
    }

    #[test]
    fn floats_are_in_the_unit_interval_and_below_stays_below() {
        let mut g = SplitMix64::new(7);
        for _ in 0..10_000 {
            let x = g.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert!(g.below(3) < 3);
        }
    }

    #[test]
    fn mix_seed_depends_on_every_part_and_its_order() {
        let a = mix_seed(&[1, 2, 3]);
        assert_ne!(a, mix_seed(&[1, 2, 4]));
        assert_ne!(a, mix_seed(&[3, 2, 1]));
        assert_ne!(a, mix_seed(&[1, 2]));
        assert_eq!(a, mix_seed(&[1, 2, 3]));
    }

    #[test]
    fn shuffle_is_a_permutation_and_replays() {
        let mut v: Vec<u32> = (0..100).collect();
        SplitMix64::new(3).shuffle(&mut v);
        let mut w: Vec<u32> = (0..100).collect();
        SplitMix64::new(3).shuffle(&mut w);
        assert_eq!(v, w);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}
