//! Differential privacy as a wrapper around a linear strategy, like Flower's DP strategies: the
//! inner strategy keeps its server step (FedAvg, FedAvgM, FedAdam, ...), the wrapper decides who
//! trains, how updates are combined and what the run has spent.
//!
//! **Central DP (DP-FedAvg, McMahan et al. 2018).** Clients are Poisson-sampled with rate q
//! (`--fraction-fit`); the coordinator clips each update to L2 norm C, sums them, adds
//! N(0, (z·C)²) to the sum and divides by the *expected* number of clients m = q·N, not by the
//! number that replied (so one client moves the result by at most C/m whatever the others do).
//! Updates weigh equally: weighting by examples would let a client with many examples move the
//! mean by more than C/m. A round counts whatever the draw gave, even no client (then the step
//! is noise alone), because that is the mechanism the accountant accounts for. With
//! `--dp-clip adaptive` the bound follows a quantile of the norms ([`AdaptiveClip`]).
//!
//! **Local DP.** Each client clips its own update to C and adds N(0, (z·C)²) before upload
//! ([`fedtune_common::dp::privatize`]); the coordinator sees only noised updates, and the inner
//! strategy combines them as usual (post-processing). Each upload is one release of the Gaussian
//! mechanism without sampling (the coordinator knows who was selected), counted per training
//! attempt, for a client taking part in every one (the others spent less).
//!
//! ε is (ε, δ)-DP at the client level: it bounds what the released models say about whether one
//! client's data took part at all.

use std::sync::{Arc, Mutex};

use fedtune_common::dp::adaptive::{AdaptiveClip, update_noise_multiplier};
use fedtune_common::dp::noise::noise_rng;
use fedtune_common::dp::rdp::Accountant;
use fedtune_common::tensors::{NamedTensor, TensorError, TensorSet};
use rand::rngs::StdRng;
use serde::Serialize;

use super::clipped_sum::{ClippedSum, Tally};
use super::layout::Layout;
use super::{
    Aggregator, Candidate, EndRun, EvalReport, EvalSummary, FitPlan, LocalDp, Strategy, sampling,
};

/// Where clipping and noise happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpMode {
    Central,
    Local,
}

impl DpMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Central => "central",
            Self::Local => "local",
        }
    }
}

/// The clipping bound: fixed, or adaptive (central DP only).
#[derive(Debug, Clone, PartialEq)]
pub enum ClipRule {
    Fixed(f64),
    Adaptive {
        initial: f64,
        target_quantile: f64,
        lr: f64,
        /// σ_b of the noised count; `None`: m / 20 each round.
        count_stddev: Option<f64>,
    },
}

/// `--dp*` settings, validated by the config.
#[derive(Debug, Clone, PartialEq)]
pub struct DpSettings {
    pub mode: DpMode,
    pub clip: ClipRule,
    /// z: noise standard deviation over the clipping bound (overall, with adaptive clipping).
    pub noise_multiplier: f64,
    /// q: each live client takes part in a round with this probability (central DP).
    pub sample_rate: f64,
    /// δ; `None`: [`default_delta`] of the clients live when the first round opens.
    pub delta: Option<f64>,
    /// The run ends before a round would take ε above this.
    pub max_epsilon: Option<f64>,
}

/// δ when none is given: 1/N² for N clients (below 1/N, as a meaningful δ must be), but never
/// above 1e-5, which small federations would otherwise far exceed (1/16 with 4 clients).
pub fn default_delta(clients: usize) -> f64 {
    (1.0 / (clients.max(1) as f64).powi(2)).min(1e-5)
}

/// What the run has spent, after a round: in the round line and metrics.jsonl.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrivacyStatus {
    pub mode: &'static str,
    /// ε of everything released so far, at `delta`; `order` is the RDP order that gave it.
    pub epsilon: f64,
    pub delta: f64,
    pub order: u32,
    /// Releases counted by the accountant (rounds, or training attempts under local DP).
    pub releases: u64,
    /// z, and z_Δ the update's own multiplier (larger under adaptive clipping).
    pub noise_multiplier: f64,
    pub update_noise_multiplier: f64,
    /// q, and (central) m = q·N this round.
    pub sample_rate: f64,
    pub expected_clients: Option<f64>,
    /// The bound this round used, and the next round's (adaptive clipping).
    pub clip: f64,
    pub next_clip: Option<f64>,
    /// Standard deviation of the noise on the combined update (central: z_Δ·C/m; local: on
    /// each client's update, z·C).
    pub noise_stddev: f64,
    /// Adaptive clipping: the noised fraction of updates within the bound (the released value,
    /// not the true count).
    pub unclipped_fraction: Option<f64>,
}

