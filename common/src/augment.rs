//! Image augmentation for local training, off by default: random crop with zero padding,
//! horizontal flip, small Gaussian pixel noise. Deterministic under the training seed.

use rand::Rng;
use rand_distr::{Distribution, Normal};

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Augment {
    /// Pad each side by this many pixels, then crop back to the original size at a random
    /// offset (0 = off).
    pub crop_padding: usize,
    /// Mirror left-right with probability ½.
    pub flip: bool,
    /// Standard deviation of noise added to pixels in [0, 1] (0 = off).
    pub noise_std: f32,
}

impl Augment {
    pub fn is_off(&self) -> bool {
        self.crop_padding == 0 && !self.flip && self.noise_std <= 0.0
    }

    /// One image (`rows × cols` bytes) as pixels in [0, 1], augmented.
    pub fn apply(&self, image: &[u8], rows: usize, cols: usize, rng: &mut impl Rng) -> Vec<f32> {
        let p = self.crop_padding as i64;
        let (dy, dx) = if p > 0 {
            (
                rng.random_range(-p..=p) as isize,
                rng.random_range(-p..=p) as isize,
            )
        } else {
            (0, 0)
        };
        let flip = self.flip && rng.random_bool(0.5);
        let noise = (self.noise_std > 0.0)
            .then(|| Normal::new(0.0f32, self.noise_std).ok())
            .flatten();
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows as isize {
            for c in 0..cols as isize {
                let c = if flip { cols as isize - 1 - c } else { c };
                let (sr, sc) = (r + dy, c + dx);
                let v = if sr >= 0 && sc >= 0 && (sr as usize) < rows && (sc as usize) < cols {
                    f32::from(image[sr as usize * cols + sc as usize]) / 255.0
                } else {
                    0.0
                };
                out.push(match &noise {
                    Some(n) => v + n.sample(rng),
                    None => v,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn off_is_identity_and_on_is_deterministic_under_a_seed() {
        let image: Vec<u8> = (0..16).map(|i| i * 10).collect();
        let plain = Augment::default().apply(&image, 4, 4, &mut StdRng::seed_from_u64(1));
        assert_eq!(
            plain,
            image
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect::<Vec<_>>()
        );
        let aug = Augment {
            crop_padding: 1,
            flip: true,
            noise_std: 0.05,
        };
        let a = aug.apply(&image, 4, 4, &mut StdRng::seed_from_u64(7));
        let b = aug.apply(&image, 4, 4, &mut StdRng::seed_from_u64(7));
        assert_eq!(a, b, "the same seed gives the same augmentation");
        let c = aug.apply(&image, 4, 4, &mut StdRng::seed_from_u64(8));
        assert_ne!(a, c);
        // A flip alone mirrors each row.
        let flip = Augment {
            flip: true,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(0);
        let flipped = (0..8)
            .map(|_| flip.apply(&image, 4, 4, &mut rng))
            .find(|v| v != &plain)
            .expect("a flip within 8 draws");
        assert_eq!(flipped[0], plain[3]);
        assert_eq!(flipped[4], plain[7]);
    }
}
