//! Turns a Train task into an update: load the global weights, train locally, take the delta,
//! validate. No gRPC here.

use std::collections::HashMap;
use std::time::Instant;

use fedtune_common::data::Examples;
use fedtune_common::device::DeviceChoice;
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::{NamedTensor, TensorSet, TensorSpec};
use fedtune_common::train::{self, Progress, TrainSettings};

use crate::local_data::LocalData;

/// The local examples with the training and validation indices.
pub struct Split<'a> {
    pub examples: &'a dyn Examples,
    pub train_idx: &'a [usize],
    pub val_idx: &'a [usize],
}

impl<'a> Split<'a> {
    pub fn of(data: &'a LocalData, examples: &'a dyn Examples) -> Self {
        Self {
            examples,
            train_idx: &data.train_idx,
            val_idx: &data.val_idx,
        }
    }
}

const EVAL_BATCH: usize = 256;
/// The update of `--train none`: every parameter moves by this much.
pub const FIXED_DELTA: f32 = 1e-3;

pub struct LocalUpdate {
    pub delta: TensorSet,
    pub num_examples: u64,
    /// train_loss, val_loss, val_accuracy, val_precision, val_recall, val_f1, val_examples, train_ms,
    /// epochs_run, step_weight.
    pub metrics: HashMap<String, f64>,
}

/// Fine-tunes `global` on the local training split and measures the result on the validation
/// split.
/// Frozen tensors (`settings.frozen`) are not trained and not part of the delta.
pub fn fine_tune(
    global: &TensorSet,
    spec: &ModelSpec,
    settings: &TrainSettings,
    dropout: f64,
    data: Split,
    device: DeviceChoice,
    on_progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<LocalUpdate> {
    let started = Instant::now();
    let plain = device.device()?;
    let autodiff = plain.clone().autodiff();
    autodiff.seed(settings.seed);
    let model = spec
        .build_with_dropout(&autodiff, dropout)?
        .inject(global)?;
    // Validation every epoch only when early stopping needs it.
    let per_epoch_validation: &[usize] = if settings.early_stopping_patience > 0 {
        data.val_idx
    } else {
        &[]
    };
    let outcome = train::train(
        model,
        data.examples,
        data.train_idx,
        per_epoch_validation,
        settings,
        &autodiff,
        on_progress,
    )?;
    let train_ms = started.elapsed().as_millis() as f64;

    let local = outcome.model.extract()?;
    let delta = local
        .delta_from(global)?
        .select(|n| !settings.frozen.iter().any(|f| f == n));
    let eval = train::evaluate(
        &outcome.model,
        data.examples,
        data.val_idx,
        EVAL_BATCH,
        spec.num_classes as usize,
        &plain,
    )?;
    let m = eval.metrics();
    let metrics = HashMap::from([
        ("train_loss".to_string(), outcome.train_loss),
        ("val_loss".to_string(), eval.loss),
        ("val_accuracy".to_string(), m.accuracy),
        ("val_precision".to_string(), m.precision),
        ("val_recall".to_string(), m.recall),
        ("val_f1".to_string(), m.f1),
        ("val_examples".to_string(), m.examples as f64),
        ("train_ms".to_string(), train_ms),
        ("epochs_run".to_string(), f64::from(outcome.epochs_run)),
        ("step_weight".to_string(), outcome.step_weight),
    ]);
    Ok(LocalUpdate {
        delta,
        num_examples: data.train_idx.len() as u64,
        metrics,
    })
}

/// Evaluates the global model as received on the local validation split: the client's part of
/// federated evaluation. Returns (examples, loss / accuracy / precision / recall / f1).
pub fn evaluate_global(
    global: &TensorSet,
    spec: &ModelSpec,
    data: Split,
    device: DeviceChoice,
    batch_size: usize,
) -> anyhow::Result<(u64, HashMap<String, f64>)> {
    let plain = device.device()?;
    let model = spec.build(&plain)?.inject(global)?;
    let eval = train::evaluate(
        &model,
        data.examples,
        data.val_idx,
        batch_size,
        spec.num_classes as usize,
        &plain,
    )?;
    Ok((eval.metrics().examples, figures(&eval, "")))
}

/// loss (when finite), accuracy, precision, recall and f1 of an evaluation, each name prefixed.
fn figures(eval: &train::Evaluation, prefix: &str) -> HashMap<String, f64> {
    let m = eval.metrics();
    let mut metrics: HashMap<String, f64> = [
        ("accuracy", m.accuracy),
        ("precision", m.precision),
        ("recall", m.recall),
        ("f1", m.f1),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{prefix}{k}"), v))
    .collect();
    if eval.loss.is_finite() {
        metrics.insert(format!("{prefix}loss"), eval.loss);
    }
    metrics
}

/// Personalisation: fine-tunes `start` (the global model, or Ditto's personal model with
/// `settings.proximal_anchor` the global one) for `settings.max_steps` steps on `train`'s
/// training split, then evaluates the result on `eval`'s validation indices (the examples the
/// global model was evaluated on). Returns the figures named `personal_loss`,
/// `personal_accuracy`, `personal_precision`, `personal_recall`, `personal_f1`, and the
/// personal model.
pub fn personalize(
    start: &TensorSet,
    spec: &ModelSpec,
    settings: &TrainSettings,
    dropout: f64,
    train: Split,
    eval: Split,
    device: DeviceChoice,
) -> anyhow::Result<(HashMap<String, f64>, TensorSet)> {
    let plain = device.device()?;
    let autodiff = plain.clone().autodiff();
    autodiff.seed(settings.seed);
    let model = spec.build_with_dropout(&autodiff, dropout)?.inject(start)?;
    let outcome = train::train(
        model,
        train.examples,
        train.train_idx,
        &[],
        settings,
        &autodiff,
        &mut |_| {},
    )?;
    let e = train::evaluate(
        &outcome.model,
        eval.examples,
        eval.val_idx,
        EVAL_BATCH,
        spec.num_classes as usize,
        &plain,
    )?;
    Ok((figures(&e, "personal_"), outcome.model.extract()?))
}

/// `--train none`: a small fixed delta for every parameter, without training (protocol
/// benchmarks).
pub fn fixed_update(specs: &[TensorSpec], num_examples: u64) -> anyhow::Result<LocalUpdate> {
    let tensors = specs
        .iter()
        .map(|s| NamedTensor {
            name: s.name.clone(),
            shape: s.shape.clone(),
            data: vec![FIXED_DELTA; s.num_elements()],
        })
        .collect();
    Ok(LocalUpdate {
        delta: TensorSet::new(tensors)?,
        num_examples,
        // As if one step at rate 1 had moved every parameter by the fixed delta.
        metrics: HashMap::from([("step_weight".to_string(), 1.0)]),
    })
}
