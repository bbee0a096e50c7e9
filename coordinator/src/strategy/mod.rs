//! Strategies: which clients do what each round (*configure*), and how their results become the
//! next global model or the round's evaluation figures (*aggregate*), after Flower's `Strategy`.
//!
//! Aggregation is split in two, as in NVFlare's `accept()` then `aggregate()`:
//! an [`Aggregator`] is made per round and takes each verified update as it arrives
//! (`accept`), then `finish` combines them into one delta; the strategy's server optimiser then
//! moves the global model by it ([`Strategy::apply`]). Linear rules ([`mean`]) fold updates in
//! as they come, so the coordinator holds one model-sized accumulator whatever the number of
//! clients; robust rules ([`robust`]) must buffer the round's updates and do so within a memory
//! budget, spilling to disk past it ([`buffer`]).
//!
//! Every built-in strategy is a combine rule plus a server optimiser:
//!
//! | `--strategy` | combine | server step | sent to clients |
//! |---|---|---|---|
//! | `fedavg` | example-weighted mean | w += η·Δ (η = 1) | |
//! | `fedavgm` | weighted mean | momentum | |
//! | `fedadam`, `fedyogi`, `fedadagrad` | weighted mean | adaptive | |
//! | `fedprox` | weighted mean | w += η·Δ | proximal μ |
//! | `median` | coordinate-wise median | w += η·Δ | |
//! | `trimmed-mean` | coordinate-wise β-trimmed mean | w += η·Δ | |
//! | `krum`, `multi-krum` | (multi-)Krum selection, weighted mean | w += η·Δ | |
//! | `fednova` | step-normalised mean ([`normalized`]) | w += η·Δ | |
//! | `scaffold` | weighted mean; server variate step ([`scaffold`]) | w += η·Δ | server variate c |
//!
//! Differential privacy wraps a strategy rather than being one ([`dp::Private`], like Flower's
//! DP strategies): central DP replaces the combine rule of a linear strategy with a clipped,
//! noised sum and keeps its server step; local DP asks clients to noise their own updates.

pub mod buffer;
pub mod clipped_sum;
pub mod dp;
pub mod layout;
pub mod mean;
pub mod normalized;
pub mod partial_mean;
pub mod robust;
pub mod sampling;
pub mod scaffold;
pub mod server_opt;

use std::path::PathBuf;
use std::sync::Arc;

use fedtune_common::blocks::Blocks;
use fedtune_common::tensors::{TensorError, TensorSet, TensorSpec};

use self::buffer::UpdateBuffer;
use self::layout::Layout;
use self::mean::WeightedMean;
use self::normalized::NormalizedMean;
use self::robust::{Robust, Rule};
pub use self::sampling::Candidate;
use self::server_opt::{Adaptive, ServerOptKind, ServerOptimizer};
// The `--strategy` names live with the settings files that spell them.
pub use fedtune_settings::StrategyKind;

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error(
        "{strategy} needs at least {needed} updates to combine, this round has {got}: select more clients (--fraction-fit, --min-fit-clients) or relax the strategy's parameters"
    )]
    TooFewUpdates {
        strategy: String,
        needed: usize,
        got: usize,
    },
    #[error(
        "the update from {client} carries no positive `step_weight` metric, which this strategy divides it by: the client is older than the strategy; update it"
    )]
    NoStepWeight { client: String },
    #[error("cannot read an accepted update back: {0}")]
    Read(#[from] std::io::Error),
    #[error("cannot spill buffered updates to {}: {source}", path.display())]
    Spill {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What one update counts for when it is combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateWeight {
    /// The training examples behind it (FedAvg's weight).
    pub examples: u64,
    /// How far its local steps carried the gradients, as the client reported it (metric
    /// `step_weight`); FedNova and SCAFFOLD divide the update by it.
    pub steps: Option<f64>,
}

impl UpdateWeight {
    pub const STEP_METRIC: &str = "step_weight";

    /// The weight of an update with these examples and metrics.
    pub fn of(examples: u64, metrics: &std::collections::HashMap<String, f64>) -> Self {
        Self {
            examples,
            steps: metrics.get(Self::STEP_METRIC).copied(),
        }
    }

    /// Examples only (rules that ignore local steps).
    pub fn examples(examples: u64) -> Self {
        Self {
            examples,
            steps: None,
        }
    }
}

/// One round's updates on their way to one combined delta.
pub trait Aggregator: Send {
    /// Takes one client's delta (already verified: names, shapes, finite values), weighted by
    /// `weight`. `source` names the client, for the log.
    fn accept(
        &mut self,
        source: &str,
        delta: &dyn Blocks,
        weight: UpdateWeight,
    ) -> Result<(), AggregateError>;

    /// Updates accepted so far.
    fn accepted(&self) -> usize;

    /// The combined delta in [`Layout`] order; `None` when no update was accepted.
    fn finish(self: Box<Self>) -> Result<Option<Vec<f32>>, AggregateError>;
}

/// What the selected clients of a training round are asked to do beyond the run's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FitPlan {
    pub clients: Vec<String>,
    /// FedProx: clients add μ/2·‖w − w_global‖² to their loss (0 = off).
    pub proximal_mu: f64,
    /// Local DP: clients clip and noise their update before upload.
    pub local_dp: Option<LocalDp>,
    /// The round is combined with whatever arrives, even nothing (central DP: the accountant
    /// assumes every Poisson draw is released), instead of needing `min_fit_clients`.
    pub count_whatever_arrives: bool,
}

/// Local DP as a task carries it: clip to `clip`, add N(0, `noise_stddev`²).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalDp {
    pub clip: f64,
    pub noise_stddev: f64,
}

