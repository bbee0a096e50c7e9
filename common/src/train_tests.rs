//! The training loop against hand-computed update rules.
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
    outcome(start, settings).model.extract().unwrap()
}

fn outcome(start: &TensorSet, settings: TrainSettings) -> TrainOutcome {
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
    train(model, &d, &idx, &[], &settings, &device, &mut |_| {}).unwrap()
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

#[test]
fn an_anchored_proximal_term_pulls_towards_the_anchor_not_the_start() {
    // Ditto: the personal model v trains with λ/2·‖v − w‖² towards the global model w.
    let spec = ModelSpec::parse("mlp", 4).unwrap();
    let (v, w) = (spec.init_weights(5).unwrap(), spec.init_weights(6).unwrap());
    let g = gradient(&v);
    let (lr, lambda) = (0.1, 0.5);
    let after = run(
        &v,
        TrainSettings {
            lr,
            optimizer: sgd(),
            proximal_mu: lambda,
            proximal_anchor: Some(w.clone()),
            ..Default::default()
        },
    );
    let want: Vec<f64> = flat(&v)
        .iter()
        .zip(&g)
        .zip(flat(&w))
        .map(|((v, g), w)| v - lr * (g + lambda * (v - w)))
        .collect();
    assert_close(&flat(&after), &want, 1e-5, "v − η(g + λ(v − w))");
}

#[test]
fn scaffold_correction_shifts_every_sgd_step_by_c_minus_ci() {
    let w0 = ModelSpec::parse("mlp", 4).unwrap().init_weights(5).unwrap();
    let g0 = gradient(&w0);
    // c − cᵢ: a pattern of the same size as the gradient.
    let mut correction = w0.clone();
    let mut i = 0.0f32;
    for (_, v) in correction.values_mut() {
        for x in v {
            i += 1.0;
            *x = 0.01 * (i * 0.37).sin();
        }
    }
    let d = flat(&correction);
    let lr = 0.1;
    let after = run(
        &w0,
        TrainSettings {
            lr,
            optimizer: sgd(),
            correction: Some(correction),
            ..Default::default()
        },
    );
    let want: Vec<f64> = flat(&w0)
        .iter()
        .zip(&g0)
        .zip(&d)
        .map(|((w, g), c)| w - lr * (g + c))
        .collect();
    assert_close(&flat(&after), &want, 1e-5, "w − η(g − cᵢ + c)");
}

#[test]
fn step_weight_adds_each_steps_rate_with_momentum_carrying_earlier_gradients() {
    let w0 = ModelSpec::parse("mlp", 4).unwrap().init_weights(5).unwrap();
    // 3 full-batch steps at lr 0.1.
    let weight = |optimizer| {
        let settings = TrainSettings {
            epochs: 3,
            lr: 0.1,
            optimizer,
            ..Default::default()
        };
        outcome(&w0, settings).step_weight
    };
    let cases = [
        (optimizer(OptimizerKind::Sgd, 0.0, false, 0.0), 0.3),
        // m = 1, 1.9, 2.71
        (
            optimizer(OptimizerKind::Sgd, 0.9, false, 0.0),
            0.1 * (1.0 + 1.9 + 2.71),
        ),
        // (1 + ρm) for m = 1, 1.9, 2.71
        (
            optimizer(OptimizerKind::Sgd, 0.9, true, 0.0),
            0.1 * (1.9 + 2.71 + 3.439),
        ),
        (optimizer(OptimizerKind::Adam, 0.0, false, 0.0), 0.3),
    ];
    for (opt, want) in cases {
        let got = weight(opt);
        assert!((got - want).abs() < 1e-9, "{opt:?}: {got}, want {want}");
    }
}

#[test]
fn max_steps_stops_training_within_an_epoch() {
    let w0 = ModelSpec::parse("mlp", 4).unwrap().init_weights(5).unwrap();
    let spec = ModelSpec::parse("mlp", 4).unwrap();
    let device = Device::flex().autodiff();
    let model = spec.build(&device).unwrap().inject(&w0).unwrap();
    let d = data();
    let idx: Vec<usize> = (0..d.len()).collect();
    // 64 examples in batches of 8: 8 steps an epoch; 3 epochs asked, 11 steps allowed.
    let settings = TrainSettings {
        epochs: 3,
        batch_size: 8,
        max_steps: Some(11),
        ..Default::default()
    };
    let out = train(model, &d, &idx, &[], &settings, &device, &mut |_| {}).unwrap();
    assert_eq!((out.steps, out.epochs_run), (11, 2));
}
