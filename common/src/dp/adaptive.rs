//! Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially private learning
//! with adaptive clipping", NeurIPS 2021): the clipping bound follows a target quantile γ of
//! the updates' norms, learnt privately from a noised count of the updates it did not clip.
//!
//! Each round, with bᵢ = 1[‖Δᵢ‖ ≤ C] (unclipped) and m the expected number of clients:
//! b̃ = (Σ bᵢ + N(0, σ_b²)) / m, then C ← C · exp(−η (b̃ − γ)). More than γ of the updates
//! under C means C is too large, so it shrinks (and the other way round). The count is a
//! second Gaussian release on the same sample; to keep the round's overall noise multiplier z,
//! the update gets the larger multiplier z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (the count's sensitivity
//! is ½ once centred, so its multiplier is 2σ_b).

use rand::RngCore;

use super::noise::gaussian;

/// The bound and how it moves.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveClip {
    /// The current bound C.
    pub clip: f64,
    /// γ: the fraction of updates meant to fall under C.
    pub target_quantile: f64,
    /// η: the geometric learning rate.
    pub lr: f64,
}

impl AdaptiveClip {
    /// Moves the bound after a round in which `unclipped` updates were within it, `expected`
    /// (m) clients were expected, and the count is noised with standard deviation
    /// `count_stddev` (σ_b). Returns the noised fraction b̃ (safe to log: it is the released
    /// value, not the true count).
    pub fn update(
        &mut self,
        unclipped: usize,
        expected: f64,
        count_stddev: f64,
        rng: &mut impl RngCore,
    ) -> f64 {
        let noised = (unclipped as f64 + gaussian(count_stddev, rng)) / expected.max(1e-12);
        self.clip *= (-self.lr * (noised - self.target_quantile)).exp();
        noised
    }
}

/// z_Δ, the update's noise multiplier that keeps the round's overall multiplier at `z` when the
/// clipped count is noised with σ_b = `count_stddev`; an error when σ_b is too small for `z`.
pub fn update_noise_multiplier(z: f64, count_stddev: f64) -> Result<f64, String> {
    let twice = 2.0 * count_stddev;
    if twice <= z {
        return Err(format!(
            "adaptive clipping with noise multiplier {z} needs a clipped-count noise above {:.4} (z / 2), this round's is {count_stddev:.4}: raise --dp-clipped-count-stddev (default: expected clients per round / 20, so more clients per round also helps) or lower --dp-noise-multiplier",
            z / 2.0
        ));
    }
    Ok((z.powi(-2) - twice.powi(-2)).powf(-0.5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Runs the bound against a stream of norms uniform in [0, 10) and returns its mean over
    /// the last 100 of 400 rounds.
    fn settle(target_quantile: f64, start: f64) -> f64 {
        let mut rng = StdRng::seed_from_u64(3);
        let m = 100;
        let mut a = AdaptiveClip {
            clip: start,
            target_quantile,
            lr: 0.2,
        };
        let mut tail = Vec::new();
        for round in 0..400 {
            let unclipped = (0..m)
                .filter(|_| rng.random_range(0.0..10.0) <= a.clip)
                .count();
            a.update(unclipped, m as f64, m as f64 / 20.0, &mut rng);
            if round >= 300 {
                tail.push(a.clip);
            }
        }
        tail.iter().sum::<f64>() / tail.len() as f64
    }

    #[test]
    fn the_bound_converges_to_the_target_quantile() {
        // Norms uniform in [0, 10): the γ-quantile is 10γ.
        for (gamma, start) in [(0.5, 0.1), (0.8, 50.0), (0.2, 1.0)] {
            let c = settle(gamma, start);
            let want = 10.0 * gamma;
            assert!(
                (c / want - 1.0).abs() < 0.1,
                "γ = {gamma} from C₀ = {start}: settled at {c}, the quantile is {want}"
            );
        }
    }

    #[test]
    fn too_many_unclipped_updates_shrink_the_bound() {
        let mut a = AdaptiveClip {
            clip: 1.0,
            target_quantile: 0.5,
            lr: 0.2,
        };
        a.update(10, 10.0, 0.0, &mut StdRng::seed_from_u64(1));
        assert!(
            a.clip < 1.0,
            "every update under C, yet C grew to {}",
            a.clip
        );
        a.update(0, 10.0, 0.0, &mut StdRng::seed_from_u64(1));
        a.update(0, 10.0, 0.0, &mut StdRng::seed_from_u64(1));
        assert!(a.clip > 1.0, "every update clipped, yet C is {}", a.clip);
    }

    #[test]
    fn the_update_multiplier_keeps_the_overall_one() {
        let z = 1.0;
        let zd = update_noise_multiplier(z, 5.0).expect("σ_b large enough");
        let overall = (zd.powi(-2) + 10f64.powi(-2)).powf(-0.5);
        assert!((overall - z).abs() < 1e-12);
        assert!(zd > z);
        let err = update_noise_multiplier(1.0, 0.4).expect_err("σ_b too small");
        assert!(err.contains("--dp-clipped-count-stddev"), "{err}");
    }
}
