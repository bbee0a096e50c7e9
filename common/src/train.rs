//! The local training loop and evaluation, shared by the client (fine-tuning), the coordinator
//! (server-side evaluation) and tests. One readable loop: shuffle, batch, forward, loss,
//! backward, optimiser step.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::augment::Augment;
use crate::data::Examples;
pub use crate::evaluate::{EvalError, Evaluation, evaluate};
use crate::models::{InputMismatch, Model};
pub use crate::optim::OptimizerKind;
use crate::optim::{LrSchedule, OptimizerSettings, scheduled_lr};
use crate::tensors::TensorSet;

/// Everything local training needs to know besides the data and the device.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    pub epochs: u32,
    pub batch_size: usize,
    /// Base learning rate of this round (the coordinator may already have decayed it).
    pub lr: f64,
    pub optimizer: OptimizerSettings,
    pub schedule: LrSchedule,
    pub warmup_steps: usize,
    /// Clip gradients to this global norm (`None` = off).
    pub clip_norm: Option<f64>,
    pub augment: Augment,
    /// Stop after this many epochs without a lower validation loss, keeping the best weights
    /// (0 = off; needs validation examples).
    pub early_stopping_patience: u32,
    /// Tensors that get no update (exact names, e.g. `conv1.weight`).
    pub frozen: Vec<String>,
    pub seed: u64,
    /// FedProx μ: adds μ/2·‖w − w_anchor‖² to the loss (0 = off).
    pub proximal_mu: f64,
    /// The weights the proximal term pulls towards, by name; `None`: the starting weights
    /// (FedProx). Ditto trains a personal model pulled towards the global one.
    pub proximal_anchor: Option<TensorSet>,
    /// SCAFFOLD: c − cᵢ for every tensor of the model, by name; each step's gradient is shifted
    /// by it (see [`crate::control_variate`]).
    pub correction: Option<TensorSet>,
    /// Stop after this many optimiser steps, within `epochs` (personalisation: a few steps).
    pub max_steps: Option<usize>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            lr: 1e-3,
            optimizer: OptimizerSettings::default(),
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            clip_norm: None,
            augment: Augment::default(),
            early_stopping_patience: 0,
            frozen: Vec::new(),
            seed: 0,
            proximal_mu: 0.0,
            proximal_anchor: None,
            correction: None,
            max_steps: None,
        }
    }
}

/// Validation figures at the end of an epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochValidation {
    pub loss: f64,
    pub accuracy: f64,
    pub f1: f64,
}

/// Reported after every optimiser step, and once more at the end of an epoch with validation.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub epoch: u32,
    pub epochs: u32,
    pub step: usize,
    pub steps_per_epoch: usize,
    pub loss: f64,
    pub lr: f64,
    /// Set only on the end-of-epoch report (then `loss` is the epoch's mean training loss).
    pub validation: Option<EpochValidation>,
}

impl Progress {
    /// `epoch 2/5: train loss … | val loss … acc …% f1 …` for an end-of-epoch report.
    pub fn epoch_line(&self) -> Option<String> {
        self.validation.map(|v| {
            format!(
                "epoch {}/{}: train loss {:.4} | val loss {:.4} acc {:.2}% f1 {:.4}",
                self.epoch,
                self.epochs,
                self.loss,
                v.loss,
                v.accuracy * 100.0,
                v.f1
            )
        })
    }
}

