//! Fixed-point quantisation of clipped update values into Z_(2³²), where secure aggregation's
//! masks live: x ∈ [−c, c] ↦ q = ⌊(x + c)·Q/(2c) + u⌋ with u uniform in [0, 1) (stochastic
//! rounding: unbiased, error below one step 2c/Q). Values outside [−c, c] are clipped first,
//! and the clipping is counted so the caller can say so (silent clipping by a quantiser is a
//! known trap of other systems).
//!
//! A sum of n quantised values is at most n·Q, so it cannot wrap around 2³² while n·Q < 2³²
//! ([`Quantizer::max_summands`]); then Σq·(2c/Q) − n·c recovers Σx within n·2c/Q per value.

use rand::{Rng, RngCore};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    /// c: values are clipped to [−c, c].
    pub clip: f64,
    /// log₂ Q: the number of quantisation steps across [−c, c].
    pub bits: u32,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    #[error("quantisation with {bits} bits leaves no room for a sum in 32 bits: use 1 to 30 bits")]
    Bits { bits: u32 },
    #[error("the clipping range must be a positive number, got {0}")]
    Clip(f64),
    #[error(
        "{clients} clients with {bits}-bit quantisation could overflow the 32-bit sum (at most {max}): lower the quantisation bits or the clients per round"
    )]
    TooManyClients { clients: usize, bits: u32, max: u64 },
}

impl Quantizer {
    pub fn new(clip: f64, bits: u32) -> Result<Self, QuantizeError> {
        if !(1..=30).contains(&bits) {
            return Err(QuantizeError::Bits { bits });
        }
        if !(clip.is_finite() && clip > 0.0) {
            return Err(QuantizeError::Clip(clip));
        }
        Ok(Self { clip, bits })
    }

    fn levels(&self) -> f64 {
        (1u64 << self.bits) as f64
    }

    /// One step 2c/Q: the largest error of one quantised value.
    pub fn step(&self) -> f64 {
        2.0 * self.clip / self.levels()
    }

    /// The most values a sum can hold without wrapping around 2³².
    pub fn max_summands(&self) -> u64 {
        (u64::from(u32::MAX)) / (1u64 << self.bits)
    }

    /// Checks that `clients` quantised updates can be summed.
    pub fn check_clients(&self, clients: usize) -> Result<(), QuantizeError> {
        let max = self.max_summands();
        if clients as u64 > max {
            return Err(QuantizeError::TooManyClients {
                clients,
                bits: self.bits,
                max,
            });
        }
        Ok(())
    }

    /// Quantises `values` into `out` (appended); returns how many were clipped.
    pub fn quantize(&self, values: &[f32], out: &mut Vec<u32>, rng: &mut impl RngCore) -> usize {
        let scale = self.levels() / (2.0 * self.clip);
        let mut clipped = 0;
        out.reserve(values.len());
        for &v in values {
            let mut x = f64::from(v);
            if x.abs() > self.clip || !x.is_finite() {
                clipped += 1;
                x = if x.is_nan() {
                    0.0
                } else {
                    x.clamp(-self.clip, self.clip)
                };
            }
            let q = ((x + self.clip) * scale + rng.random::<f64>()).floor();
            out.push(q.clamp(0.0, self.levels()) as u32);
        }
        clipped
    }

    /// Σx from the sum (mod 2³²) of `summands` quantised values.
    pub fn dequantize_sum(&self, sum: u32, summands: usize) -> f64 {
        f64::from(sum) * self.step() - summands as f64 * self.clip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn a_sum_of_quantised_values_is_within_n_steps_of_the_true_sum() {
        let mut rng = StdRng::seed_from_u64(4);
        let q = Quantizer::new(0.5, 20).unwrap();
        let n = 10;
        let len = 5_000;
        let updates: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..len).map(|_| rng.random_range(-0.5f32..0.5)).collect())
            .collect();
        let mut sums = vec![0u32; len];
        for u in &updates {
            let mut words = Vec::new();
            assert_eq!(q.quantize(u, &mut words, &mut rng), 0);
            for (s, w) in sums.iter_mut().zip(words) {
                *s = s.wrapping_add(w);
            }
        }
        let bound = n as f64 * q.step();
        for (i, &s) in sums.iter().enumerate() {
            let truth: f64 = updates.iter().map(|u| f64::from(u[i])).sum();
            let got = q.dequantize_sum(s, n);
            assert!(
                (got - truth).abs() <= bound,
                "{i}: {got} vs {truth}, bound {bound}"
            );
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let mut rng = StdRng::seed_from_u64(5);
        let q = Quantizer::new(1.0, 4).unwrap(); // coarse: step 0.125
        let x = 0.3f32; // between two levels
        let mut words = Vec::new();
        q.quantize(&vec![x; 100_000], &mut words, &mut rng);
        let mean = words.iter().map(|&w| q.dequantize_sum(w, 1)).sum::<f64>() / 1e5;
        assert!((mean - 0.3).abs() < 0.002, "mean {mean}");
    }

    #[test]
    fn out_of_range_values_are_clipped_and_counted() {
        let q = Quantizer::new(1.0, 8).unwrap();
        let mut words = Vec::new();
        let clipped = q.quantize(
            &[5.0, -7.0, f32::NAN, 0.0],
            &mut words,
            &mut StdRng::seed_from_u64(6),
        );
        assert_eq!(clipped, 3);
        assert!(q.dequantize_sum(words[0], 1) > 0.99);
        assert!(q.dequantize_sum(words[1], 1) < -0.99);
    }

    #[test]
    fn the_client_count_is_bounded_by_the_modulus() {
        let q = Quantizer::new(1.0, 20).unwrap();
        assert_eq!(q.max_summands(), 4095);
        assert!(q.check_clients(4095).is_ok());
        assert!(matches!(
            q.check_clients(4096),
            Err(QuantizeError::TooManyClients { .. })
        ));
        assert!(Quantizer::new(1.0, 31).is_err());
        assert!(Quantizer::new(0.0, 8).is_err());
    }
}
