//! Masks: a 32-byte seed expanded by ChaCha20 into one u32 word per value of the update, added
//! (or subtracted) modulo 2³². Seeds are full length and come from X25519 + HKDF or from the
//! operating system's entropy, never folded to fewer bits.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Adds the mask expanded from `seed` to `words` (mod 2³²), or subtracts it when `negate`.
pub fn apply(words: &mut [u32], seed: &[u8; 32], negate: bool) {
    let mut prg = ChaCha20Rng::from_seed(*seed);
    if negate {
        words
            .iter_mut()
            .for_each(|w| *w = w.wrapping_sub(prg.next_u32()));
    } else {
        words
            .iter_mut()
            .for_each(|w| *w = w.wrapping_add(prg.next_u32()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_and_its_negation_cancel() {
        let mut words: Vec<u32> = (0..1000).collect();
        let seed = [7u8; 32];
        apply(&mut words, &seed, false);
        assert_ne!(words, (0..1000).collect::<Vec<u32>>());
        apply(&mut words, &seed, true);
        assert_eq!(words, (0..1000).collect::<Vec<u32>>());
    }
}
