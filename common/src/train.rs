//! The local training loop and evaluation, shared by the client (fine-tuning), the coordinator
//! (server-side evaluation) and tests. One readable loop: shuffle, batch, forward, loss,
//! backward, optimiser step.

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::data::ImageDataset;
use crate::metrics::{ClassificationMetrics, ConfusionMatrix};
use crate::models::Net;
use crate::proximal::Proximal;

/// Fashion-MNIST's pixel mean and standard deviation (of x / 255).
const PIXEL_MEAN: f32 = 0.2860;
const PIXEL_STD: f32 = 0.3530;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

impl FromStr for OptimizerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sgd" => Ok(Self::Sgd),
            "adam" => Ok(Self::Adam),
            _ => Err(format!("unknown optimizer `{s}`: use sgd or adam")),
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sgd => "sgd",
            Self::Adam => "adam",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    pub epochs: u32,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub seed: u64,
    /// FedProx μ: adds μ/2·‖w − w_start‖² to the loss (0 = off).
    pub proximal_mu: f64,
}

/// Reported after every optimiser step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub epoch: u32,
    pub epochs: u32,
    pub step: usize,
    pub steps_per_epoch: usize,
    pub loss: f64,
}

pub struct TrainOutcome {
    pub model: Net,
    /// Mean training loss over the last epoch.
    pub train_loss: f64,
    pub steps: usize,
}

/// Turns examples into a normalised `[batch, 1, rows, cols]` tensor and their labels.
pub fn batch(
    data: &ImageDataset,
    indices: &[usize],
    device: &Device,
) -> (Tensor<4>, Tensor<1, Int>) {
    let pixels = data.rows * data.cols;
    let mut x = Vec::with_capacity(indices.len() * pixels);
    for &i in indices {
        x.extend(
            data.image(i)
                .iter()
                .map(|&p| (p as f32 / 255.0 - PIXEL_MEAN) / PIXEL_STD),
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
/// `indices`.
pub fn train(
    mut model: Net,
    data: &ImageDataset,
    indices: &[usize],
    settings: &TrainSettings,
    device: &Device,
    on_progress: &mut dyn FnMut(&Progress),
) -> TrainOutcome {
    let mut optim = match settings.optimizer {
        OptimizerKind::Sgd => SgdConfig::new().init(),
        OptimizerKind::Adam => AdamConfig::new().init(),
    };
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let proximal =
        (settings.proximal_mu > 0.0).then(|| Proximal::new(&model, settings.proximal_mu));
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut order = indices.to_vec();
    let batch_size = settings.batch_size.max(1);
    let steps_per_epoch = order.len().div_ceil(batch_size);
    let (mut train_loss, mut steps) = (f64::NAN, 0);

    for epoch in 1..=settings.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for (step, chunk) in order.chunks(batch_size).enumerate() {
            let (images, labels) = batch(data, chunk, device);
            let logits = model.forward(images);
            let loss = loss_fn.forward(logits, labels);
            // The reported loss is the data loss; the proximal term only shapes the gradient.
            let loss_value = f64::from(loss.clone().into_scalar::<f32>());
            let loss = match proximal.as_ref().and_then(|p| p.penalty(&model)) {
                Some(term) => loss + term,
                None => loss,
            };
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(settings.lr, model, grads);

            loss_sum += loss_value * chunk.len() as f64;
            seen += chunk.len();
            steps += 1;
            on_progress(&Progress {
                epoch,
                epochs: settings.epochs,
                step: step + 1,
                steps_per_epoch,
                loss: loss_value,
            });
        }
        if seen > 0 {
            train_loss = loss_sum / seen as f64;
        }
    }
    TrainOutcome {
        model,
        train_loss,
        steps,
    }
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
    use crate::params;

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
            optimizer: OptimizerKind::Sgd,
            seed: 1,
            proximal_mu: mu,
        };
        let d = data();
        let idx: Vec<usize> = (0..d.len()).collect();
        let out = train(model, &d, &idx, &settings, &device, &mut |_| {});
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
