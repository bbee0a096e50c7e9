//! Successive halving with rounds as the resource (Jamieson & Talwalkar 2016; the synchronous
//! form of ASHA, Li et al. 2020): every trial trains `min_rounds` rounds, the best 1/η of them
//! go on to η times as many rounds, and so on up to `max_rounds`. Trials run one after another
//! on the same clients, so nothing would be gained by promoting asynchronously: each rung is
//! decided once all its trials are in.

use anyhow::bail;

#[derive(Debug, Clone, PartialEq)]
pub struct Halving {
    /// Rounds trained by the end of each rung: r₀, r₀η, r₀η², ..., then `max_rounds`.
    pub budgets: Vec<u64>,
    pub eta: u64,
}

impl Halving {
    pub fn new(min_rounds: u64, max_rounds: u64, eta: u64) -> anyhow::Result<Self> {
        if min_rounds == 0 {
            bail!("--min-rounds must be at least 1");
        }
        if max_rounds < min_rounds {
            bail!("--max-rounds ({max_rounds}) must be at least --min-rounds ({min_rounds})");
        }
        if eta < 2 {
            bail!("--eta must be at least 2 (the fraction 1/η of trials kept at each rung)");
        }
        let mut budgets = vec![min_rounds];
        while let Some(&last) = budgets.last()
            && last < max_rounds
        {
            budgets.push(last.saturating_mul(eta).min(max_rounds));
        }
        Ok(Self { budgets, eta })
    }

    /// How many of `n` trials go on from a rung: ⌈n/η⌉, at least one.
    pub fn keep(&self, n: usize) -> usize {
        n.div_ceil(self.eta as usize).max(1)
    }

    /// Federated evaluation every this many rounds measures every rung's end.
    pub fn evaluate_every(&self) -> u64 {
        self.budgets.iter().fold(0, |g, &b| gcd(g, b))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The `keep` best trials of a rung by score (lower is better: [`super::objective`]; a trial
/// that diverged or failed scores infinity and is last), ties to the earlier trial.
pub fn promote(scores: &[(u64, f64)], keep: usize) -> Vec<u64> {
    let mut ranked: Vec<(u64, f64)> = scores
        .iter()
        .map(|&(t, s)| (t, if s.is_nan() { f64::INFINITY } else { s }))
        .collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    ranked.into_iter().take(keep).map(|(t, _)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_grow_by_eta_up_to_the_maximum() {
        let cases = [
            ((1, 9, 3), vec![1, 3, 9]),
            ((1, 10, 3), vec![1, 3, 9, 10]),
            ((2, 8, 2), vec![2, 4, 8]),
            ((3, 3, 3), vec![3]),
        ];
        for ((lo, hi, eta), want) in cases {
            assert_eq!(
                Halving::new(lo, hi, eta).unwrap().budgets,
                want,
                "{lo} {hi} {eta}"
            );
        }
        assert_eq!(Halving::new(2, 8, 2).unwrap().evaluate_every(), 2);
        assert_eq!(Halving::new(1, 10, 3).unwrap().evaluate_every(), 1);
        assert_eq!(Halving::new(1, 9, 3).unwrap().keep(8), 3);
        assert!(Halving::new(4, 2, 3).is_err() && Halving::new(1, 2, 1).is_err());
    }

    #[test]
    fn the_best_go_on_and_a_failed_trial_never_does() {
        let results = [
            (0, 0.9),
            (1, f64::INFINITY),
            (2, 0.3),
            (3, 0.3),
            (4, f64::NAN),
        ];
        assert_eq!(promote(&results, 2), vec![2, 3]);
        assert_eq!(promote(&results, 4), vec![2, 3, 0, 1]);
    }
}
