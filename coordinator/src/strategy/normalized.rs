//! The combine step of the strategies that weigh each update by how far its client's local
//! steps went (its `step_weight` aᵢ, see `fedtune_common::train::TrainOutcome::step_weight`):
//!
//! - **FedNova** (Wang et al. 2020, "Tackling the Objective Inconsistency Problem"): a client
//!   that ran more local steps (more data, more epochs) moves further, and plain FedAvg lets it
//!   pull the global model towards its own objective. FedNova averages the *normalised* updates
//!   dᵢ = Δᵢ/aᵢ (each client's mean gradient step) and rescales by the effective step count:
//!   Δ = τ_eff · Σ pᵢ·dᵢ with pᵢ = nᵢ/Σn and τ_eff = Σ pᵢ·aᵢ.
//! - **SCAFFOLD** (Karimireddy et al. 2020): the model step is the example-weighted mean
//!   Σ pᵢ·Δᵢ, as in FedAvg; the server variate moves by what the clients' variates moved,
//!   which each client derives from its own update (option II of the paper):
//!   cᵢ⁺ − cᵢ = −c − Δᵢ/aᵢ. This aggregator hands Σᵢ Δᵢ/aᵢ and the count to the strategy,
//!   which owns c ([`super::scaffold`]).
//!
//! Both fold updates in as they arrive, in f64: one or two model-sized accumulators, whatever
//! the number of clients.

use std::sync::{Arc, Mutex};

use fedtune_common::blocks::Blocks;

use super::layout::Layout;
use super::{AggregateError, Aggregator, UpdateWeight};

/// What SCAFFOLD's server variate step needs from a round: Σᵢ Δᵢ/aᵢ over the updates combined,
/// in layout order, and how many there were.
#[derive(Debug, Clone, PartialEq)]
pub struct VariateStep {
    pub normalized_sum: Vec<f64>,
    pub updates: usize,
}

/// Where the aggregator leaves the round's [`VariateStep`] for its strategy's server step.
pub type VariateSlot = Arc<Mutex<Option<VariateStep>>>;

pub struct NormalizedMean {
    layout: Arc<Layout>,
    /// FedNova: Σ nᵢ·Δᵢ/aᵢ. SCAFFOLD: Σ nᵢ·Δᵢ.
    weighted: Vec<f64>,
    /// SCAFFOLD only: Σ Δᵢ/aᵢ, unweighted.
    normalized: Option<Vec<f64>>,
    examples: f64,
    /// Σ nᵢ·aᵢ
    weighted_steps: f64,
    accepted: usize,
    /// SCAFFOLD: where `finish` leaves the variate step.
    slot: Option<VariateSlot>,
}

impl NormalizedMean {
    pub fn fednova(layout: Arc<Layout>) -> Self {
        Self::new(layout, None)
    }

    pub fn scaffold(layout: Arc<Layout>, slot: VariateSlot) -> Self {
        Self::new(layout, Some(slot))
    }

    fn new(layout: Arc<Layout>, slot: Option<VariateSlot>) -> Self {
        let n = layout.len();
        Self {
            weighted: vec![0.0; n],
            normalized: slot.as_ref().map(|_| vec![0.0; n]),
            layout,
            examples: 0.0,
            weighted_steps: 0.0,
            accepted: 0,
            slot,
        }
    }
}

impl Aggregator for NormalizedMean {
    fn accept(
        &mut self,
        source: &str,
        delta: &dyn Blocks,
        weight: UpdateWeight,
    ) -> Result<(), AggregateError> {
        let steps = weight
            .steps
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or_else(|| AggregateError::NoStepWeight {
                client: source.to_string(),
            })?;
        let n = weight.examples as f64;
        // FedNova weighs the normalised update; SCAFFOLD the update itself.
        let scale = if self.normalized.is_some() {
            n
        } else {
            n / steps
        };
        let (weighted, normalized) = (&mut self.weighted, &mut self.normalized);
        self.layout.place(delta, &mut |range, bytes| {
            let values = bytes
                .chunks_exact(4)
                .map(|d| f64::from(f32::from_le_bytes([d[0], d[1], d[2], d[3]])));
            match normalized {
                Some(norm) => {
                    for ((w, g), d) in weighted[range.clone()]
                        .iter_mut()
                        .zip(&mut norm[range])
                        .zip(values)
                    {
                        *w += scale * d;
                        *g += d / steps;
                    }
                }
                None => {
                    for (w, d) in weighted[range].iter_mut().zip(values) {
                        *w += scale * d;
                    }
                }
            }
        })?;
        self.examples += n;
        self.weighted_steps += n * steps;
        self.accepted += 1;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.accepted
    }

    fn finish(self: Box<Self>) -> Result<Option<Vec<f32>>, AggregateError> {
        if self.accepted == 0 || self.examples <= 0.0 {
            return Ok(None);
        }
        let total = self.examples;
        match (self.normalized, self.slot) {
            (Some(normalized_sum), Some(slot)) => {
                let step = VariateStep {
                    normalized_sum,
                    updates: self.accepted,
                };
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(step);
                Ok(Some(
                    self.weighted.iter().map(|s| (s / total) as f32).collect(),
                ))
            }
            _ => {
                // τ_eff · Σ pᵢ·dᵢ = (Σ nᵢaᵢ / Σ n) · (Σ nᵢdᵢ / Σ n)
                let scale = self.weighted_steps / (total * total);
                Ok(Some(
                    self.weighted.iter().map(|s| (s * scale) as f32).collect(),
                ))
            }
        }
    }
}