/// Why the run ends before a round opens.
#[derive(Debug, Clone, PartialEq)]
pub enum EndRun {
    /// The privacy budget (`--dp-max-epsilon`) would be exceeded: a planned end.
    BudgetSpent(String),
    /// The round cannot run as configured.
    Error(String),
}

/// One client's evaluation of the global model.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub num_examples: u64,
    pub metrics: std::collections::HashMap<String, f64>,
}

/// Federated evaluation of one round: example-weighted means of the clients' figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalSummary {
    pub clients: usize,
    pub examples: u64,
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    /// With personalisation (`--personalize-steps`): the same figures after each client
    /// fine-tuned the global model on its own training data.
    pub personal_loss: Option<f64>,
    pub personal_accuracy: Option<f64>,
    pub personal_f1: Option<f64>,
}

/// Configure and aggregate, for training and for evaluation. The round engine calls these from
/// its own task only, in order; the per-round [`Aggregator`] is what update handlers touch.
pub trait Strategy: Send {
    /// A one-line description for the log, with the parameters.
    fn describe(&self) -> String;

    /// Called before each training attempt opens, once enough clients are live (`live`): an
    /// error ends the run before the attempt, saying why (e.g. the privacy budget is spent).
    fn begin_round(&mut self, _round: u64, _live: usize) -> Result<(), EndRun> {
        Ok(())
    }

    /// What the run has spent of its privacy budget, after the last round; `None` without DP.
    fn privacy(&self) -> Option<dp::PrivacyStatus> {
        None
    }

    /// The clients of training round `round` (attempt `attempt`) and what they are sent.
    fn configure_fit(&self, round: u64, attempt: u32, available: &[Candidate]) -> FitPlan;

    /// A fresh aggregator for one training round.
    fn aggregator(&self, round: u64) -> Box<dyn Aggregator>;

    /// Moves the global model by a round's combined delta.
    fn apply(&mut self, global: &mut TensorSet, combined: &[f32]);

    /// Whether training tasks download more than the global model ([`Strategy::sent_with_model`]).
    fn sends_with_model(&self) -> bool {
        false
    }

    /// Tensors every training task downloads with the global model, named apart from the
    /// model's (SCAFFOLD's server control variate); `None` for most strategies.
    fn sent_with_model(&self) -> Result<Option<TensorSet>, TensorError> {
        Ok(None)
    }

    /// The clients that evaluate the global model after `round` (empty: no federated
    /// evaluation this round).
    fn configure_evaluate(&self, round: u64, available: &[Candidate]) -> Vec<String>;

