//! The local training recipe's names: `optimizer` (sgd, adam, adamw) and `lr_schedule`
//! (constant, step:EVERY:GAMMA, cosine[:MIN_FACTOR]). The training code that uses them is
//! `fedtune_common::optim`.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    Adam,
    AdamW,
}

impl FromStr for OptimizerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sgd" => Ok(Self::Sgd),
            "adam" => Ok(Self::Adam),
            "adamw" => Ok(Self::AdamW),
            _ => Err(format!("unknown optimizer `{s}`: use sgd, adam or adamw")),
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sgd => "sgd",
            Self::Adam => "adam",
            Self::AdamW => "adamw",
        })
    }
}

/// How the learning rate moves within one round of local training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    Constant,
    /// Multiply by `gamma` every `every_epochs` epochs.
    Step {
        every_epochs: u32,
        gamma: f64,
    },
    /// Cosine from the base rate down to `min_factor` × base over the local steps.
    Cosine {
        min_factor: f64,
    },
}

impl FromStr for LrSchedule {
    type Err = String;

    /// `constant`, `step:EVERY:GAMMA` (e.g. `step:1:0.5`), `cosine` or `cosine:MIN_FACTOR`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "unknown lr schedule `{s}`: use constant, step:EVERY_EPOCHS:GAMMA (e.g. step:1:0.5), cosine or cosine:MIN_FACTOR (e.g. cosine:0.1)"
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["constant"] => Ok(Self::Constant),
            ["cosine"] => Ok(Self::Cosine { min_factor: 0.0 }),
            ["cosine", m] => match m.parse::<f64>() {
                Ok(min_factor) if (0.0..=1.0).contains(&min_factor) => {
                    Ok(Self::Cosine { min_factor })
                }
                _ => Err(bad()),
            },
            ["step", every, gamma] => match (every.parse::<u32>(), gamma.parse::<f64>()) {
                (Ok(every_epochs), Ok(gamma))
                    if every_epochs > 0 && gamma.is_finite() && gamma > 0.0 =>
                {
                    Ok(Self::Step {
                        every_epochs,
                        gamma,
                    })
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Constant => write!(f, "constant"),
            Self::Step {
                every_epochs,
                gamma,
            } => write!(f, "step:{every_epochs}:{gamma}"),
            Self::Cosine { min_factor } => write!(f, "cosine:{min_factor}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_print_back() {
        for good in ["constant", "step:1:0.5", "cosine:0.1", "cosine:0"] {
            let parsed: LrSchedule = good.parse().unwrap();
            assert_eq!(parsed.to_string(), good);
        }
        assert_eq!(
            "cosine".parse::<LrSchedule>().unwrap().to_string(),
            "cosine:0"
        );
    }

    #[test]
    fn malformed_schedules_are_refused_naming_the_grammar() {
        for bad in [
            "linear",
            "step:0:0.5",
            "step:1",
            "cosine:2",
            "step:1:-1",
            "step:1:inf",
            "",
        ] {
            let e = bad.parse::<LrSchedule>().unwrap_err();
            assert!(e.contains("step:EVERY_EPOCHS:GAMMA"), "{bad}: {e}");
        }
    }

    #[test]
    fn optimizers_by_name() {
        assert_eq!(
            "adamw".parse::<OptimizerKind>().unwrap(),
            OptimizerKind::AdamW
        );
        let e = "rmsprop".parse::<OptimizerKind>().unwrap_err();
        assert!(e.contains("sgd, adam or adamw"), "{e}");
    }
}
