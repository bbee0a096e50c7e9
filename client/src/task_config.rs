//! A Train task's `TrainConfig` -> the local [`TrainSettings`], checked (a coordinator of
//! another version must not crash or mislead this client) and capped by this client's limits.

use anyhow::{Context, bail};
use fedtune_common::augment::Augment;
use fedtune_common::optim::OptimizerSettings;
use fedtune_common::train::TrainSettings;
use fedtune_proto as pb;
use tracing::info;

/// What this client allows at most, whatever the coordinator asks (e.g. for its memory).
#[derive(Debug, Clone, Copy, Default)]
pub struct Caps {
    pub max_batch_size: Option<usize>,
    pub max_epochs: Option<u32>,
}

/// The settings to train with and the dropout to build the model with.
pub fn settings_from(
    cfg: &pb::TrainConfig,
    caps: Caps,
    seed: u64,
    name: &str,
) -> anyhow::Result<(TrainSettings, f64)> {
    let finite_nonneg = |v: f64, what: &str| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            bail!("the coordinator sent {what} = {v}, which is not a number >= 0")
        }
    };
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        bail!(
            "the coordinator sent lr = {}, which is not a positive number",
            cfg.lr
        );
    }
    let dropout = finite_nonneg(cfg.dropout, "dropout")?;
    if dropout >= 1.0 {
        bail!("the coordinator sent dropout = {dropout}; it must be below 1");
    }
    let augment = cfg.augment.unwrap_or_default();
    let mut batch_size = cfg.batch_size.max(1) as usize;
    if let Some(max) = caps.max_batch_size
        && batch_size > max
    {
        info!("{name}: batch size {batch_size} asked, capped to {max} (--max-batch-size)");
        batch_size = max;
    }
    let mut epochs = cfg.local_epochs.max(1);
    if let Some(max) = caps.max_epochs
        && epochs > max
    {
        info!("{name}: {epochs} local epochs asked, capped to {max} (--max-epochs)");
        epochs = max;
    }
    let settings = TrainSettings {
        epochs,
        batch_size,
        lr: cfg.lr,
        optimizer: OptimizerSettings {
            kind: cfg.optimizer.parse().map_err(anyhow::Error::msg)?,
            momentum: finite_nonneg(cfg.momentum, "momentum")?,
            nesterov: cfg.nesterov,
            weight_decay: finite_nonneg(cfg.weight_decay, "weight_decay")?,
        },
        schedule: if cfg.lr_schedule.is_empty() {
            fedtune_common::optim::LrSchedule::Constant
        } else {
            cfg.lr_schedule
                .parse()
                .map_err(anyhow::Error::msg)
                .context("the coordinator's lr_schedule")?
        },
        warmup_steps: cfg.warmup_steps as usize,
        clip_norm: (finite_nonneg(cfg.clip_norm, "clip_norm")? > 0.0).then_some(cfg.clip_norm),
        augment: Augment {
            crop_padding: (augment.crop_padding as usize).min(8),
            flip: augment.flip,
            noise_std: finite_nonneg(augment.noise_std, "augment noise")? as f32,
        },
        early_stopping_patience: cfg.early_stopping_patience,
        frozen: cfg.frozen.clone(),
        seed,
        proximal_mu: finite_nonneg(cfg.proximal_mu, "proximal_mu")?,
        proximal_anchor: None,
        correction: None,
        max_steps: None,
    };
    Ok((settings, dropout))
}

/// Local DP a Train task asks for: (clip, noise standard deviation), `None` when off. A task
/// that asks for noise without a bound, or for values that are not numbers, is refused: the
/// update must never leave without the protection the run promises.
pub fn local_dp_from(cfg: &pb::TrainConfig) -> anyhow::Result<Option<(f64, f64)>> {
    let (clip, sigma) = (cfg.dp_clip_norm, cfg.dp_noise_stddev);
    if !(clip.is_finite() && clip >= 0.0 && sigma.is_finite() && sigma >= 0.0) {
        bail!(
            "the coordinator asked for local DP with clip {clip} and noise {sigma}: both must be numbers >= 0; the update is not sent"
        );
    }
    match (clip > 0.0, sigma > 0.0) {
        (false, false) => Ok(None),
        (true, _) => Ok(Some((clip, sigma))),
        (false, true) => bail!(
            "the coordinator asked for local DP noise {sigma} without a clipping bound; the update is not sent"
        ),
    }
}
