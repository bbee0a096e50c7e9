//! What a new trial tries: a seeded random draw, or a TPE-style choice (the Tree-structured
//! Parzen Estimator of Bergstra et al. 2011, per parameter): the trials seen so far are split
//! into the best quarter and the rest, a kernel density is fitted to each, and of 24 draws from
//! the good density the one most likely under it relative to the bad one is taken. The first
//! trials (until 6 have results) are random, as is each value with probability 0.15 after
//! that: TPE needs something to model, and a choice first seen with bad values of the other
//! keys deserves another try.
//!
//! Every draw comes from a generator seeded with `--seed` and the trial's number, so the same
//! seed and the same results give the same trials: a resumed tuning run draws again exactly
//! what it drew before the crash.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::space::{Assignment, Dist, Param, Space};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplerKind {
    Random,
    Tpe,
}

/// A trial's values and its objective (lower is better).
#[derive(Debug, Clone)]
pub struct Observation {
    pub values: Assignment,
    pub objective: f64,
}

const STARTUP: usize = 6;
/// Each value is drawn from the prior with this probability, so that a choice the first
/// trials happened to pair with bad values of the others is tried again.
const EXPLORE: f64 = 0.15;
const CANDIDATES: usize = 24;
const GOOD_FRACTION: f64 = 0.25;

pub struct Sampler {
    kind: SamplerKind,
    seed: u64,
    space: Space,
}

impl Sampler {
    pub fn new(kind: SamplerKind, seed: u64, space: Space) -> Self {
        Self { kind, seed, space }
    }

    /// The values of trial `trial`, given the results of the trials before it.
    pub fn sample(&self, trial: u64, history: &[Observation]) -> Assignment {
        let mut rng = StdRng::seed_from_u64(self.seed ^ trial.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut seen: Vec<&Observation> =
            history.iter().filter(|o| o.objective.is_finite()).collect();
        seen.sort_by(|a, b| a.objective.total_cmp(&b.objective));
        let tpe = self.kind == SamplerKind::Tpe && seen.len() >= STARTUP;
        let n_good = ((seen.len() as f64 * GOOD_FRACTION).ceil() as usize).max(1);
        let (good, bad) = seen.split_at(n_good.min(seen.len()));
        self.space
            .params
            .iter()
            .map(|p| {
                let v = if tpe && !bad.is_empty() && !rng.random_bool(EXPLORE) {
                    tpe_draw(p, good, bad, &mut rng)
                } else {
                    draw(p, &mut rng)
                };
                (p.key.clone(), v)
            })
            .collect()
    }
}

/// A value from the prior: the distribution as written.
fn draw(p: &Param, rng: &mut StdRng) -> toml::Value {
    match &p.dist {
        Dist::Choice(values) => values[rng.random_range(0..values.len())].clone(),
        dist => {
            let (lo, hi) = bounds(dist);
            number(dist, rng.random_range(lo..=hi))
        }
    }
}

/// The search interval in the space the distribution is uniform in (log for loguniform).
fn bounds(dist: &Dist) -> (f64, f64) {
    match *dist {
        Dist::Uniform { lo, hi, .. } => (lo, hi),
        Dist::LogUniform { lo, hi, .. } => (lo.ln(), hi.ln()),
        Dist::Choice(_) => (0.0, 0.0),
    }
}

/// A point of that space as a settings value.
fn number(dist: &Dist, t: f64) -> toml::Value {
    let (x, integer) = match *dist {
        Dist::Uniform { integer, .. } => (t, integer),
        Dist::LogUniform { integer, .. } => (t.exp(), integer),
        Dist::Choice(_) => (t, false),
    };
    if integer {
        toml::Value::Integer(x.round() as i64)
    } else {
        toml::Value::Float(x)
    }
}

/// An observed value in the distribution's uniform space.
fn point(dist: &Dist, v: &toml::Value) -> Option<f64> {
    let x = match v {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        _ => return None,
    };
    match dist {
        Dist::LogUniform { .. } if x > 0.0 => Some(x.ln()),
        Dist::LogUniform { .. } => None,
        _ => Some(x),
    }
}

fn tpe_draw(
    p: &Param,
    good: &[&Observation],
    bad: &[&Observation],
    rng: &mut StdRng,
) -> toml::Value {
    let values = |obs: &[&Observation]| -> Vec<toml::Value> {
        obs.iter()
            .filter_map(|o| o.values.get(&p.key).cloned())
            .collect()
    };
    let (good, bad) = (values(good), values(bad));
    match &p.dist {
        Dist::Choice(options) => {
            // Counts with one pseudo-observation each, so an option never seen keeps a chance.
            let density = |seen: &[toml::Value], i: usize| {
                let n = seen.iter().filter(|v| **v == options[i]).count() as f64;
                (n + 1.0) / (seen.len() + options.len()) as f64
            };
            let best = (0..CANDIDATES)
                .map(|_| {
                    // A draw from the good density.
                    let mut r = rng.random_range(0.0..1.0);
                    let mut pick = options.len() - 1;
                    for i in 0..options.len() {
                        r -= density(&good, i);
                        if r < 0.0 {
                            pick = i;
                            break;
                        }
                    }
                    pick
                })
                .max_by(|&a, &b| {
                    let score = |i| density(&good, i) / density(&bad, i);
                    score(a).total_cmp(&score(b))
                })
                .unwrap_or(0);
            options[best].clone()
        }
        dist => {
            let (lo, hi) = bounds(dist);
            let pts = |vals: &[toml::Value]| -> Vec<f64> {
                vals.iter().filter_map(|v| point(dist, v)).collect()
            };
            let (g, b) = (pts(&good), pts(&bad));
            let (lg, lb) = (Parzen::new(&g, lo, hi), Parzen::new(&b, lo, hi));
            let best = (0..CANDIDATES)
                .map(|_| lg.draw(rng))
                .max_by(|&x, &y| {
                    let score = |t| lg.log_density(t) - lb.log_density(t);
                    score(x).total_cmp(&score(y))
                })
                .unwrap_or(lo);
            number(dist, best)
        }
    }
}

/// A mixture of Gaussians at the observed points plus the uniform prior over [lo, hi].
struct Parzen<'a> {
    centres: &'a [f64],
    sigma: f64,
    lo: f64,
    hi: f64,
}

