//! L2 clipping of an update: Δ · min(1, C / ‖Δ‖), over all its tensors at once (a flat clip),
//! so the whole update's norm is at most C.

/// The L2 norm of values, accumulated in f64.
pub fn l2_norm<'a>(parts: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    parts
        .into_iter()
        .flat_map(|p| p.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// The factor that brings an update of norm `norm` within `clip`: 1 when it already is (an
/// unchanged model, norm 0, is left alone rather than divided by zero).
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if norm > clip && norm > 0.0 {
        clip / norm
    } else {
        1.0
    }
}

/// Clips `parts` (one update) in place to L2 norm `clip`; returns the norm before clipping.
pub fn clip_in_place(parts: &mut [&mut [f32]], clip: f64) -> f64 {
    let norm = l2_norm(parts.iter().map(|p| &**p));
    let factor = clip_factor(norm, clip);
    if factor < 1.0 {
        // Rounding can leave the product a hair above `clip`; shave the factor so the bound
        // holds in f32 too.
        let f = (factor * (1.0 - 1e-6)) as f32;
        for p in parts.iter_mut() {
            p.iter_mut().for_each(|v| *v *= f);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn every_clipped_update_is_within_the_bound() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let scale = 10f32.powf(rng.random_range(-4.0..4.0));
            let mut a: Vec<f32> = (0..rng.random_range(1..500))
                .map(|_| rng.random_range(-1.0..1.0) * scale)
                .collect();
            let mut b: Vec<f32> = (0..rng.random_range(1..50))
                .map(|_| rng.random_range(-1.0..1.0) * scale)
                .collect();
            let clip = 10f64.powf(rng.random_range(-2.0..2.0));
            let before = l2_norm([a.as_slice(), b.as_slice()]);
            let reported = clip_in_place(&mut [a.as_mut_slice(), b.as_mut_slice()], clip);
            let after = l2_norm([a.as_slice(), b.as_slice()]);
            assert!((reported - before).abs() <= 1e-9 * before.max(1.0));
            assert!(after <= clip, "norm {after} above the bound {clip}");
            if before <= clip {
                assert_eq!(after, before, "an update within the bound was changed");
            }
        }
    }

    #[test]
    fn an_unchanged_model_is_left_alone() {
        let mut zero = vec![0.0f32; 10];
        assert_eq!(clip_in_place(&mut [zero.as_mut_slice()], 1.0), 0.0);
        assert!(zero.iter().all(|v| *v == 0.0));
        assert_eq!(clip_factor(0.0, 0.5), 1.0);
    }
}
