//! The differential-privacy part of `serve` settings (`--dp` and its parameters), checked
//! against the rest of the run: combinations the accountant cannot account for are refused.

use anyhow::bail;
use clap::Args;

use crate::strategy::StrategySettings;
use crate::strategy::dp::{ClipRule, DpMode, DpSettings};

use super::RoundPolicy;

/// Flags for differential privacy (TOML keys: the same with `_`).
#[derive(Debug, Clone, Default, Args)]
pub struct PrivacyArgs {
    /// Differential privacy: off, central (the coordinator clips each update, adds Gaussian
    /// noise to the sum; clients are Poisson-sampled at --fraction-fit) or local (each client
    /// clips and noises its own update before upload) [default: off].
    #[arg(long)]
    pub dp: Option<String>,
    /// L2 bound C on each update, or `adaptive` (central DP: C follows a quantile of the
    /// updates' norms).
    #[arg(long)]
    pub dp_clip: Option<String>,
    /// Noise multiplier z: the noise's standard deviation is z·C (on the sum, central; on each
    /// update, local).
    #[arg(long)]
    pub dp_noise_multiplier: Option<f64>,
    /// Adaptive clipping: the starting bound C₀ [default: 0.1].
    #[arg(long)]
    pub dp_clip_initial: Option<f64>,
    /// Adaptive clipping: the fraction γ of updates meant to fall under the bound [default: 0.5].
    #[arg(long)]
    pub dp_target_quantile: Option<f64>,
    /// Adaptive clipping: geometric learning rate η of the bound [default: 0.2].
    #[arg(long)]
    pub dp_clip_lr: Option<f64>,
    /// Adaptive clipping: standard deviation σ_b of the noise on the count of unclipped updates
    /// [default: expected clients per round / 20]; must exceed z/2.
    #[arg(long)]
    pub dp_clipped_count_stddev: Option<f64>,
    /// δ of the (ε, δ) guarantee [default: min(1/N², 1e-5), N = clients live when the first round opens].
    #[arg(long)]
    pub dp_delta: Option<f64>,
    /// End the run before a round would take ε above this [default: no limit].
    #[arg(long)]
    pub dp_max_epsilon: Option<f64>,
}

/// The same keys from the TOML file.
#[derive(Debug, Clone, Default)]
pub struct PrivacyFile {
    pub dp: Option<String>,
    pub dp_clip: Option<String>,
    pub dp_noise_multiplier: Option<f64>,
    pub dp_clip_initial: Option<f64>,
    pub dp_target_quantile: Option<f64>,
    pub dp_clip_lr: Option<f64>,
    pub dp_clipped_count_stddev: Option<f64>,
    pub dp_delta: Option<f64>,
    pub dp_max_epsilon: Option<f64>,
}

