//! Differential privacy: the pieces both sides use.
//!
//! - [`clip`]: L2 clipping of an update (flat, over all its tensors).
//! - [`noise`]: Gaussian noise from a cryptographic generator seeded by the operating system.
//! - [`adaptive`]: adaptive clipping towards a quantile of the update norms (Andrew et al.).
//! - [`rdp`]: the accountant: RDP of the subsampled Gaussian mechanism, (ε, δ).
//!
//! The coordinator's `strategy::dp` wraps a strategy with these (central DP); the client uses
//! [`privatize`] for local DP.

pub mod adaptive;
pub mod clip;
pub mod noise;
pub mod rdp;

use crate::tensors::TensorSet;

/// Local DP on one update: clip it to L2 norm `clip`, then add N(0, `sigma`²) to every value.
/// Returns the norm before clipping.
pub fn privatize(update: &mut TensorSet, clip: f64, sigma: f64) -> f64 {
    let mut parts: Vec<&mut [f32]> = update.values_mut().map(|(_, v)| v).collect();
    let norm = clip::clip_in_place(&mut parts, clip);
    let mut rng = noise::noise_rng();
    for p in parts {
        noise::add_gaussian(p, sigma, &mut rng);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::NamedTensor;

    #[test]
    fn privatize_clips_then_adds_noise_of_the_asked_size() {
        let big: Vec<f32> = (0..40_000).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
        let mut update = TensorSet::new(vec![
            NamedTensor::new("a", vec![40_000], big).unwrap(),
            NamedTensor::new("b", vec![2], vec![3.0, 4.0]).unwrap(),
        ])
        .unwrap();
        let before = clip::l2_norm(update.tensors().iter().map(|t| t.data.as_slice()));
        let norm = privatize(&mut update, 1.0, 0.01);
        assert!((norm - before).abs() < 1e-9 * before);
        // ‖clip(Δ) + noise‖² ≈ 1 + n·σ² = 1 + 40002·1e-4 ≈ 5.0
        let after = clip::l2_norm(update.tensors().iter().map(|t| t.data.as_slice()));
        let want = (1.0f64 + 40_002.0 * 1e-4).sqrt();
        assert!(
            (after / want - 1.0).abs() < 0.02,
            "norm after {after}, want ≈ {want}"
        );
    }
}
