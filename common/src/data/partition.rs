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

/// Few-shot splits: each client gets `shots` examples of every class in `labels`, drawn at
/// random without replacement (no example goes to two clients). Deterministic in `seed`.
/// Fails, naming the class, when a class has fewer than `clients × shots` examples.
pub fn shots_partition(
    labels: &[u8],
    clients: usize,
    shots: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut classes: std::collections::BTreeMap<u8, Vec<usize>> = Default::default();
    for (i, &l) in labels.iter().enumerate() {
        classes.entry(l).or_default().push(i);
    }
    let mut out = vec![Vec::with_capacity(shots * classes.len()); clients];
    for (class, mut idx) in classes {
        let needed = clients * shots;
        if idx.len() < needed {
            return Err(format!(
                "class {class} has {} examples; {clients} clients x {shots} shots need {needed}",
                idx.len()
            ));
        }
        idx.shuffle(&mut rng);
        for (c, part) in out.iter_mut().enumerate() {
            part.extend_from_slice(&idx[c * shots..(c + 1) * shots]);
        }
    }
    for part in &mut out {
        part.sort_unstable();
    }
    Ok(out)
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

    #[test]
    fn shots_give_every_client_k_of_each_class_and_no_example_twice() {
        let labels: Vec<u8> = (0..300).map(|i| (i % 3) as u8).collect();
        let parts = super::shots_partition(&labels, 4, 5, 9).unwrap();
        let mut seen = std::collections::HashSet::new();
        for part in &parts {
            for class in 0..3u8 {
                assert_eq!(part.iter().filter(|&&i| labels[i] == class).count(), 5);
            }
            assert!(part.iter().all(|i| seen.insert(*i)));
        }
        assert_eq!(parts, super::shots_partition(&labels, 4, 5, 9).unwrap());
        let e = super::shots_partition(&labels, 4, 30, 9).unwrap_err();
        assert!(
            e.contains("class 0 has 100") && e.contains("need 120"),
            "{e}"
        );
    }
}
