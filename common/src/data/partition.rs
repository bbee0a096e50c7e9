use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};

/// Splits examples across `clients` non-IID: for each class, the share each client gets is
/// drawn from a symmetric Dirichlet(`alpha`) (small alpha = skewed, large = near IID).
/// Deterministic in `seed`; every example goes to exactly one client, and every client gets at
/// least one example when there are at least as many examples as clients.
pub fn dirichlet_partition(
    labels: &[u8],
    clients: usize,
    alpha: f64,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); clients.max(1)];
    if clients == 0 {
        return out;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let gamma = Gamma::new(alpha.max(1e-3), 1.0).ok();
    let mut classes: std::collections::BTreeMap<u8, Vec<usize>> = Default::default();
    for (i, &l) in labels.iter().enumerate() {
        classes.entry(l).or_default().push(i);
    }
    for (_, mut idx) in classes {
        idx.shuffle(&mut rng);
        let mut shares: Vec<f64> = (0..clients)
            .map(|_| gamma.map_or(1.0, |g| g.sample(&mut rng)))
            .collect();
        let sum: f64 = shares.iter().sum();
        shares
            .iter_mut()
            .for_each(|s| *s /= sum.max(f64::MIN_POSITIVE));
        let mut start = 0;
        let mut cumulative = 0.0;
        for (c, share) in shares.iter().enumerate() {
            cumulative += share;
            let end = if c + 1 == clients {
                idx.len()
            } else {
                ((cumulative * idx.len() as f64).round() as usize).min(idx.len())
            };
            out[c].extend_from_slice(&idx[start..end.max(start)]);
            start = end.max(start);
        }
    }
    // Make sure nobody is empty: move one example from the largest client.
    for c in 0..clients {
        if out[c].is_empty() {
            let largest = (0..clients).max_by_key(|&i| out[i].len()).unwrap_or(0);
            if out[largest].len() > 1 {
                let moved = out[largest].pop();
                out[c].extend(moved);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn covers_every_example_once_and_is_skewed() {
        let labels: Vec<u8> = (0..10_000).map(|i| (i % 10) as u8).collect();
        let parts = super::dirichlet_partition(&labels, 4, 0.3, 1);
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
        assert!(parts.iter().all(|p| !p.is_empty()));
        // Skew: some client's most common class is well above the IID 10%.
        let max_share = parts
            .iter()
            .map(|p| {
                let mut counts = [0usize; 10];
                p.iter().for_each(|&i| counts[labels[i] as usize] += 1);
                *counts.iter().max().unwrap() as f64 / p.len() as f64
            })
            .fold(0.0, f64::max);
        assert!(max_share > 0.2, "{max_share}");
        assert_eq!(parts, super::dirichlet_partition(&labels, 4, 0.3, 1));
    }
}
