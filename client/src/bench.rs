//! `fedtune-client bench-step`: times the local training step (forward, backward, optimiser
//! step, loss read back) of a built-in model on real images, to compare devices and against
//! other frameworks.

use std::time::Instant;

use burn::tensor::Device;
use fedtune_common::data::Examples;
use fedtune_common::models::ModelSpec;
use fedtune_common::train::{self, TrainSettings};

pub struct StepTiming {
    pub batch_size: usize,
    pub steps: usize,
    pub mean_ms: f64,
}

/// Runs `warmup` then `steps` optimiser steps at `batch_size` and returns the mean step time.
pub fn time_steps(
    spec: &ModelSpec,
    data: &dyn Examples,
    batch_size: usize,
    warmup: usize,
    steps: usize,
    device: &Device,
) -> anyhow::Result<StepTiming> {
    let autodiff = device.clone().autodiff();
    autodiff.seed(0);
    let mut model = spec.build(&autodiff)?;
    let frozen = spec.lora_frozen();
    let settings = |n: usize| TrainSettings {
        batch_size,
        seed: n as u64,
        frozen: frozen.clone(),
        ..Default::default()
    };
    let indices = |n: usize| {
        (0..n * batch_size)
            .map(|i| i % data.len())
            .collect::<Vec<_>>()
    };
    model = train::train(
        model,
        data,
        &indices(warmup.max(1)),
        &[],
        &settings(warmup),
        &autodiff,
        &mut |_| {},
    )?
    .model;
    let started = Instant::now();
    let outcome = train::train(
        model,
        data,
        &indices(steps),
        &[],
        &settings(steps),
        &autodiff,
        &mut |_| {},
    )?;
    let elapsed = started.elapsed();
    Ok(StepTiming {
        batch_size,
        steps: outcome.steps,
        mean_ms: elapsed.as_secs_f64() * 1e3 / outcome.steps.max(1) as f64,
    })
}
