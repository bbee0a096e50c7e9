//! The local training loop and evaluation, shared by the client (fine-tuning), the coordinator
//! (server-side evaluation) and tests. One readable loop: shuffle, batch, forward, loss,
//! backward, optimiser step.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::augment::Augment;
use crate::data::ImageDataset;
use crate::metrics::{ClassificationMetrics, ConfusionMatrix};
use crate::models::Net;
pub use crate::optim::OptimizerKind;
use crate::optim::{LrSchedule, OptimizerSettings, clip_global_norm, scheduled_lr};
use crate::params;
use crate::proximal::Proximal;

/// Fashion-MNIST's pixel mean and standard deviation (of x / 255).
const PIXEL_MEAN: f32 = 0.2860;
const PIXEL_STD: f32 = 0.3530;

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
    /// FedProx μ: adds μ/2·‖w − w_start‖² to the loss (0 = off).
    pub proximal_mu: f64,
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

pub struct TrainOutcome {
    /// The trained model (with early stopping: the weights of the best validation epoch).
    pub model: Net,
    /// Mean training loss over the last epoch run.
    pub train_loss: f64,
    pub steps: usize,
    pub epochs_run: u32,
    pub stopped_early: bool,
}

/// Turns examples into a normalised `[batch, 1, rows, cols]` tensor and their labels.
pub fn batch(
    data: &ImageDataset,
    indices: &[usize],
    device: &Device,
) -> (Tensor<4>, Tensor<1, Int>) {
    batch_with(data, indices, device, |image| {
        image.iter().map(|&p| f32::from(p) / 255.0).collect()
    })
}

fn batch_with(
    data: &ImageDataset,
    indices: &[usize],
    device: &Device,
    mut pixels: impl FnMut(&[u8]) -> Vec<f32>,
) -> (Tensor<4>, Tensor<1, Int>) {
    let mut x = Vec::with_capacity(indices.len() * data.rows * data.cols);
    for &i in indices {
        x.extend(
            pixels(data.image(i))
                .into_iter()
                .map(|p| (p - PIXEL_MEAN) / PIXEL_STD),
        );
    }
    let y: Vec<i64> = indices.iter().map(|&i| i64::from(data.labels[i])).collect();
    let images = Tensor::from_data(
        TensorData::new(x, [indices.len(), 1, data.rows, data.cols]),
        device,
    );
    let labels = Tensor::from_data(TensorData::new(y, [indices.len()]), device);
    (images, labels)
}