    /// Combines the clients' evaluation reports.
    fn aggregate_evaluate(&self, reports: &[EvalReport]) -> EvalSummary {
        weighted_eval(reports)
    }

    /// Server state to checkpoint (moments, momentum); `None` for stateless strategies.
    fn state(&self) -> Result<Option<TensorSet>, TensorError>;

    /// Restores [`Strategy::state`] from a checkpoint.
    fn restore(&mut self, state: &TensorSet) -> Result<(), String>;
}

/// Every strategy parameter, validated by the config.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategySettings {
    pub kind: StrategyKind,
    /// η of the server step.
    pub server_lr: f64,
    /// β of FedAvgM.
    pub server_momentum: f64,
    /// β₁, β₂, τ of the adaptive strategies.
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
    /// μ of FedProx.
    pub proximal_mu: f64,
    /// β of the trimmed mean: the fraction cut from each end.
    pub trim_fraction: f64,
    /// f (assumed attackers) and m (updates kept) of Krum.
    pub krum_f: usize,
    pub krum_m: usize,
    pub fraction_fit: f64,
    pub min_fit_clients: usize,
    pub fraction_evaluate: f64,
    pub min_evaluate_clients: usize,
    pub evaluate_every: u64,
    /// Robust strategies keep updates in memory up to this many bytes, then spill.
    pub buffer_memory: u64,
    pub spill_dir: PathBuf,
    pub seed: u64,
}

/// A combine rule plus a server optimiser: every built-in strategy.
pub struct BuiltIn {
    s: StrategySettings,
    pub(super) layout: Arc<Layout>,
    server: ServerOptimizer,
}

impl BuiltIn {
    pub fn new(s: StrategySettings, specs: &[TensorSpec]) -> Self {
        let opt = match s.kind {
            StrategyKind::FedAvgM => ServerOptKind::Momentum {
                beta: s.server_momentum,
            },
            StrategyKind::FedAdam | StrategyKind::FedYogi | StrategyKind::FedAdagrad => {
                ServerOptKind::Adaptive {
                    kind: match s.kind {
                        StrategyKind::FedAdam => Adaptive::Adam,
                        StrategyKind::FedYogi => Adaptive::Yogi,
                        _ => Adaptive::Adagrad,
                    },
                    beta1: s.beta1,
                    beta2: s.beta2,
                    tau: s.tau,
                }
            }
            _ => ServerOptKind::Plain,
        };
        Self {
            server: ServerOptimizer::new(opt, s.server_lr),
            layout: Arc::new(Layout::new(specs)),
            s,
        }
    }
}

impl Strategy for BuiltIn {
    fn describe(&self) -> String {
        let s = &self.s;
        let params = match s.kind {
            StrategyKind::FedAvg => String::new(),
            StrategyKind::FedAvgM => {
                format!("server lr {}, momentum {}", s.server_lr, s.server_momentum)
            }
            StrategyKind::FedAdam | StrategyKind::FedYogi | StrategyKind::FedAdagrad => format!(
                "server lr {}, beta1 {}, beta2 {}, tau {}",
                s.server_lr, s.beta1, s.beta2, s.tau
            ),
            StrategyKind::FedProx => format!("mu {}", s.proximal_mu),
            StrategyKind::Median => String::new(),
            StrategyKind::TrimmedMean => format!("beta {}", s.trim_fraction),
            StrategyKind::Krum => format!("f {}", s.krum_f),
            StrategyKind::MultiKrum => format!("f {}, m {}", s.krum_f, s.krum_m),
            StrategyKind::FedNova | StrategyKind::Scaffold => format!("server lr {}", s.server_lr),
        };
        let eval = if s.fraction_evaluate > 0.0 {
            format!(
                "; federated evaluation by {:.0}% of clients every {} round(s)",
                s.fraction_evaluate * 100.0,
                s.evaluate_every
            )
        } else {
            String::new()
        };
        format!(
            "{}{}; {:.0}% of live clients per round (at least {}){eval}",
            s.kind,
            if params.is_empty() {
                String::new()
            } else {
                format!(" ({params})")
            },
            s.fraction_fit * 100.0,
            s.min_fit_clients,
        )
    }

