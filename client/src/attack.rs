//! `--simulate-attack`: a **test tool** for robustness experiments. It makes this client a
//! Byzantine participant by tampering with every update it sends; never use it in production.
//!
//! - `sign-flip`: sends −Δ;
//! - `scale:K`: sends K·Δ (e.g. `scale:100`, a model-replacement style attack);
//! - `noise:SIGMA`: sends Δ + N(0, σ²) per value.

use std::fmt;
use std::str::FromStr;

use fedtune_common::tensors::TensorSet;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    SignFlip,
    Scale(f32),
    Noise(f32),
}

impl FromStr for Attack {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |v: &str, what: &str| {
            v.parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("`{s}`: {what} must be a finite number, got `{v}`"))
        };
        match s.split_once(':') {
            None if s == "sign-flip" => Ok(Self::SignFlip),
            Some(("scale", k)) => number(k, "K").map(Self::Scale),
            Some(("noise", sigma)) => {
                let sigma = number(sigma, "SIGMA")?;
                if sigma <= 0.0 {
                    return Err(format!("`{s}`: SIGMA must be positive"));
                }
                Ok(Self::Noise(sigma))
            }
            _ => Err(format!(
                "unknown attack `{s}`: use sign-flip, scale:K or noise:SIGMA"
            )),
        }
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SignFlip => write!(f, "sign-flip"),
            Self::Scale(k) => write!(f, "scale:{k}"),
            Self::Noise(s) => write!(f, "noise:{s}"),
        }
    }
}

impl Attack {
    /// Tampers with `delta` in place; the noise is drawn from `seed`.
    pub fn apply(&self, delta: &mut TensorSet, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xA77AC4);
        for (_, values) in delta.values_mut() {
            match *self {
                Self::SignFlip => values.iter_mut().for_each(|v| *v = -*v),
                Self::Scale(k) => values.iter_mut().for_each(|v| *v *= k),
                Self::Noise(sigma) => {
                    // `sigma` was checked positive and finite when parsed.
                    if let Ok(normal) = Normal::new(0.0f32, sigma) {
                        values
                            .iter_mut()
                            .for_each(|v| *v += normal.sample(&mut rng));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_common::tensors::NamedTensor;

    fn set() -> TensorSet {
        TensorSet::new(vec![
            NamedTensor::new("w", vec![3], vec![1.0, -2.0, 0.5]).unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn attacks_parse_and_tamper() {
        let mut d = set();
        "sign-flip".parse::<Attack>().unwrap().apply(&mut d, 0);
        assert_eq!(d.get("w").unwrap().data, vec![-1.0, 2.0, -0.5]);
        let mut d = set();
        "scale:100".parse::<Attack>().unwrap().apply(&mut d, 0);
        assert_eq!(d.get("w").unwrap().data, vec![100.0, -200.0, 50.0]);
        let (mut a, mut b) = (set(), set());
        let noise: Attack = "noise:0.1".parse().unwrap();
        noise.apply(&mut a, 7);
        noise.apply(&mut b, 7);
        assert_eq!(a, b, "the same seed draws the same noise");
        assert_ne!(a, set());
        for bad in ["scale:x", "noise:-1", "flip", "scale:inf"] {
            assert!(bad.parse::<Attack>().is_err(), "{bad}");
        }
    }
}
