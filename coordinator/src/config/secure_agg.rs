//! The secure-aggregation part of `serve` settings (`--secure-aggregation` and its
//! parameters), checked against the strategy and differential privacy.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use fedtune_common::secagg::quantize::Quantizer;

use crate::strategy::StrategySettings;
use crate::strategy::dp::{DpMode, DpSettings};

/// Flags for secure aggregation (TOML keys: the same with `_`).
#[derive(Debug, Clone, Default, Args)]
pub struct SecureAggArgs {
    /// Secure aggregation (SecAgg+): clients mask their updates so that the coordinator only
    /// learns their sum [default: off].
    #[arg(long)]
    pub secure_aggregation: bool,
    /// Shares needed to rebuild a client's mask secrets (t), of the k + 1 made (one per
    /// neighbour, one kept): up to k + 1 − t of a client's neighbours may drop out and the sum
    /// is still unmasked; with more the round fails [default: ⌊2(k + 1)/3⌋ + 1; with every
    /// client a neighbour, n − t of the round's n clients may drop].
    #[arg(long)]
    pub secagg_threshold: Option<usize>,
    /// Neighbours k each client shares its secrets with and masks against (SecAgg+'s sparse
    /// graph; cost per client grows with k, not with the clients per round) [default: all the
    /// other clients of the round].
    #[arg(long)]
    pub secagg_neighbours: Option<usize>,
    /// Each update value (times the client's weight) is clipped to [−clip, clip] before it is
    /// quantised; clients report how many values were clipped [default: 1.0].
    #[arg(long)]
    pub secagg_clip: Option<f64>,
    /// Quantisation bits per value, 1..=30: finer with more, fewer clients per round fit in the
    /// 32-bit sum (at most ⌊(2³² − 1)/2^bits⌋) [default: 20].
    #[arg(long)]
    pub secagg_bits: Option<u32>,
    /// How long each key-exchange and unmasking step waits for the clients, e.g. 30s
    /// [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub secagg_step_timeout: Option<Duration>,
}

/// The same keys from the TOML file.
#[derive(Debug, Clone, Default)]
pub struct SecureAggFile {
    pub secure_aggregation: bool,
    pub secagg_threshold: Option<usize>,
    pub secagg_neighbours: Option<usize>,
    pub secagg_clip: Option<f64>,
    pub secagg_bits: Option<u32>,
    pub secagg_step_timeout: Option<Duration>,
}

/// Validated secure-aggregation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggSettings {
    /// `None`: ⌊2k/3⌋ + 1 for k neighbours.
    pub threshold: Option<usize>,
    /// `None`: every other client of the round.
    pub neighbours: Option<usize>,
    pub quantizer: Quantizer,
    pub step_timeout: Duration,
}

impl SecAggSettings {
    /// The neighbours per client and the threshold for a round of `selected` clients.
    pub fn graph(&self, selected: usize) -> (usize, usize) {
        let others = selected.saturating_sub(1);
        let k = self.neighbours.map_or(others, |k| k.min(others));
        let t = self.threshold.unwrap_or(2 * (k + 1) / 3 + 1);
        (k, t)
    }
}

/// Flags over the file; `None` when secure aggregation is off (and then no `secagg_*` key may
/// be set).
pub fn resolve(
    args: &SecureAggArgs,
    file: &SecureAggFile,
    strategy: &StrategySettings,
    privacy: Option<&DpSettings>,
) -> anyhow::Result<Option<SecAggSettings>> {
    let threshold = args.secagg_threshold.or(file.secagg_threshold);
    let neighbours = args.secagg_neighbours.or(file.secagg_neighbours);
    let clip = args.secagg_clip.or(file.secagg_clip);
    let bits = args.secagg_bits.or(file.secagg_bits);
    let step_timeout = args.secagg_step_timeout.or(file.secagg_step_timeout);
    if !(args.secure_aggregation || file.secure_aggregation) {
        let set: Vec<&str> = [
            ("secagg_threshold", threshold.is_some()),
            ("secagg_neighbours", neighbours.is_some()),
            ("secagg_clip", clip.is_some()),
            ("secagg_bits", bits.is_some()),
            ("secagg_step_timeout", step_timeout.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, on)| on.then_some(k))
        .collect();
        if !set.is_empty() {
            bail!(
                "`{}` set but secure aggregation is off: add --secure-aggregation (or remove them)",
                set.join("`, `")
            );
        }
        return Ok(None);
    }
    if let Some(why) = strategy.kind.why_not_a_sum() {
        bail!(
            "--secure-aggregation cannot run `{}`: {why}, and secure aggregation lets the coordinator see only the sum of the updates; use fedavg, fedavgm, fedadam, fedyogi, fedadagrad or fedprox",
            strategy.kind
        );
    }
    if let Some(dp) = privacy
        && dp.mode == DpMode::Central
    {
        bail!(
            "--dp central cannot combine with --secure-aggregation: central DP clips each update at the coordinator and samples clients by Poisson draws the accountant relies on, and secure aggregation hides the individual updates it would clip; use --dp local with --secure-aggregation (each client clips and noises its update, then the noised updates are summed securely)"
        );
    }
    if threshold == Some(0) {
        bail!("`secagg_threshold` must be at least 1");
    }
    if neighbours == Some(0) {
        bail!("`secagg_neighbours` must be at least 1 (or left out: every other client)");
    }
    if let (Some(t), Some(k)) = (threshold, neighbours)
        && t > k + 1
    {
        bail!(
            "`secagg_threshold` = {t} exceeds `secagg_neighbours` + 1 = {}: a secret is split into one share per neighbour and one kept, so no more than k + 1 shares can ever be revealed",
            k + 1
        );
    }
    let quantizer = Quantizer::new(clip.unwrap_or(1.0), bits.unwrap_or(20))
        .map_err(|e| anyhow::anyhow!("secure aggregation: {e}"))?;
    let step_timeout = step_timeout.unwrap_or(Duration::from_secs(60));
    if step_timeout.is_zero() {
        bail!("`secagg_step_timeout` must be longer than 0s");
    }
    Ok(Some(SecAggSettings {
        threshold,
        neighbours,
        quantizer,
        step_timeout,
    }))
}
