//! Which live clients take part in a round. Clients are drawn at random among those that have
//! been selected least often so far, so with n clients and k per round everyone takes part
//! within ⌈n/k⌉ rounds, and the draw is reproducible from the run's seed.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A live client the strategy may select.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    /// Rounds (training or evaluation, as asked) it has been selected for so far.
    pub times_selected: u64,
}

/// ⌈fraction·available⌉, at least `minimum`, at most `available`.
pub fn sample_size(available: usize, fraction: f64, minimum: usize) -> usize {
    (((available as f64) * fraction).ceil() as usize)
        .max(minimum)
        .min(available)
}

/// `count` client ids, least-selected first, ties broken by a draw seeded with `seed`.
pub fn sample(candidates: &[Candidate], count: usize, seed: u64) -> Vec<String> {
    let mut pool: Vec<&Candidate> = candidates.iter().collect();
    pool.shuffle(&mut StdRng::seed_from_u64(seed));
    pool.sort_by_key(|c| c.times_selected);
    let mut ids: Vec<String> = pool.into_iter().take(count).map(|c| c.id.clone()).collect();
    ids.sort_by_key(|id| {
        id.trim_start_matches('c')
            .parse::<u64>()
            .unwrap_or(u64::MAX)
    });
    ids
}

/// Poisson sampling, as the DP accountant assumes: each candidate independently with
/// probability `rate`, so the number drawn varies (possibly none). The draw comes from the
/// thread's cryptographic generator, not the run's seed: amplification by sampling needs the
/// sample to be secret from whoever sees the model.
pub fn poisson(candidates: &[Candidate], rate: f64) -> Vec<String> {
    let mut rng = rand::rng();
    candidates
        .iter()
        .filter(|_| rng.random_bool(rate.clamp(0.0, 1.0)))
        .map(|c| c.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_selected_first_so_everyone_takes_part() {
        let mut counts = vec![0u64; 6];
        for round in 0..4 {
            let cands: Vec<Candidate> = (0..6)
                .map(|i| Candidate {
                    id: format!("c{}", i + 1),
                    times_selected: counts[i],
                })
                .collect();
            let picked = sample(&cands, sample_size(6, 0.5, 1), round);
            assert_eq!(picked.len(), 3);
            for id in picked {
                counts[id[1..].parse::<usize>().unwrap() - 1] += 1;
            }
            if round == 1 {
                assert_eq!(counts, vec![1; 6], "two rounds of 3 must cover all 6");
            }
        }
        assert_eq!(counts, vec![2; 6]);
        assert_eq!(sample_size(7, 0.5, 1), 4);
        assert_eq!(sample_size(7, 0.1, 2), 2);
        assert_eq!(sample_size(1, 0.5, 3), 1);
    }

    #[test]
    fn poisson_sampling_draws_each_client_at_its_rate() {
        let cands: Vec<Candidate> = (0..50)
            .map(|i| Candidate {
                id: format!("c{i}"),
                times_selected: 0,
            })
            .collect();
        let draws = 400;
        let total: usize = (0..draws).map(|_| poisson(&cands, 0.2).len()).sum();
        let mean = total as f64 / draws as f64;
        // Binomial(50, 0.2) per draw: mean 10; the mean of 400 draws has s.d. 0.14.
        assert!((mean - 10.0).abs() < 0.7, "mean draw {mean}, expected 10");
        assert_eq!(poisson(&cands, 1.0).len(), 50);
        assert!(poisson(&cands, 0.0).is_empty());
    }
}
