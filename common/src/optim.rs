//! The local optimiser: SGD (momentum, Nesterov), Adam, AdamW; weight decay; learning-rate
//! schedules within local training (constant, step, cosine, each with an optional linear
//! warm-up); gradient clipping by the global norm over all parameters.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{
    AdamConfig, AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig, decay::WeightDecayConfig,
    momentum::MomentumConfig,
};
use burn::tensor::Tensor;
// The names and schedule grammar live with the settings files that spell them.
pub use fedtune_settings::{LrSchedule, OptimizerKind};

/// The optimiser and its regularisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    /// SGD momentum (0 = plain SGD).
    pub momentum: f64,
    /// SGD: Nesterov momentum (needs momentum > 0).
    pub nesterov: bool,
    /// L2 penalty for SGD and Adam; decoupled weight decay for AdamW (0 = off).
    pub weight_decay: f64,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adam,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl OptimizerSettings {
    pub fn init(&self) -> ModuleOptimizer {
        let decay =
            (self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay as f32));
        match self.kind {
            OptimizerKind::Sgd => {
                let momentum = (self.momentum > 0.0).then(|| {
                    MomentumConfig::new()
                        .with_momentum(self.momentum)
                        .with_dampening(0.0)
                        .with_nesterov(self.nesterov)
                });
                SgdConfig::new()
                    .with_momentum(momentum)
                    .with_weight_decay(decay)
                    .init()
            }
            OptimizerKind::Adam => AdamConfig::new().with_weight_decay(decay).init(),
            OptimizerKind::AdamW => AdamWConfig::new()
                .with_weight_decay(self.weight_decay as f32)
                .init(),
        }
    }
}

/// The learning rate of local step `step` (0-based) out of `total_steps`, with a linear warm-up
/// over the first `warmup_steps` steps.
pub fn scheduled_lr(
    base: f64,
    schedule: LrSchedule,
    warmup_steps: usize,
    step: usize,
    steps_per_epoch: usize,
    total_steps: usize,
) -> f64 {
    if step < warmup_steps {
        return base * (step + 1) as f64 / warmup_steps as f64;
    }
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Step {
            every_epochs,
            gamma,
        } => {
            let epoch = step / steps_per_epoch.max(1);
            base * gamma.powi((epoch / every_epochs as usize) as i32)
        }
        LrSchedule::Cosine { min_factor } => {
            let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
            let t = (step - warmup_steps) as f64 / span;
            let min = base * min_factor;
            min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

struct SumOfSquares<'a> {
    grads: &'a GradientsParams,
    sum: f64,
}

impl ModuleVisitor for SumOfSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sum += f64::from(g.square().sum().into_scalar::<f32>());
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The norm of all gradients together.
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    let mut v = SumOfSquares { grads, sum: 0.0 };
    model.visit(&mut v);
    v.sum.sqrt()
}

/// Scales every gradient by `max_norm / norm` when the global norm exceeds `max_norm` (as
/// PyTorch's `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_global_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_grad_norm(model, grads);
    if norm > max_norm && norm.is_finite() {
        let mut v = Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut v);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_by_hand() {
        let lr = |s: &str, warm, step| scheduled_lr(0.1, s.parse().unwrap(), warm, step, 10, 40);
        assert_eq!(lr("constant", 0, 17), 0.1);
        // step:1:0.5 — epoch 2 (steps 20..29) runs at 0.1 · 0.5².
        assert!((lr("step:1:0.5", 0, 25) - 0.025).abs() < 1e-12);
        // cosine: full rate at the start, half way at the middle, min at the end.
        assert!((lr("cosine", 0, 0) - 0.1).abs() < 1e-12);
        assert!((lr("cosine", 0, 20) - 0.05).abs() < 1e-12);
        assert!((lr("cosine:0.1", 0, 40) - 0.01).abs() < 1e-12);
        // linear warm-up over 4 steps: 0.025, 0.05, 0.075, 0.1, then the schedule.
        assert!((lr("constant", 4, 0) - 0.025).abs() < 1e-12);
        assert!((lr("constant", 4, 3) - 0.1).abs() < 1e-12);
    }
}