/// Flags over the file; `None` when DP is off (and then no `dp_*` key may be set).
pub fn resolve(
    args: &PrivacyArgs,
    file: &PrivacyFile,
    strategy: &StrategySettings,
    policy: &RoundPolicy,
) -> anyhow::Result<Option<DpSettings>> {
    let mode = args.dp.clone().or(file.dp.clone());
    let clip = args.dp_clip.clone().or(file.dp_clip.clone());
    let z = args.dp_noise_multiplier.or(file.dp_noise_multiplier);
    let initial = args.dp_clip_initial.or(file.dp_clip_initial);
    let quantile = args.dp_target_quantile.or(file.dp_target_quantile);
    let lr = args.dp_clip_lr.or(file.dp_clip_lr);
    let count_stddev = args
        .dp_clipped_count_stddev
        .or(file.dp_clipped_count_stddev);
    let delta = args.dp_delta.or(file.dp_delta);
    let max_epsilon = args.dp_max_epsilon.or(file.dp_max_epsilon);

    let mode = match mode.as_deref().unwrap_or("off") {
        "off" => {
            let set: Vec<&str> = [
                ("dp_clip", clip.is_some()),
                ("dp_noise_multiplier", z.is_some()),
                ("dp_clip_initial", initial.is_some()),
                ("dp_target_quantile", quantile.is_some()),
                ("dp_clip_lr", lr.is_some()),
                ("dp_clipped_count_stddev", count_stddev.is_some()),
                ("dp_delta", delta.is_some()),
                ("dp_max_epsilon", max_epsilon.is_some()),
            ]
            .into_iter()
            .filter_map(|(k, on)| on.then_some(k))
            .collect();
            if !set.is_empty() {
                bail!(
                    "`{}` set but differential privacy is off: add --dp central or --dp local (or remove them)",
                    set.join("`, `")
                );
            }
            return Ok(None);
        }
        "central" => DpMode::Central,
        "local" => DpMode::Local,
        other => bail!("invalid `dp` `{other}`: use off, central or local"),
    };
    let positive = |v: f64, key: &str| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            bail!("`{key}` must be a positive number, got {v}")
        }
    };
    let Some(z) = z else {
        bail!(
            "--dp {} needs `dp_noise_multiplier` (z: noise standard deviation over the clipping bound; `fedtune-coordinator dp-plan` finds the z for a target ε)",
            mode.name()
        );
    };
    let z = positive(z, "dp_noise_multiplier")?;
    let clip = match clip.as_deref() {
        None => bail!(
            "--dp {} needs `dp_clip`: an L2 bound on each update (e.g. 1.0) or `adaptive`",
            mode.name()
        ),
        Some("adaptive") => {
            if mode == DpMode::Local {
                bail!(
                    "`dp_clip = adaptive` works with --dp central only: the bound is learnt from a noised count of the updates the coordinator clipped; give local DP a fixed bound"
                );
            }
            let quantile = quantile.unwrap_or(0.5);
            if !(quantile > 0.0 && quantile < 1.0) {
                bail!("`dp_target_quantile` must be in (0, 1), got {quantile}");
            }
            ClipRule::Adaptive {
                initial: positive(initial.unwrap_or(0.1), "dp_clip_initial")?,
                target_quantile: quantile,
                lr: positive(lr.unwrap_or(0.2), "dp_clip_lr")?,
                count_stddev: count_stddev
                    .map(|s| positive(s, "dp_clipped_count_stddev"))
                    .transpose()?,
            }
        }
        Some(c) => {
            let c: f64 = c.parse().map_err(|_| {
                anyhow::anyhow!("invalid `dp_clip` `{c}`: give a positive number or `adaptive`")
            })?;
            for (key, set) in [
                ("dp_clip_initial", initial.is_some()),
                ("dp_target_quantile", quantile.is_some()),
                ("dp_clip_lr", lr.is_some()),
                ("dp_clipped_count_stddev", count_stddev.is_some()),
            ] {
                if set {
                    bail!("`{key}` applies to `dp_clip = adaptive` only");
                }
            }
            ClipRule::Fixed(positive(c, "dp_clip")?)
        }
    };
    if let Some(d) = delta
        && !(d > 0.0 && d < 1.0)
    {
        bail!(
            "`dp_delta` must be in (0, 1), got {d} (a common choice is below 1/N² for N clients)"
        );
    }
    if let Some(e) = max_epsilon {
        positive(e, "dp_max_epsilon")?;
    }
    if mode == DpMode::Central {
        check_central(strategy, policy, z, &clip)?;
    }
    Ok(Some(DpSettings {
        mode,
        clip,
        noise_multiplier: z,
        sample_rate: strategy.fraction_fit,
        delta,
        max_epsilon,
    }))
}

/// Central DP's guarantee holds for a sum of clipped updates over a Poisson sample that is
/// released whatever arrives; refuse what would break that.
fn check_central(
    strategy: &StrategySettings,
    policy: &RoundPolicy,
    z: f64,
    clip: &ClipRule,
) -> anyhow::Result<()> {
    if let Some(why) = strategy.kind.why_not_a_sum() {
        bail!(
            "--dp central cannot wrap `{}`: {why}, and the noise is calibrated to one client's share of a sum; use fedavg, fedavgm, fedadam, fedyogi, fedadagrad or fedprox, or --dp local (robust rules are post-processing of locally noised updates)",
            strategy.kind
        );
    }
    if strategy.min_fit_clients > 1 {
        bail!(
            "--dp central samples each client with probability --fraction-fit (Poisson) and releases every round whatever arrives, as the accountant assumes; `min_fit_clients` = {} cannot be honoured: leave it at 1 and use `min_available_clients` to wait for enough clients before a round",
            strategy.min_fit_clients
        );
    }
    if !policy.accept_failures {
        bail!(
            "--dp central releases every round with whatever updates arrive (the accountant assumes it); `accept_failures = false` would fail rounds instead: set it to true"
        );
    }
    if let ClipRule::Adaptive {
        count_stddev: None, ..
    } = clip
    {
        // σ_b defaults to m/20, m = q·N ≥ q·min_available_clients; z_Δ needs 2σ_b > z.
        let fewest = strategy.fraction_fit * policy.min_available_clients as f64;
        if fewest / 10.0 <= z {
            bail!(
                "adaptive clipping with noise multiplier {z}: the clipped-count noise defaults to (expected clients per round)/20 = {:.3} with {} clients at --fraction-fit {}, and must exceed z/2 = {:.3}; set `dp_clipped_count_stddev` above {:.3}, or run with more clients per round",
                fewest / 20.0,
                policy.min_available_clients,
                strategy.fraction_fit,
                z / 2.0,
                z / 2.0
            );
        }
    }
    Ok(())
}
