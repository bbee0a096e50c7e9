//! SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated
//! Learning", Algorithm 1 with option II): client drift on non-IID data is corrected by control
//! variates. The server keeps c, an estimate of the global gradient; each client keeps its own
//! cᵢ across rounds (on its disk, next to its state). Every local step follows g − cᵢ + c, so a
//! client whose data pulls one way is pushed back towards where the federation goes.
//!
//! A round, for the sampled clients S of the N live ones:
//! - each client downloads x and c, trains from x to yᵢ with the correction, and takes
//!   cᵢ⁺ = cᵢ − c − Δᵢ/aᵢ (Δᵢ = yᵢ − x, aᵢ its step weight, Σ ηₖ with plain SGD); it uploads Δᵢ
//!   only, and keeps cᵢ⁺ once the update is counted;
//! - the server moves x ← x + η_g·Σ pᵢΔᵢ (example-weighted, as our FedAvg) and
//!   c ← c + (1/N)·Σ_S (cᵢ⁺ − cᵢ) = c·(1 − |S|/N) − (1/N)·Σ_S Δᵢ/aᵢ, which it computes from the
//!   updates themselves, so clients never send their variates.
//!
//! With every client in every round, c stays the mean of the clients' cᵢ. c is the strategy's
//! state: written with every checkpoint and restored on resume, so a resumed run continues
//! exactly. The download is twice the model (x and c); the upload is the usual one.

use std::sync::{Arc, Mutex};

use fedtune_common::control_variate::SERVER_VARIATE;
use fedtune_common::tensors::{TensorError, TensorSet};

use super::layout::Layout;
use super::normalized::{NormalizedMean, VariateSlot};
use super::{Aggregator, BuiltIn, Candidate, EndRun, FitPlan, Strategy};

pub struct Scaffold {
    /// Sampling, evaluation and the plain server step x ← x + η_g·Δ.
    inner: BuiltIn,
    layout: Arc<Layout>,
    /// The server control variate, in layout order.
    c: Vec<f32>,
    /// N: the live clients when the round opened.
    clients: usize,
    slot: VariateSlot,
}

impl Scaffold {
    pub fn new(inner: BuiltIn) -> Self {
        let layout = inner.layout.clone();
        Self {
            c: vec![0.0; layout.len()],
            layout,
            inner,
            clients: 0,
            slot: Arc::new(Mutex::new(None)),
        }
    }

    /// c as the tensors sent with the model (`scaffold-c.<tensor>`).
    pub fn server_variate(&self) -> Result<TensorSet, TensorError> {
        TensorSet::new(self.layout.to_tensors(SERVER_VARIATE, &self.c)?)
    }
}

impl Strategy for Scaffold {
    fn describe(&self) -> String {
        format!(
            "{}; control variates: clients keep theirs, the server's travels with the model",
            self.inner.describe()
        )
    }

    fn begin_round(&mut self, round: u64, live: usize) -> Result<(), EndRun> {
        self.clients = live;
        self.inner.begin_round(round, live)
    }

    fn configure_fit(&self, round: u64, attempt: u32, available: &[Candidate]) -> FitPlan {
        self.inner.configure_fit(round, attempt, available)
    }

    fn aggregator(&self, _round: u64) -> Box<dyn Aggregator> {
        Box::new(NormalizedMean::scaffold(
            self.layout.clone(),
            self.slot.clone(),
        ))
    }

    fn apply(&mut self, global: &mut TensorSet, combined: &[f32]) {
        self.inner.apply(global, combined);
        let step = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(step) = step {
            // A client that joined after the round opened still counts once.
            let n = self.clients.max(step.updates) as f64;
            let keep = 1.0 - step.updates as f64 / n;
            for (c, g) in self.c.iter_mut().zip(&step.normalized_sum) {
                *c = (keep * f64::from(*c) - g / n) as f32;
            }
        }
    }

    fn sends_with_model(&self) -> bool {
        true
    }

    fn sent_with_model(&self) -> Result<Option<TensorSet>, TensorError> {
        self.server_variate().map(Some)
    }

    fn configure_evaluate(&self, round: u64, available: &[Candidate]) -> Vec<String> {
        self.inner.configure_evaluate(round, available)
    }

    fn state(&self) -> Result<Option<TensorSet>, TensorError> {
        self.server_variate().map(Some)
    }

    fn restore(&mut self, state: &TensorSet) -> Result<(), String> {
        self.c = self
            .layout
            .from_tensors(SERVER_VARIATE, state)
            .map_err(|e| format!("the SCAFFOLD server variate: {e}"))?;
        Ok(())
    }
}
