//! What the server does with a round's combined delta Δ (the "pseudo-gradient", pointing from
//! the old global model towards the clients' models). Reddi et al. 2021, "Adaptive Federated
//! Optimization", Algorithm 2, without bias correction; moments start at m = 0, v = τ².
//!
//! | optimiser | update |
//! |---|---|
//! | plain (FedAvg, robust rules) | w ← w + η·Δ |
//! | momentum (FedAvgM, Hsu et al. 2019) | m ← β·m + Δ; w ← w + η·m |
//! | adam | m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; w ← w + η·m / (√v + τ) |
//! | yogi | as adam but v ← v − (1−β₂)·Δ²·sign(v − Δ²) |
//! | adagrad | as adam but v ← v + Δ² |
//!
//! The moments are the server's state: saved beside every checkpoint and restored on resume,
//! so a resumed run continues exactly.

use fedtune_common::tensors::{TensorError, TensorSet};

use super::layout::Layout;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Adaptive {
    Adam,
    Yogi,
    Adagrad,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOptKind {
    Plain,
    Momentum {
        beta: f64,
    },
    Adaptive {
        kind: Adaptive,
        beta1: f64,
        beta2: f64,
        tau: f64,
    },
}

pub struct ServerOptimizer {
    kind: ServerOptKind,
    lr: f64,
    /// First moment (momentum); empty until the first round.
    m: Vec<f32>,
    /// Second moment (adaptive only); empty until the first round.
    v: Vec<f32>,
}

impl ServerOptimizer {
    pub fn new(kind: ServerOptKind, lr: f64) -> Self {
        Self {
            kind,
            lr,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    pub fn is_stateful(&self) -> bool {
        !matches!(self.kind, ServerOptKind::Plain)
    }

    /// Moves `global` by the round's combined delta.
    pub fn step(&mut self, layout: &Layout, global: &mut TensorSet, delta: &[f32]) {
        let lr = self.lr as f32;
        match self.kind {
            ServerOptKind::Plain => layout.add_scaled(global, delta, lr),
            ServerOptKind::Momentum { beta } => {
                let beta = beta as f32;
                if self.m.is_empty() {
                    self.m = vec![0.0; delta.len()];
                }
                for (m, d) in self.m.iter_mut().zip(delta) {
                    *m = beta * *m + d;
                }
                layout.add_scaled(global, &self.m, lr);
            }
            ServerOptKind::Adaptive {
                kind,
                beta1,
                beta2,
                tau,
            } => {
                let (b1, b2, tau) = (beta1 as f32, beta2 as f32, tau as f32);
                if self.m.is_empty() {
                    self.m = vec![0.0; delta.len()];
                    self.v = vec![tau * tau; delta.len()];
                }
                let mut step = vec![0.0f32; delta.len()];
                for (((s, m), v), &d) in step
                    .iter_mut()
                    .zip(self.m.iter_mut())
                    .zip(self.v.iter_mut())
                    .zip(delta)
                {
                    let d2 = d * d;
                    *m = b1 * *m + (1.0 - b1) * d;
                    *v = match kind {
                        Adaptive::Adam => b2 * *v + (1.0 - b2) * d2,
                        Adaptive::Yogi => *v - (1.0 - b2) * d2 * (*v - d2).signum_or_zero(),
                        Adaptive::Adagrad => *v + d2,
                    };
                    *s = *m / (v.sqrt() + tau);
                }
                layout.add_scaled(global, &step, lr);
            }
        }
    }

    /// The moments as named tensors (`m.<tensor>`, `v.<tensor>`); empty before the first step
    /// and for the plain optimiser.
    pub fn state(
        &self,
        layout: &Layout,
    ) -> Result<Vec<fedtune_common::tensors::NamedTensor>, TensorError> {
        let mut out = Vec::new();
        if !self.m.is_empty() {
            out.extend(layout.to_tensors("m", &self.m)?);
        }
        if !self.v.is_empty() {
            out.extend(layout.to_tensors("v", &self.v)?);
        }
        Ok(out)
    }

    /// Restores what [`ServerOptimizer::state`] saved.
    pub fn restore(&mut self, layout: &Layout, state: &TensorSet) -> Result<(), String> {
        let has = |p: &str| {
            state
                .tensors()
                .iter()
                .any(|t| t.name.starts_with(&format!("{p}.")))
        };
        self.m = if has("m") {
            layout.from_tensors("m", state)?
        } else {
            Vec::new()
        };
        self.v = match self.kind {
            ServerOptKind::Adaptive { .. } if has("v") => layout.from_tensors("v", state)?,
            ServerOptKind::Adaptive { .. } if !self.m.is_empty() => {
                return Err("the second moment `v.*` is missing".into());
            }
            _ => Vec::new(),
        };
        Ok(())
    }
}

trait SignumOrZero {
    fn signum_or_zero(self) -> Self;
}

impl SignumOrZero for f32 {
    /// sign(x) with sign(0) = 0, as Yogi defines it (`f32::signum` gives ±1 at zero).
    fn signum_or_zero(self) -> Self {
        if self > 0.0 {
            1.0
        } else if self < 0.0 {
            -1.0
        } else {
            0.0
        }
    }
}