pub struct TrainOutcome {
    /// The trained model (with early stopping: the weights of the best validation epoch).
    pub model: Model,
    /// Mean training loss over the last epoch run.
    pub train_loss: f64,
    pub steps: usize,
    pub epochs_run: u32,
    pub stopped_early: bool,
    /// How far the local steps carried the gradients: Σ over the gradients of the total
    /// learning rate each was applied with (FedNova's ‖a‖₁·η, Wang et al. 2020, generalised to
    /// a schedule). With plain SGD it is Σₖ ηₖ; with momentum ρ a gradient keeps acting in
    /// later steps, ρ-discounted. With Adam it is Σₖ ηₖ, a heuristic: Adam's step is not a
    /// multiple of the gradient. FedNova and SCAFFOLD divide the update by it to get the
    /// client's mean (corrected) gradient.
    pub step_weight: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Input(#[from] InputMismatch),
    #[error("the SCAFFOLD correction does not fit the model: {0}")]
    Correction(#[from] crate::params::ParamsError),
    #[error("the proximal term's anchor does not fit the model: {0}")]
    Anchor(crate::params::ParamsError),
}

/// Trains `model` (already on `device`, which must be an autodiff device) on the examples at
/// `indices`; with `validation` examples, evaluates after every epoch (reported through
/// `on_progress`, and used for early stopping).
pub fn train(
    model: Model,
    data: &dyn Examples,
    indices: &[usize],
    validation: &[usize],
    settings: &TrainSettings,
    device: &Device,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<TrainOutcome, TrainError> {
    let mut model = model.set_frozen(&settings.frozen);
    let mut optim = settings.optimizer.init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let proximal = match (&settings.proximal_anchor, settings.proximal_mu > 0.0) {
        (_, false) => None,
        (None, true) => Some(model.proximal(settings.proximal_mu)),
        (Some(anchor), true) => Some(
            model
                .clone()
                .inject(anchor)
                .map_err(TrainError::Anchor)?
                .proximal(settings.proximal_mu),
        ),
    };
    let correction = match &settings.correction {
        Some(by) => Some(model.correction(by)?),
        None => None,
    };
    let mut step_weight = StepWeight::new(&settings.optimizer);
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut order = indices.to_vec();
    let batch_size = settings.batch_size.max(1);
    let steps_per_epoch = order.len().div_ceil(batch_size);
    let total_steps = steps_per_epoch * settings.epochs as usize;
    let (mut train_loss, mut steps) = (f64::NAN, 0);
    let plain = device.clone().inner();
    let mut best: Option<(f64, Model)> = None;
    let mut since_best = 0;
    let (mut epochs_run, mut stopped_early) = (0, false);

    for epoch in 1..=settings.epochs {
        if settings.max_steps.is_some_and(|max| steps >= max) {
            break;
        }
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        let mut lr = settings.lr;
        for (step, chunk) in order.chunks(batch_size).enumerate() {
            if settings.max_steps.is_some_and(|max| steps >= max) {
                break;
            }
            let (input, labels) = data.batch(chunk, device, Some((&settings.augment, &mut rng)));
            let logits = model.forward(input)?;
            let loss = loss_fn.forward(logits, labels);
            // The reported loss is the data loss; the proximal and correction terms only shape
            // the gradient.
            let loss_value = f64::from(loss.clone().into_scalar::<f32>());
            let loss = match proximal.as_ref().and_then(|p| model.penalty(p)) {
                Some(term) => loss + term,
                None => loss,
            };
            let loss = match correction.as_ref().and_then(|c| model.correction_term(c)) {
                Some(term) => loss + term,
                None => loss,
            };
            let grads = loss.backward();
            lr = scheduled_lr(
                settings.lr,
                settings.schedule,
                settings.warmup_steps,
                steps,
                steps_per_epoch,
                total_steps,
            );
            model = model.step(&mut optim, lr, grads, settings.clip_norm);
            step_weight.step(lr);

            loss_sum += loss_value * chunk.len() as f64;
            seen += chunk.len();
            steps += 1;
            on_progress(&Progress {
                epoch,
                epochs: settings.epochs,
                step: step + 1,
                steps_per_epoch,
                loss: loss_value,
                lr,
                validation: None,
            });
        }
        if seen > 0 {
            train_loss = loss_sum / seen as f64;
        }
        epochs_run = epoch;
        if validation.is_empty() {
            continue;
        }
        let Ok(v) = evaluate(&model, data, validation, 256, model.num_classes(), &plain) else {
            continue;
        };
        let m = v.metrics();
        on_progress(&Progress {
            epoch,
            epochs: settings.epochs,
            step: steps_per_epoch,
            steps_per_epoch,
            loss: train_loss,
            lr,
            validation: Some(EpochValidation {
                loss: v.loss,
                accuracy: m.accuracy,
                f1: m.f1,
            }),
        });
        if settings.early_stopping_patience > 0 && v.loss.is_finite() {
            if best.as_ref().is_none_or(|(b, _)| v.loss < *b) {
                best = Some((v.loss, model.clone()));
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= settings.early_stopping_patience {
                    stopped_early = epoch < settings.epochs;
                    break;
                }
            }
        }
    }
    if let Some((_, best_model)) = best {
        model = best_model;
    }
    Ok(TrainOutcome {
        model,
        train_loss,
        steps,
        epochs_run,
        stopped_early,
        step_weight: step_weight.total,
    })
}

/// Accumulates [`TrainOutcome::step_weight`]: with SGD momentum ρ, the step at lr ηₖ applies
/// every earlier gradient j once more with weight ρ^(k−j), so it adds ηₖ·mₖ where
/// mₖ = ρ·mₖ₋₁ + 1; Nesterov's step looks one momentum step ahead, ηₖ·(1 + ρ·mₖ).
struct StepWeight {
    rho: f64,
    nesterov: bool,
    m: f64,
    total: f64,
}

impl StepWeight {
    fn new(optimizer: &OptimizerSettings) -> Self {
        let sgd = optimizer.kind == OptimizerKind::Sgd;
        Self {
            rho: if sgd { optimizer.momentum } else { 0.0 },
            nesterov: sgd && optimizer.nesterov,
            m: 0.0,
            total: 0.0,
        }
    }

    fn step(&mut self, lr: f64) {
        self.m = self.rho * self.m + 1.0;
        self.total += if self.nesterov {
            lr * (1.0 + self.rho * self.m)
        } else {
            lr * self.m
        };
    }
}

#[cfg(test)]
#[path = "train_tests.rs"]
mod tests;
