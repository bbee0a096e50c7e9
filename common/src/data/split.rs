use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// Splits `0..n` into (train, validation) indices, deterministically in `seed`. The validation
/// part holds `round(n * fraction)` examples, at least one when `fraction > 0` and `n > 1`, and
/// never all of them.
pub fn validation_split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut val = ((n as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
    if fraction > 0.0 && n > 1 {
        val = val.clamp(1, n - 1);
    } else {
        val = val.min(n.saturating_sub(1));
    }
    let train = idx.split_off(val);
    (train, idx)
}

#[cfg(test)]
mod tests {
    #[test]
    fn deterministic_and_disjoint() {
        let (t1, v1) = super::validation_split(100, 0.1, 7);
        let (t2, v2) = super::validation_split(100, 0.1, 7);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_eq!(v1.len(), 10);
        assert!(v1.iter().all(|i| !t1.contains(i)));
        let (_, v3) = super::validation_split(100, 0.1, 8);
        assert_ne!(v1, v3);
    }
}
