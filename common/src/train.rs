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
use crate::metrics::{ClassificationMetrics, ConfusionMatrix};
use crate::models::{InputMismatch, Model};
pub use crate::optim::OptimizerKind;
use crate::optim::{LrSchedule, OptimizerSettings, scheduled_lr};

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
) -> Result<TrainOutcome, InputMismatch> {
    let mut model = model.set_frozen(&settings.frozen);
    let mut optim = settings.optimizer.init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let proximal = (settings.proximal_mu > 0.0).then(|| model.proximal(settings.proximal_mu));
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
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        let mut lr = settings.lr;
        for (step, chunk) in order.chunks(batch_size).enumerate() {
            let (input, labels) = data.batch(chunk, device, Some((&settings.augment, &mut rng)));
            let logits = model.forward(input)?;
            let loss = loss_fn.forward(logits, labels);
            // The reported loss is the data loss; the proximal term only shapes the gradient.
            let loss_value = f64::from(loss.clone().into_scalar::<f32>());
            let loss = match proximal.as_ref().and_then(|p| model.penalty(p)) {
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
    })
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("reading predictions back from the device failed: {0}")]
    Read(String),
    #[error(transparent)]
    Input(#[from] InputMismatch),
}

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
    model: &Model,
    data: &dyn Examples,
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
        let (input, labels) = data.batch(chunk, device, None);
        let logits = model.forward(input)?;
        let loss = loss_fn.forward(logits.clone(), labels);
        loss_sum += f64::from(loss.into_scalar::<f32>()) * chunk.len() as f64;
        let predicted = logits
            .argmax(1)
            .into_data()
            .try_into_vec_as::<i64>()
            .map_err(|e| EvalError::Read(format!("{e:?}")))?;
        for (&i, &p) in chunk.iter().zip(&predicted) {
            confusion.add(data.label(i), p.max(0) as usize);
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
    use crate::data::ImageDataset;
    use crate::models::ModelSpec;
    use crate::tensors::TensorSet;

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
            tabular: None,
        }
    }

    /// ‖w − w₀‖ after a few SGD steps with proximal μ.
    fn drift(mu: f64) -> f64 {
        let spec = ModelSpec::parse("mlp", 4).unwrap();
        let device = Device::flex().autodiff();
        device.seed(3);
        let start = spec.init_weights(3).unwrap();
        let model = spec.build(&device).unwrap().inject(&start).unwrap();
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
        let out = train(model, &d, &idx, &[], &settings, &device, &mut |_| {}).unwrap();
        let end = out.model.extract().unwrap();
        let delta = end.delta_from(&start).unwrap();
        delta
            .tensors()
            .iter()
            .flat_map(|t| t.data.iter())
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    /// Trains the 4-class MLP (no dropout) from `start` for `epochs` epochs of one full batch.
    fn run(start: &TensorSet, settings: TrainSettings) -> TensorSet {
        let spec = ModelSpec::parse("mlp", 4).unwrap();
        let device = Device::flex().autodiff();
        let model = spec
            .build_with_dropout(&device, 0.0)
            .unwrap()
            .inject(start)
            .unwrap();
        let d = data();
        let idx: Vec<usize> = (0..d.len()).collect();
        let settings = TrainSettings {
            batch_size: d.len(),
            ..settings
        };
        train(model, &d, &idx, &[], &settings, &device, &mut |_| {})
            .unwrap()
            .model
            .extract()
            .unwrap()
    }

    fn flat(set: &TensorSet) -> Vec<f64> {
        set.tensors()
            .iter()
            .flat_map(|t| t.data.iter().map(|&v| f64::from(v)))
            .collect()
    }

    fn optimizer(kind: OptimizerKind, momentum: f64, nesterov: bool, wd: f64) -> OptimizerSettings {
        OptimizerSettings {
            kind,
            momentum,
            nesterov,
            weight_decay: wd,
        }
    }

    /// The full-batch gradient at `w`: one SGD step with lr 1 moves by −g.
    fn gradient(w: &TensorSet) -> Vec<f64> {
        let after = run(
            w,
            TrainSettings {
                lr: 1.0,
                optimizer: sgd(),
                ..Default::default()
            },
        );
        flat(w)
            .iter()
            .zip(flat(&after))
            .map(|(a, b)| a - b)
            .collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        assert!(worst <= tol, "{what}: off by up to {worst}");
    }

    #[test]
    fn each_optimiser_moves_the_weights_as_its_update_rule_says() {
        let w0 = ModelSpec::parse("mlp", 4).unwrap().init_weights(5).unwrap();
        let x0 = flat(&w0);
        let g0 = gradient(&w0);
        assert!(g0.iter().any(|g| g.abs() > 1e-3), "a real gradient");
        let step = |opt, lr, epochs| {
            let w = run(
                &w0,
                TrainSettings {
                    lr,
                    epochs,
                    optimizer: opt,
                    ..Default::default()
                },
            );
            flat(&w)
                .iter()
                .zip(&x0)
                .map(|(a, b)| a - b)
                .collect::<Vec<f64>>()
        };
        let lr = 0.01;
        // SGD: Δ = −η·g.
        let want: Vec<f64> = g0.iter().map(|g| -lr * g).collect();
        assert_close(&step(sgd(), lr, 1), &want, 1e-6, "sgd");
        // SGD + weight decay λ: Δ = −η·(g + λ·w).
        let want: Vec<f64> = g0
            .iter()
            .zip(&x0)
            .map(|(g, w)| -lr * (g + 0.1 * w))
            .collect();
        assert_close(
            &step(optimizer(OptimizerKind::Sgd, 0.0, false, 0.1), lr, 1),
            &want,
            1e-6,
            "sgd + weight decay",
        );
        // Nesterov, first step: v = g; Δ = −η·(g + μ·v) = −η·(1 + μ)·g.
        let want: Vec<f64> = g0.iter().map(|g| -lr * 1.9 * g).collect();
        assert_close(
            &step(optimizer(OptimizerKind::Sgd, 0.9, true, 0.0), lr, 1),
            &want,
            1e-6,
            "nesterov",
        );
        // Momentum, two steps: Δ = −η·g₀ − η·(μ·g₀ + g₁), g₁ the gradient after the first step.
        let w1 = run(
            &w0,
            TrainSettings {
                lr,
                optimizer: sgd(),
                ..Default::default()
            },
        );
        let g1 = gradient(&w1);
        let want: Vec<f64> = g0
            .iter()
            .zip(&g1)
            .map(|(a, b)| -lr * a - lr * (0.9 * a + b))
            .collect();
        assert_close(
            &step(optimizer(OptimizerKind::Sgd, 0.9, false, 0.0), lr, 2),
            &want,
            1e-6,
            "momentum",
        );
        // Adam, first step: m̂ = g, v̂ = g², so Δ ≈ −η·sign(g) where |g| ≫ ε.
        let lr = 1e-3;
        let adam = step(optimizer(OptimizerKind::Adam, 0.0, false, 0.0), lr, 1);
        let adamw = step(optimizer(OptimizerKind::AdamW, 0.0, false, 0.5), lr, 1);
        let mut checked = 0;
        for i in 0..g0.len() {
            if g0[i].abs() > 1e-3 {
                assert!(
                    (adam[i] + lr * g0[i].signum()).abs() < lr * 0.02,
                    "adam at {i}"
                );
                // AdamW also decays the weight itself: −η·λ·w on top.
                let want = -lr * g0[i].signum() - lr * 0.5 * x0[i];
                assert!((adamw[i] - want).abs() < lr * 0.03, "adamw at {i}");
                checked += 1;
            }
        }
        assert!(checked > 100);
    }

    #[test]
    fn schedules_and_clipping_change_the_steps() {
        let w0 = ModelSpec::parse("mlp", 4).unwrap().init_weights(5).unwrap();
        let x0 = flat(&w0);
        let g0 = gradient(&w0);
        let norm = g0.iter().map(|g| g * g).sum::<f64>().sqrt();
        let moved = |settings: TrainSettings| -> Vec<f64> {
            let w = run(&w0, settings);
            flat(&w).iter().zip(&x0).map(|(a, b)| a - b).collect()
        };
        // Clipping to half the gradient's norm halves the first SGD step.
        let clipped = moved(TrainSettings {
            lr: 0.01,
            optimizer: sgd(),
            clip_norm: Some(norm / 2.0),
            ..Default::default()
        });
        let want: Vec<f64> = g0.iter().map(|g| -0.01 * g / 2.0).collect();
        assert_close(&clipped, &want, 1e-6, "clipping");
        // Warm-up over 4 steps: the first step runs at a quarter of the rate.
        let warm = moved(TrainSettings {
            lr: 0.01,
            optimizer: sgd(),
            warmup_steps: 4,
            ..Default::default()
        });
        let want: Vec<f64> = g0.iter().map(|g| -0.0025 * g).collect();
        assert_close(&warm, &want, 1e-6, "warm-up");
        // step:1:0 stops learning after the first epoch: 3 epochs move like 1.
        let one = moved(TrainSettings {
            lr: 0.01,
            optimizer: sgd(),
            ..Default::default()
        });
        let stepped = moved(TrainSettings {
            lr: 0.01,
            epochs: 3,
            optimizer: sgd(),
            schedule: LrSchedule::Step {
                every_epochs: 1,
                gamma: 1e-12,
            },
            ..Default::default()
        });
        assert_close(&stepped, &one, 1e-6, "step schedule");
    }

    #[test]
    fn frozen_tensors_do_not_move_and_early_stopping_keeps_the_best() {
        let w0 = ModelSpec::parse("mlp", 4).unwrap().init_weights(5).unwrap();
        let w = run(
            &w0,
            TrainSettings {
                lr: 0.05,
                epochs: 2,
                optimizer: sgd(),
                frozen: vec!["fc1.weight".into(), "fc1.bias".into()],
                ..Default::default()
            },
        );
        assert_eq!(
            w.get("fc1.weight"),
            w0.get("fc1.weight"),
            "frozen: bit-identical"
        );
        assert_eq!(w.get("fc1.bias"), w0.get("fc1.bias"));
        assert_ne!(w.get("fc2.weight"), w0.get("fc2.weight"), "the head trains");

        // A huge learning rate makes validation loss worse after the first epoch: with
        // patience 1, training stops early and keeps the first epoch's weights.
        let spec = ModelSpec::parse("mlp", 4).unwrap();
        let device = Device::flex().autodiff();
        let model = spec
            .build_with_dropout(&device, 0.0)
            .unwrap()
            .inject(&w0)
            .unwrap();
        let d = data();
        let (train_idx, val_idx): (Vec<usize>, Vec<usize>) = (0..d.len()).partition(|i| i % 4 != 0);
        let mut validations = 0;
        let out = train(
            model,
            &d,
            &train_idx,
            &val_idx,
            &TrainSettings {
                lr: 5.0,
                epochs: 8,
                batch_size: 8,
                optimizer: sgd(),
                early_stopping_patience: 1,
                ..Default::default()
            },
            &device,
            &mut |p| validations += usize::from(p.validation.is_some()),
        )
        .unwrap();
        assert!(out.stopped_early, "ran {} epochs", out.epochs_run);
        assert!(out.epochs_run < 8);
        assert_eq!(validations, out.epochs_run as usize);
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