/// This round's plan, fixed in `begin_round`.
#[derive(Debug, Clone, Copy)]
struct RoundPlan {
    expected: f64,
    count_stddev: f64,
    update_z: f64,
}

/// A linear strategy with differential privacy.
pub struct Private {
    inner: Box<dyn Strategy>,
    s: DpSettings,
    layout: Arc<Layout>,
    adaptive: Option<AdaptiveClip>,
    /// C for a fixed bound; the adaptive bound lives in `adaptive`.
    fixed_clip: f64,
    accountant: Accountant,
    delta: Option<f64>,
    plan: Option<RoundPlan>,
    tally: Arc<Mutex<Tally>>,
    status: Option<PrivacyStatus>,
    /// Noise of the clipped count (adaptive clipping).
    rng: StdRng,
    /// Tests only: noise from a fixed seed instead of the operating system.
    noise_seed: Option<u64>,
}

const STATE_RDP: &str = "dp.rdp";
const STATE_CLIP: &str = "dp.clip";
const STATE_DELTA: &str = "dp.delta";
const STATE_RELEASES: &str = "dp.releases";

impl Private {
    pub fn new(inner: Box<dyn Strategy>, s: DpSettings, layout: Arc<Layout>) -> Self {
        let (adaptive, fixed_clip) = match &s.clip {
            ClipRule::Fixed(c) => (None, *c),
            ClipRule::Adaptive {
                initial,
                target_quantile,
                lr,
                ..
            } => (
                Some(AdaptiveClip {
                    clip: *initial,
                    target_quantile: *target_quantile,
                    lr: *lr,
                }),
                *initial,
            ),
        };
        Self {
            inner,
            delta: s.delta,
            s,
            layout,
            adaptive,
            fixed_clip,
            accountant: Accountant::default(),
            plan: None,
            tally: Arc::default(),
            status: None,
            rng: noise_rng(),
            noise_seed: None,
        }
    }

    /// Noise from a fixed seed (tests of the noise's statistics).
    #[cfg(test)]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = rand::SeedableRng::seed_from_u64(seed);
        self.noise_seed = Some(seed);
        self
    }

    fn clip(&self) -> f64 {
        self.adaptive.as_ref().map_or(self.fixed_clip, |a| a.clip)
    }

    /// This round's plan; without one (the engine always begins a round first) the most
    /// cautious: m = 1, the noise of a single client's release, no count released.
    fn plan_or_cautious(&self) -> RoundPlan {
        self.plan.unwrap_or(RoundPlan {
            expected: 1.0,
            count_stddev: 0.0,
            update_z: self.s.noise_multiplier,
        })
    }

    /// q and z of one release as the accountant sees it.
    fn mechanism(&self) -> (f64, f64) {
        match self.s.mode {
            DpMode::Central => (self.s.sample_rate, self.s.noise_multiplier),
            DpMode::Local => (1.0, self.s.noise_multiplier),
        }
    }

    fn record(&mut self, plan: RoundPlan, clip: f64, unclipped_fraction: Option<f64>) {
        let delta = self.delta.unwrap_or(1e-5);
        let spent = self.accountant.spent(delta);
        let (q, z) = self.mechanism();
        self.status = Some(PrivacyStatus {
            mode: self.s.mode.name(),
            epsilon: spent.epsilon,
            delta,
            order: spent.order,
            releases: self.accountant.rounds(),
            noise_multiplier: z,
            update_noise_multiplier: plan.update_z,
            sample_rate: q,
            expected_clients: (self.s.mode == DpMode::Central).then_some(plan.expected),
            clip,
            next_clip: self.adaptive.as_ref().map(|a| a.clip),
            noise_stddev: match self.s.mode {
                DpMode::Central => plan.update_z * clip / plan.expected,
                DpMode::Local => z * clip,
            },
            unclipped_fraction,
        });
    }
}

