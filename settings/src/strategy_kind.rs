//! `strategy` / `--strategy`: the names of the aggregation strategies and what the rest of
//! the settings need to know about each (linear or robust, stateful, its default server rate).

use std::fmt;
use std::str::FromStr;

/// The `--strategy` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    FedAvg,
    FedAvgM,
    FedAdam,
    FedYogi,
    FedAdagrad,
    FedProx,
    Median,
    TrimmedMean,
    Krum,
    MultiKrum,
    /// SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift.
    Scaffold,
    /// FedNova (Wang et al. 2020): updates normalised by each client's local steps.
    FedNova,
}

const NAMES: [(&str, StrategyKind); 12] = [
    ("fedavg", StrategyKind::FedAvg),
    ("fedavgm", StrategyKind::FedAvgM),
    ("fedadam", StrategyKind::FedAdam),
    ("fedyogi", StrategyKind::FedYogi),
    ("fedadagrad", StrategyKind::FedAdagrad),
    ("fedprox", StrategyKind::FedProx),
    ("median", StrategyKind::Median),
    ("trimmed-mean", StrategyKind::TrimmedMean),
    ("krum", StrategyKind::Krum),
    ("multi-krum", StrategyKind::MultiKrum),
    ("scaffold", StrategyKind::Scaffold),
    ("fednova", StrategyKind::FedNova),
];

impl FromStr for StrategyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                format!(
                    "unknown strategy `{s}`: use one of {}",
                    NAMES.map(|(n, _)| n).join(", ")
                )
            })
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = NAMES
            .iter()
            .find(|(_, k)| k == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

impl StrategyKind {
    /// Whether the combined update is a weighted mean, so that it can be computed from a sum
    /// (DP's clipped, noised sum; secure aggregation) rather than from individual updates.
    pub fn is_linear(self) -> bool {
        !self.is_robust() && !self.needs_step_weight()
    }

    /// Whether the combine rule looks at updates one by one (median, trimmed mean, Krum).
    pub fn is_robust(self) -> bool {
        matches!(
            self,
            Self::Median | Self::TrimmedMean | Self::Krum | Self::MultiKrum
        )
    }

    /// Whether each update is weighed by how far its client's local steps went (the
    /// `step_weight` a client reports): SCAFFOLD and FedNova.
    pub fn needs_step_weight(self) -> bool {
        matches!(self, Self::Scaffold | Self::FedNova)
    }

    /// Why a rule cannot be computed from a sum of weighted updates, for error messages; `None`
    /// for linear rules.
    pub fn why_not_a_sum(self) -> Option<&'static str> {
        if self.is_robust() {
            Some("it weighs every client's update on its own (a robust rule)")
        } else if self.needs_step_weight() {
            Some("it weighs every client's update by that client's own local steps")
        } else {
            None
        }
    }

    /// Whether the server keeps state across rounds that a checkpoint must carry.
    pub fn is_stateful(self) -> bool {
        matches!(
            self,
            Self::FedAvgM | Self::FedAdam | Self::FedYogi | Self::FedAdagrad | Self::Scaffold
        )
    }

    /// The server learning rate when none is given.
    pub fn default_server_lr(self) -> f64 {
        match self {
            Self::FedAdam | Self::FedYogi | Self::FedAdagrad => 0.01,
            _ => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_to_a_strategy_that_prints_back_as_it() {
        for (name, kind) in NAMES {
            assert_eq!(name.parse::<StrategyKind>(), Ok(kind));
            assert_eq!(kind.to_string(), name);
        }
    }

    #[test]
    fn an_unknown_strategy_is_refused_listing_the_known_ones() {
        let e = "fedsgd".parse::<StrategyKind>().unwrap_err();
        assert!(e.contains("`fedsgd`") && e.contains("multi-krum"), "{e}");
    }
}
