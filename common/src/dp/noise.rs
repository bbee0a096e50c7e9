//! Gaussian noise for the DP mechanisms. Production noise comes from the operating system's
//! entropy through a cryptographic generator (`StdRng`, ChaCha12), never from the run's
//! `--seed`: whoever knows the seed could subtract the noise.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A generator for noise: seeded from the operating system.
pub fn noise_rng() -> StdRng {
    StdRng::from_os_rng()
}

/// Adds N(0, σ²) to every value.
pub fn add_gaussian(values: &mut [f32], sigma: f64, rng: &mut impl RngCore) {
    if sigma <= 0.0 {
        return;
    }
    for v in values {
        let n: f64 = StandardNormal.sample(rng);
        *v = (f64::from(*v) + sigma * n) as f32;
    }
}

/// One draw of N(0, σ²).
pub fn gaussian(sigma: f64, rng: &mut impl RngCore) -> f64 {
    let n: f64 = StandardNormal.sample(rng);
    sigma * n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_added_noise_has_the_configured_standard_deviation() {
        let mut rng = StdRng::seed_from_u64(11);
        let n = 200_000;
        for sigma in [0.01, 0.7, 3.0] {
            let mut v = vec![1.0f32; n];
            add_gaussian(&mut v, sigma, &mut rng);
            let mean = v.iter().map(|&x| f64::from(x) - 1.0).sum::<f64>() / n as f64;
            let var = v
                .iter()
                .map(|&x| (f64::from(x) - 1.0 - mean).powi(2))
                .sum::<f64>()
                / (n - 1) as f64;
            let sd = var.sqrt();
            // The sample s.d. of 200k normals is within ±1% of σ with overwhelming probability
            // (its own s.d. is σ/√(2n) ≈ 0.16% of σ); the mean within 5 standard errors of 0.
            assert!(
                (sd / sigma - 1.0).abs() < 0.01,
                "σ = {sigma}: sample s.d. {sd}"
            );
            assert!(
                mean.abs() < 5.0 * sigma / (n as f64).sqrt(),
                "σ = {sigma}: mean {mean}"
            );
        }
    }

    #[test]
    fn zero_sigma_adds_nothing() {
        let mut v = vec![0.5f32; 4];
        add_gaussian(&mut v, 0.0, &mut noise_rng());
        assert_eq!(v, vec![0.5; 4]);
    }
}