impl Strategy for Private {
    fn describe(&self) -> String {
        let clip = match &self.s.clip {
            ClipRule::Fixed(c) => format!("clip {c}"),
            ClipRule::Adaptive {
                initial,
                target_quantile,
                lr,
                ..
            } => {
                format!("adaptive clip from {initial} towards quantile {target_quantile} (lr {lr})")
            }
        };
        let sampling = match self.s.mode {
            DpMode::Central => format!(
                "; Poisson sampling, rate {} (--fraction-fit)",
                self.s.sample_rate
            ),
            DpMode::Local => String::new(),
        };
        let delta = self
            .s
            .delta
            .map_or("min(1/N², 1e-5) at the first round".to_string(), |d| {
                format!("{d:e}")
            });
        let budget = self
            .s
            .max_epsilon
            .map_or(String::new(), |e| format!(", at most ε = {e}"));
        format!(
            "{} with {} DP ({clip}, noise multiplier {}{sampling}; δ {delta}{budget})",
            self.inner.describe(),
            self.s.mode.name(),
            self.s.noise_multiplier,
        )
    }

    fn begin_round(&mut self, round: u64, live: usize) -> Result<(), EndRun> {
        let delta = *self.delta.get_or_insert_with(|| default_delta(live));
        let expected = self.s.sample_rate * live as f64;
        let count_stddev = match &self.s.clip {
            ClipRule::Adaptive { count_stddev, .. } => count_stddev.unwrap_or(expected / 20.0),
            ClipRule::Fixed(_) => 0.0,
        };
        let update_z = if self.adaptive.is_some() {
            update_noise_multiplier(self.s.noise_multiplier, count_stddev).map_err(|why| {
                EndRun::Error(format!("round {round} cannot be made private: {why}"))
            })?
        } else {
            self.s.noise_multiplier
        };
        let (q, z) = self.mechanism();
        if let Some(max) = self.s.max_epsilon {
            let next = self.accountant.after_step(q, z, delta);
            if next.epsilon > max {
                let now = self.accountant.spent(delta).epsilon;
                return Err(EndRun::BudgetSpent(format!(
                    "privacy budget reached: round {round} would take ε from {now:.4} to {:.4}, above --dp-max-epsilon {max} (δ = {delta:e}); the run ends with the model of round {}",
                    next.epsilon,
                    round - 1
                )));
            }
        }
        let plan = RoundPlan {
            expected,
            count_stddev,
            update_z,
        };
        self.plan = Some(plan);
        if self.s.mode == DpMode::Local {
            // Each attempt's uploads are releases, whether or not the round later succeeds.
            self.accountant.step(q, z);
            self.record(plan, self.clip(), None);
        }
        Ok(())
    }

    fn configure_fit(&self, round: u64, attempt: u32, available: &[Candidate]) -> FitPlan {
        let mut plan = self.inner.configure_fit(round, attempt, available);
        match self.s.mode {
            DpMode::Central => {
                plan.clients = sampling::poisson(available, self.s.sample_rate);
                plan.count_whatever_arrives = true;
            }
            DpMode::Local => {
                let clip = self.clip();
                plan.local_dp = Some(LocalDp {
                    clip,
                    noise_stddev: self.s.noise_multiplier * clip,
                });
            }
        }
        plan
    }

    fn aggregator(&self, round: u64) -> Box<dyn Aggregator> {
        match self.s.mode {
            DpMode::Central => {
                // The engine always begins a round first; should it not, the most cautious
                // plan (m = 1: the noise of a single client's release) rather than none.
                let plan = self.plan_or_cautious();
                *self.tally.lock().unwrap_or_else(|e| e.into_inner()) = Tally::default();
                let clip = self.clip();
                Box::new(ClippedSum {
                    layout: self.layout.clone(),
                    clip,
                    sum: vec![0.0; self.layout.len()],
                    accepted: 0,
                    noise_stddev: plan.update_z * clip,
                    expected: plan.expected,
                    tally: self.tally.clone(),
                    // A fresh generator per round: noise must never repeat across rounds.
                    rng: match self.noise_seed {
                        Some(seed) => rand::SeedableRng::seed_from_u64(seed ^ round),
                        None => noise_rng(),
                    },
                })
            }
            DpMode::Local => self.inner.aggregator(round),
        }
    }