impl<'a> Parzen<'a> {
    fn new(centres: &'a [f64], lo: f64, hi: f64) -> Self {
        let range = hi - lo;
        // Scott's rule on the points' spread, kept between 5% and 50% of the range; a quarter
        // of the range for a single point.
        let n = centres.len() as f64;
        let sigma = if centres.len() < 2 {
            range * 0.25
        } else {
            let mean = centres.iter().sum::<f64>() / n;
            let var = centres.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0);
            (1.06 * var.sqrt() * n.powf(-0.2)).clamp(range * 0.05, range * 0.5)
        };
        Self {
            centres,
            sigma,
            lo,
            hi,
        }
    }

    fn draw(&self, rng: &mut StdRng) -> f64 {
        let k = rng.random_range(0..=self.centres.len());
        if k == self.centres.len() {
            return rng.random_range(self.lo..=self.hi);
        }
        // Box–Muller.
        let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        (self.centres[k] + self.sigma * z).clamp(self.lo, self.hi)
    }

    fn log_density(&self, x: f64) -> f64 {
        let weight = 1.0 / (self.centres.len() + 1) as f64;
        let gauss: f64 = self
            .centres
            .iter()
            .map(|c| {
                let z = (x - c) / self.sigma;
                (-0.5 * z * z).exp() / (self.sigma * (std::f64::consts::TAU).sqrt())
            })
            .sum();
        let prior = 1.0 / (self.hi - self.lo);
        (weight * (gauss + prior)).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> Space {
        Space::parse(&[
            "lr=loguniform(1e-4,1e-1)".into(),
            "local_epochs=choice(1,2,4)".into(),
        ])
        .unwrap()
    }

    fn lr(a: &Assignment) -> f64 {
        a["lr"].as_float().unwrap()
    }

    #[test]
    fn the_same_seed_draws_the_same_trials_and_another_seed_others() {
        let a = Sampler::new(SamplerKind::Random, 7, space());
        let b = Sampler::new(SamplerKind::Random, 7, space());
        let c = Sampler::new(SamplerKind::Random, 8, space());
        for t in 0..5 {
            assert_eq!(a.sample(t, &[]), b.sample(t, &[]));
        }
        assert_ne!(a.sample(0, &[]), c.sample(0, &[]));
        for t in 0..50 {
            let v = a.sample(t, &[]);
            assert!((1e-4..=1e-1).contains(&lr(&v)), "{v:?}");
            assert!([1, 2, 4].contains(&v["local_epochs"].as_integer().unwrap()));
        }
    }

    #[test]
    fn tpe_draws_near_the_best_results_seen() {
        // The objective is best at lr = 1e-2 and with 4 epochs.
        let objective = |a: &Assignment| {
            (lr(a).log10() + 2.0).abs()
                + if a["local_epochs"].as_integer() == Some(4) {
                    0.0
                } else {
                    1.0
                }
        };
        let run = |s: &Sampler| {
            let mut history = Vec::new();
            for t in 0..40 {
                let values = s.sample(t, &history);
                history.push(Observation {
                    objective: objective(&values),
                    values,
                });
            }
            // The mean objective of the last 20 trials.
            history[20..].iter().map(|o| o.objective).sum::<f64>() / 20.0
        };
        // Over 5 seeds, so that one lucky or unlucky start decides nothing.
        let mean = |kind| {
            (0..5)
                .map(|seed| run(&Sampler::new(kind, seed, space())))
                .sum::<f64>()
                / 5.0
        };
        let (t, r) = (mean(SamplerKind::Tpe), mean(SamplerKind::Random));
        eprintln!("mean objective of trials 20..40: tpe {t:.3}, random {r:.3}");
        assert!(t < 0.7 * r, "tpe {t:.3}, random {r:.3}");
    }
}