/// Trains `model` (already on `device`, which must be an autodiff device) on the examples at
/// `indices`; with `validation` examples, evaluates after every epoch (reported through
/// `on_progress`, and used for early stopping).
pub fn train(
    model: Net,
    data: &ImageDataset,
    indices: &[usize],
    validation: &[usize],
    settings: &TrainSettings,
    device: &Device,
    on_progress: &mut dyn FnMut(&Progress),
) -> TrainOutcome {
    let mut model = params::freeze(model, &settings.frozen);
    let mut optim = settings.optimizer.init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let proximal =
        (settings.proximal_mu > 0.0).then(|| Proximal::new(&model, settings.proximal_mu));
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut order = indices.to_vec();
    let batch_size = settings.batch_size.max(1);
    let steps_per_epoch = order.len().div_ceil(batch_size);
    let total_steps = steps_per_epoch * settings.epochs as usize;
    let (mut train_loss, mut steps) = (f64::NAN, 0);
    let plain = device.clone().inner();
    let mut best: Option<(f64, Net)> = None;
    let mut since_best = 0;
    let (mut epochs_run, mut stopped_early) = (0, false);

    for epoch in 1..=settings.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        let mut lr = settings.lr;
        for (step, chunk) in order.chunks(batch_size).enumerate() {
            let (images, labels) = if settings.augment.is_off() {
                batch(data, chunk, device)
            } else {
                batch_with(data, chunk, device, |image| {
                    settings
                        .augment
                        .apply(image, data.rows, data.cols, &mut rng)
                })
            };
            let logits = model.forward(images);
            let loss = loss_fn.forward(logits, labels);
            // The reported loss is the data loss; the proximal term only shapes the gradient.
            let loss_value = f64::from(loss.clone().into_scalar::<f32>());
            let loss = match proximal.as_ref().and_then(|p| p.penalty(&model)) {
                Some(term) => loss + term,
                None => loss,
            };
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            if let Some(max) = settings.clip_norm {
                clip_global_norm(&model, &mut grads, max);
            }
            lr = scheduled_lr(
                settings.lr,
                settings.schedule,
                settings.warmup_steps,
                steps,
                steps_per_epoch,
                total_steps,
            );
            model = optim.step(lr, model, grads);

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
        let Ok(v) = evaluate(&model, data, validation, 256, num_classes(&model), &plain) else {
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
    TrainOutcome {
        model,
        train_loss,
        steps,
        epochs_run,
        stopped_early,
    }
}

/// Output classes of a built model.
fn num_classes(model: &Net) -> usize {
    model.num_classes()
}

/// The device could not hand back the model's predictions.
#[derive(Debug, thiserror::Error)]
#[error("reading predictions back from the device failed: {0}")]
pub struct EvalError(String);

/// Loss and confusion matrix of a model on some examples.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub loss: f64,
    pub confusion: ConfusionMatrix,
}

impl Evaluation {
    pub fn metrics(&self) -> ClassificationMetrics {
        self.confusion.metrics()
    }
}

/// Evaluates `model` on the examples at `indices`. `device` is a plain (non-autodiff) device;
/// the model is switched to inference mode (no dropout, no gradients).
pub fn evaluate(
    model: &Net,
    data: &ImageDataset,
    indices: &[usize],
    batch_size: usize,
    num_classes: usize,
    device: &Device,
) -> Result<Evaluation, EvalError> {
    let model = model.valid();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut confusion = ConfusionMatrix::new(num_classes);
    let mut loss_sum = 0.0;
    for chunk in indices.chunks(batch_size.max(1)) {
        let (images, labels) = batch(data, chunk, device);
        let logits = model.forward(images);
        let loss = loss_fn.forward(logits.clone(), labels);
        loss_sum += f64::from(loss.into_scalar::<f32>()) * chunk.len() as f64;
        let predicted = logits
            .argmax(1)
            .into_data()
            .try_into_vec_as::<i64>()
            .map_err(|e| EvalError(format!("{e:?}")))?;
        for (&i, &p) in chunk.iter().zip(&predicted) {
            confusion.add(data.labels[i] as usize, p.max(0) as usize);
        }
    }
    let loss = if indices.is_empty() {
        f64::NAN
    } else {
        loss_sum / indices.len() as f64
    };
    Ok(Evaluation { loss, confusion })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelSpec;

    fn sgd() -> OptimizerSettings {
        OptimizerSettings {
            kind: OptimizerKind::Sgd,
            ..Default::default()
        }
    }

    /// 64 random 28x28 images with labels that depend on their mean brightness.
    fn data() -> ImageDataset {
        let mut x = 0x2545_F491u32;
        let mut images = Vec::with_capacity(64 * 784);
        let mut labels = Vec::new();
        for i in 0..64 {
            let bright = (i % 4) as u32 * 60;
            for _ in 0..784 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                images.push(((x % 64) + bright) as u8);
            }
            labels.push((i % 4) as u8);
        }
        ImageDataset {
            images,
            labels,
            rows: 28,
            cols: 28,
            source: "test".into(),
        }
    }

    /// ‖w − w₀‖ after a few SGD steps with proximal μ.
    fn drift(mu: f64) -> f64 {
        let spec = ModelSpec::parse("mlp", 4).unwrap();
        let device = Device::flex().autodiff();
        device.seed(3);
        let start = spec.init_weights(3).unwrap();
        let model = params::inject(spec.build(&device).unwrap(), &start).unwrap();
        let settings = TrainSettings {
            epochs: 3,
            batch_size: 16,
            lr: 0.05,
            optimizer: sgd(),
            seed: 1,
            proximal_mu: mu,
            ..Default::default()
        };
        let d = data();
        let idx: Vec<usize> = (0..d.len()).collect();
        let out = train(model, &d, &idx, &[], &settings, &device, &mut |_| {});
        let end = params::extract(&out.model).unwrap();
        let delta = end.delta_from(&start).unwrap();
        delta
            .tensors()
            .iter()
            .flat_map(|t| t.data.iter())
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn proximal_term_pulls_towards_the_starting_weights() {
        let (free, pulled) = (drift(0.0), drift(5.0));
        assert!(free > 0.0);
        assert!(
            pulled < 0.8 * free,
            "with mu = 5 the weights moved {pulled}, without {free}"
        );
    }
}
