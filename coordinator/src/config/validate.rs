//! Every `serve` value checked once, naming the key and what it must be.

use anyhow::{Context, bail};
use fedtune_common::optim::OptimizerKind;

use crate::strategy::StrategyKind;

use super::ServeConfig;

impl ServeConfig {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.rounds == 0 {
            bail!("`rounds` must be at least 1");
        }
        self.validate_policy()?;
        self.validate_strategy()?;
        self.validate_recipe()?;
        if self.personalize_steps > 0 && self.strategy.fraction_evaluate <= 0.0 {
            bail!(
                "`personalize_steps` = {} reports personalised figures in federated evaluation, which is off: set `fraction_evaluate` (--fraction-evaluate) above 0",
                self.personalize_steps
            );
        }
        if !(self.ditto_lambda.is_finite() && self.ditto_lambda >= 0.0) {
            bail!(
                "`ditto_lambda` = {} must be a number >= 0 (0: off)",
                self.ditto_lambda
            );
        }
        if self.ditto_lambda > 0.0 && self.personalize_steps == 0 {
            bail!(
                "`ditto_lambda` = {} trains each client's personal model during personalisation, which is off: set `personalize_steps` (--personalize-steps) above 0",
                self.ditto_lambda
            );
        }
        if self.local_epochs == 0 {
            bail!("`local_epochs` must be at least 1");
        }
        if self.batch_size == 0 {
            bail!("`batch_size` must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("`lr` must be a positive number, got {}", self.lr);
        }
        if let Some(init) = &self.init
            && !init.is_file()
            && self.hf_init.is_none()
        {
            bail!("`init`: {} is not a file", init.display());
        }
        if self.eval_data.is_some() && self.model.kind.is_synthetic() {
            bail!(
                "`eval_data` cannot be used with a synthetic model (it has no architecture to evaluate)"
            );
        }
        if let Some(eval) = &self.eval_data
            && !eval.exists()
        {
            bail!(
                "`eval_data`: {} does not exist (give an IDX folder, an image folder, a CSV file, or for text a CSV/TSV/JSONL file)",
                eval.display()
            );
        }
        Ok(())
    }

    fn validate_recipe(&self) -> anyhow::Result<()> {
        let o = &self.optimizer;
        if !(o.momentum.is_finite() && (0.0..1.0).contains(&o.momentum)) {
            bail!("`momentum` must be in [0, 1), got {}", o.momentum);
        }
        if o.momentum > 0.0 && o.kind != OptimizerKind::Sgd {
            bail!(
                "`momentum` applies to `optimizer = sgd` only (adam and adamw have their own moments)"
            );
        }
        if o.nesterov && !(o.kind == OptimizerKind::Sgd && o.momentum > 0.0) {
            bail!("`nesterov` needs `optimizer = sgd` with `momentum` > 0");
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            bail!("`weight_decay` must be 0 or more, got {}", o.weight_decay);
        }
        if !(self.lr_round_decay.is_finite()
            && self.lr_round_decay > 0.0
            && self.lr_round_decay <= 1.0)
        {
            bail!(
                "`lr_round_decay` must be in (0, 1], got {}",
                self.lr_round_decay
            );
        }
        if !(self.clip_norm.is_finite() && self.clip_norm >= 0.0) {
            bail!(
                "`clip_norm` must be 0 (off) or a positive number, got {}",
                self.clip_norm
            );
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            bail!("`dropout` must be in [0, 1), got {}", self.dropout);
        }
        let a = &self.augment;
        if a.crop_padding > 8 {
            bail!(
                "`augment_crop_padding` must be at most 8 pixels, got {}",
                a.crop_padding
            );
        }
        if !(a.noise_std.is_finite() && (0.0..=1.0).contains(&a.noise_std)) {
            bail!("`augment_noise` must be in [0, 1], got {}", a.noise_std);
        }
        if !self.frozen.is_empty() && self.model.kind.is_synthetic() {
            bail!("`freeze` needs a built-in model with an architecture");
        }
        Ok(())
    }

    fn validate_policy(&self) -> anyhow::Result<()> {
        let p = &self.policy;
        if p.min_available_clients == 0 {
            bail!("`min_available_clients` must be at least 1");
        }
        if p.round_timeout.is_zero() {
            bail!("`round_timeout` must be longer than zero");
        }
        if p.available_timeout.is_zero() {
            bail!("`available_timeout` must be longer than zero");
        }
        if p.grace_period.is_some_and(|g| g >= p.round_timeout) {
            bail!(
                "`grace_period` ({}) must be shorter than `round_timeout` ({})",
                humantime::format_duration(p.grace_period.unwrap_or_default()),
                humantime::format_duration(p.round_timeout)
            );
        }
        Ok(())
    }

