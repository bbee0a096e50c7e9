//! `fedtune-client bench-step`: times the local training step (forward, backward, optimiser
//! step, loss read back) of a built-in model on real images, or of a BERT (with LoRA) on token
//! sequences of a fixed length, to compare devices and against other frameworks.

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use fedtune_common::data::{Examples, TokenizedText};
use fedtune_common::models::{BertArch, LoraMode, LoraSpec, ModelSpec};

/// A 2-class BERT of `dir`'s architecture (LoRA of `lora_rank` on query and value, or none) and
/// 512 sequences of `seq_len` pseudo-random token ids.
pub fn bert_setup(
    dir: &Path,
    lora_rank: usize,
    seq_len: usize,
) -> anyhow::Result<(ModelSpec, TokenizedText)> {
    let arch = BertArch::from_hf_dir(dir).map_err(anyhow::Error::msg)?;
    let lora = (lora_rank > 0)
        .then(|| {
            LoraSpec::new(
                lora_rank,
                2.0 * lora_rank as f64,
                vec!["query".into(), "value".into()],
                LoraMode::FedIt,
            )
        })
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let spec = ModelSpec::parse(&arch.to_string(), 2)?.with_lora(lora)?;
    let mut x = 0x9E37_79B9u32;
    let ids = (0..512)
        .map(|_| {
            (0..seq_len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x % arch.vocab_size as u32
                })
                .collect()
        })
        .collect();
    let tokens = TokenizedText {
        ids,
        labels: (0..512).map(|i| (i % 2) as u8).collect(),
        pad_id: 0,
        source: "bench".into(),
    };
    Ok((spec, tokens))
}
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