    fn configure_fit(&self, round: u64, attempt: u32, available: &[Candidate]) -> FitPlan {
        let count =
            sampling::sample_size(available.len(), self.s.fraction_fit, self.s.min_fit_clients);
        let seed = self.s.seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(attempt);
        FitPlan {
            clients: sampling::sample(available, count, seed),
            proximal_mu: if self.s.kind == StrategyKind::FedProx {
                self.s.proximal_mu
            } else {
                0.0
            },
            local_dp: None,
            count_whatever_arrives: false,
        }
    }

    fn aggregator(&self, round: u64) -> Box<dyn Aggregator> {
        let buffer = || {
            UpdateBuffer::new(
                self.layout.clone(),
                self.s.buffer_memory,
                self.s.spill_dir.join(format!("round-{round}")),
            )
        };
        let rule = match self.s.kind {
            StrategyKind::Median => Rule::Median,
            StrategyKind::TrimmedMean => Rule::TrimmedMean {
                beta: self.s.trim_fraction,
            },
            StrategyKind::Krum => Rule::Krum {
                f: self.s.krum_f,
                m: 1,
            },
            StrategyKind::MultiKrum => Rule::Krum {
                f: self.s.krum_f,
                m: self.s.krum_m,
            },
            StrategyKind::FedNova => return Box::new(NormalizedMean::fednova(self.layout.clone())),
            _ => return Box::new(WeightedMean::new(self.layout.clone())),
        };
        Box::new(Robust::new(rule, buffer()))
    }

    fn apply(&mut self, global: &mut TensorSet, combined: &[f32]) {
        self.server.step(&self.layout, global, combined);
    }

    fn configure_evaluate(&self, round: u64, available: &[Candidate]) -> Vec<String> {
        if self.s.fraction_evaluate <= 0.0 || !round.is_multiple_of(self.s.evaluate_every) {
            return Vec::new();
        }
        let count = sampling::sample_size(
            available.len(),
            self.s.fraction_evaluate,
            self.s.min_evaluate_clients,
        );
        sampling::sample(available, count, self.s.seed ^ round.rotate_left(32))
    }

    fn state(&self) -> Result<Option<TensorSet>, TensorError> {
        if !self.server.is_stateful() {
            return Ok(None);
        }
        TensorSet::new(self.server.state(&self.layout)?).map(Some)
    }

    fn restore(&mut self, state: &TensorSet) -> Result<(), String> {
        self.server.restore(&self.layout, state)
    }
}

/// The strategy `s` names, over the model's trainable tensors `specs`.
pub fn build(s: StrategySettings, specs: &[TensorSpec]) -> Box<dyn Strategy> {
    let scaffold = s.kind == StrategyKind::Scaffold;
    let built = BuiltIn::new(s, specs);
    if scaffold {
        Box::new(scaffold::Scaffold::new(built))
    } else {
        Box::new(built)
    }
}

/// Example-weighted means of `loss`, `accuracy`, `precision`, `recall`, `f1` (and their
/// `personal_` figures) over the reports that carry them.
pub fn weighted_eval(reports: &[EvalReport]) -> EvalSummary {
    let mean = |key: &str| {
        let (mut sum, mut total) = (0.0, 0.0);
        for r in reports {
            if let Some(v) = r.metrics.get(key) {
                sum += r.num_examples as f64 * v;
                total += r.num_examples as f64;
            }
        }
        (total > 0.0).then(|| sum / total)
    };
    EvalSummary {
        clients: reports.len(),
        examples: reports.iter().map(|r| r.num_examples).sum(),
        loss: mean("loss"),
        accuracy: mean("accuracy"),
        precision: mean("precision"),
        recall: mean("recall"),
        f1: mean("f1"),
        personal_loss: mean("personal_loss"),
        personal_accuracy: mean("personal_accuracy"),
        personal_f1: mean("personal_f1"),
    }
}

#[cfg(test)]
mod normalized_tests;
#[cfg(test)]
mod tests;