    fn validate_strategy(&self) -> anyhow::Result<()> {
        let s = &self.strategy;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let unit = |v: f64| v.is_finite() && (0.0..1.0).contains(&v);
        if !(positive(s.fraction_fit) && s.fraction_fit <= 1.0) {
            bail!("`fraction_fit` must be in (0, 1], got {}", s.fraction_fit);
        }
        if !(unit(s.fraction_evaluate) || s.fraction_evaluate == 1.0) {
            bail!(
                "`fraction_evaluate` must be in [0, 1] (0 turns federated evaluation off), got {}",
                s.fraction_evaluate
            );
        }
        if s.min_fit_clients == 0 || s.min_evaluate_clients == 0 || s.evaluate_every == 0 {
            bail!(
                "`min_fit_clients`, `min_evaluate_clients` and `evaluate_every` must be at least 1"
            );
        }
        if !positive(s.server_lr) {
            bail!("`server_lr` must be a positive number, got {}", s.server_lr);
        }
        if !unit(s.server_momentum) {
            bail!(
                "`server_momentum` must be in [0, 1), got {}",
                s.server_momentum
            );
        }
        if !unit(s.beta1) || !unit(s.beta2) {
            bail!(
                "`beta1` and `beta2` must be in [0, 1), got {} and {}",
                s.beta1,
                s.beta2
            );
        }
        if !positive(s.tau) {
            bail!("`tau` must be a positive number, got {}", s.tau);
        }
        if !(s.proximal_mu.is_finite() && s.proximal_mu >= 0.0) {
            bail!("`proximal_mu` must be 0 or more, got {}", s.proximal_mu);
        }
        if s.kind == StrategyKind::FedProx && s.proximal_mu == 0.0 {
            bail!("`strategy = fedprox` needs `proximal_mu` > 0 (with 0 it is fedavg)");
        }
        if !(s.trim_fraction.is_finite() && (0.0..0.5).contains(&s.trim_fraction)) {
            bail!(
                "`trim_fraction` must be in [0, 0.5), got {}",
                s.trim_fraction
            );
        }
        if s.kind == StrategyKind::Scaffold {
            self.validate_scaffold()?;
        }
        if s.kind == StrategyKind::MultiKrum && s.krum_m == 1 {
            tracing::warn!("multi-krum with `krum_m = 1` is krum");
        }
        if matches!(s.kind, StrategyKind::Krum | StrategyKind::MultiKrum) {
            let needed = s.krum_f + 3;
            if self.policy.min_available_clients.max(s.min_fit_clients) < needed {
                bail!(
                    "{} with `krum_f = {}` needs at least {needed} updates per round: set `min_fit_clients` (and `min_available_clients`) to {needed} or more",
                    s.kind,
                    s.krum_f
                );
            }
        }
        Ok(())
    }
}

/// A size in MiB as bytes, refused where it does not fit (a shift would drop the high bits).
impl ServeConfig {
    /// SCAFFOLD's client and server variates move by the same update: the client derives its
    /// new variate from the delta it computed, the server from the delta it received.
    fn validate_scaffold(&self) -> anyhow::Result<()> {
        if self.privacy.is_some() {
            bail!(
                "--strategy scaffold cannot run with --dp: noise on the updates would make the server's control variate drift from the clients' own; use fedavg, fedprox or fednova with DP"
            );
        }
        if self.compression.up != fedtune_common::codec::Codec::F32 {
            bail!(
                "--strategy scaffold needs updates sent exactly (--compress-up f32), got `{}`: a lossy update would make the server's control variate drift from the clients' own",
                self.compression.up
            );
        }
        if self.optimizer.kind != OptimizerKind::Sgd {
            tracing::warn!(
                "--strategy scaffold with --optimizer {}: the correction c - c_i shifts every gradient before the optimiser, and the variates are estimated from the update as if the steps were SGD's; the paper analyses SGD (--optimizer sgd)",
                self.optimizer.kind
            );
        }
        Ok(())
    }
}

pub(super) fn mib_to_bytes(key: &str, mib: u64) -> anyhow::Result<u64> {
    mib.checked_mul(1 << 20).with_context(|| {
        format!("`{key}` = {mib} MiB is more than this machine can address: give a size in MiB")
    })
}