    fn apply(&mut self, global: &mut TensorSet, combined: &[f32]) {
        if self.s.mode == DpMode::Central {
            let plan = self.plan_or_cautious();
            let clip = self.clip();
            let unclipped = self
                .tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unclipped;
            // The noised count is released only under a begun round's plan.
            let fraction = match (&mut self.adaptive, self.plan) {
                (Some(a), Some(_)) => {
                    Some(a.update(unclipped, plan.expected, plan.count_stddev, &mut self.rng))
                }
                _ => None,
            };
            let (q, z) = self.mechanism();
            self.accountant.step(q, z);
            self.record(plan, clip, fraction);
        }
        self.inner.apply(global, combined);
    }

    fn configure_evaluate(&self, round: u64, available: &[Candidate]) -> Vec<String> {
        self.inner.configure_evaluate(round, available)
    }

    fn aggregate_evaluate(&self, reports: &[EvalReport]) -> EvalSummary {
        self.inner.aggregate_evaluate(reports)
    }

    fn privacy(&self) -> Option<PrivacyStatus> {
        self.status.clone()
    }

    fn state(&self) -> Result<Option<TensorSet>, TensorError> {
        let mut tensors = match self.inner.state()? {
            Some(set) => set.into_tensors(),
            None => Vec::new(),
        };
        // f32 rounded up, so a restored accountant never holds less than was spent.
        let up = |v: f64| {
            let f = v as f32;
            if f64::from(f) < v { f.next_up() } else { f }
        };
        let rdp: Vec<f32> = self.accountant.rdp().iter().map(|&r| up(r)).collect();
        tensors.push(NamedTensor::new(STATE_RDP, vec![rdp.len()], rdp)?);
        tensors.push(NamedTensor::new(
            STATE_CLIP,
            vec![1],
            vec![self.clip() as f32],
        )?);
        // δ rounded down: a smaller δ only makes the reported ε larger.
        let delta = self.delta.unwrap_or(1e-5) as f32;
        tensors.push(NamedTensor::new(STATE_DELTA, vec![1], vec![delta])?);
        let releases = self.accountant.rounds() as f32;
        tensors.push(NamedTensor::new(STATE_RELEASES, vec![1], vec![releases])?);
        TensorSet::new(tensors).map(Some)
    }

    fn restore(&mut self, state: &TensorSet) -> Result<(), String> {
        let one = |name: &str| -> Result<f64, String> {
            match state.get(name).map(|t| t.data.as_slice()) {
                Some([v]) if v.is_finite() && *v > 0.0 => Ok(f64::from(*v)),
                Some(_) => Err(format!(
                    "`{name}` in the saved state is not one positive value"
                )),
                None => Err(format!(
                    "the saved state has no `{name}`: it was not written by a run with --dp"
                )),
            }
        };
        let rdp = state
            .get(STATE_RDP)
            .ok_or_else(|| format!("the saved state has no `{STATE_RDP}` (privacy accountant)"))?;
        let releases = state.get(STATE_RELEASES).map_or(0, |t| {
            t.data.first().map_or(0, |v| v.max(0.0).round() as u64)
        });
        self.accountant =
            Accountant::restored(rdp.data.iter().map(|&v| f64::from(v)).collect(), releases)?;
        let clip = one(STATE_CLIP)?;
        // A fixed bound is the run's setting (z is relative to it, so changing it on resume
        // keeps the accounting right); an adaptive one continues where it was.
        if let Some(a) = &mut self.adaptive {
            a.clip = clip;
        }
        if self.s.delta.is_none() {
            self.delta = Some(one(STATE_DELTA)?);
        }
        let inner = state.select(|name| !name.starts_with("dp."));
        if !inner.is_empty() {
            self.inner.restore(&inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "dp_tests.rs"]
mod tests;
