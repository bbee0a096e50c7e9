//! `--space KEY=DISTRIBUTION`: what `tune` searches. A key is a settings-file key of `serve`
//! that shapes how the federation learns; a trial's values are written into the base settings
//! as they would be in the file, so every trial (and `best.toml`) is checked exactly as
//! `serve --config` checks a file.
//!
//! | distribution | draws |
//! |---|---|
//! | `uniform(a,b)` | a real number in [a, b]; an integer when a and b are written as integers |
//! | `loguniform(a,b)` | exp(uniform(ln a, ln b)), a, b > 0; an integer likewise |
//! | `choice(v1,v2,...)` | one of the values: numbers, `true`/`false`, or names (`fedadam`) |

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Context, bail};

/// The settings a trial may change: how clients train and how the server combines. The model,
/// data, transport and privacy are the run's, not the search's; `rounds` is the schedule's.
pub const SEARCHABLE: &[&str] = &[
    "lr",
    "local_epochs",
    "batch_size",
    "optimizer",
    "momentum",
    "nesterov",
    "weight_decay",
    "lr_schedule",
    "warmup_steps",
    "lr_round_decay",
    "clip_norm",
    "dropout",
    "early_stopping_patience",
    "strategy",
    "server_lr",
    "server_momentum",
    "beta1",
    "beta2",
    "tau",
    "proximal_mu",
    "fraction_fit",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    Uniform { lo: f64, hi: f64, integer: bool },
    LogUniform { lo: f64, hi: f64, integer: bool },
    Choice(Vec<toml::Value>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub key: String,
    pub dist: Dist,
}

/// One trial's values, by key.
pub type Assignment = BTreeMap<String, toml::Value>;

/// Every `--space`, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct Space {
    pub params: Vec<Param>,
}

impl Space {
    pub fn parse(specs: &[String]) -> anyhow::Result<Self> {
        if specs.is_empty() {
            bail!(
                "give at least one --space KEY=DISTRIBUTION, e.g. --space 'lr=loguniform(1e-4,1e-2)'"
            );
        }
        let mut params: Vec<Param> = Vec::new();
        for spec in specs {
            let p = Param::parse(spec).with_context(|| format!("--space `{spec}`"))?;
            if params.iter().any(|q| q.key == p.key) {
                bail!("--space `{spec}`: `{}` is searched twice", p.key);
            }
            params.push(p);
        }
        Ok(Self { params })
    }
}

impl Param {
    fn parse(spec: &str) -> anyhow::Result<Self> {
        let (key, dist) = spec
            .split_once('=')
            .context("write it as KEY=DISTRIBUTION, e.g. lr=loguniform(1e-4,1e-2)")?;
        let key = key.trim().replace('-', "_");
        if !SEARCHABLE.contains(&key.as_str()) {
            bail!(
                "`{key}` cannot be searched; tune searches these settings-file keys: {}",
                SEARCHABLE.join(", ")
            );
        }
        let dist = dist.trim();
        let (name, args) = dist
            .strip_suffix(')')
            .and_then(|d| d.split_once('('))
            .with_context(|| {
                format!("`{dist}` is not uniform(a,b), loguniform(a,b) or choice(v1,v2,...)")
            })?;
        let args: Vec<&str> = args.split(',').map(str::trim).collect();
        let dist = match name.trim() {
            "uniform" | "loguniform" => {
                let [a, b] = args[..] else {
                    bail!("{name} takes two bounds, got {}", args.len());
                };
                let num = |s: &str| -> anyhow::Result<f64> {
                    s.parse::<f64>()
                        .ok()
                        .filter(|v| v.is_finite())
                        .with_context(|| format!("`{s}` is not a number"))
                };
                let (lo, hi) = (num(a)?, num(b)?);
                if lo >= hi {
                    bail!("the lower bound {lo} must be below the upper bound {hi}");
                }
                let integer = is_integer(a) && is_integer(b);
                if name.trim() == "loguniform" {
                    if lo <= 0.0 {
                        bail!("loguniform needs bounds above 0, got {lo}");
                    }
                    Dist::LogUniform { lo, hi, integer }
                } else {
                    Dist::Uniform { lo, hi, integer }
                }
            }
            "choice" => {
                if args.iter().any(|a| a.is_empty()) {
                    bail!("choice needs values separated by commas, e.g. choice(1,2,4)");
                }
                Dist::Choice(args.iter().map(|a| literal(a)).collect())
            }
            other => bail!(
                "unknown distribution `{other}`: use uniform(a,b), loguniform(a,b) or choice(v1,v2,...)"
            ),
        };
        Ok(Self { key, dist })
    }
}

fn is_integer(s: &str) -> bool {
    s.parse::<i64>().is_ok()
}

/// A value as the settings file would hold it: an integer, a real number, a boolean, else a
/// string.
fn literal(s: &str) -> toml::Value {
    if let Ok(i) = s.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(f) = s.parse::<f64>() {
        toml::Value::Float(f)
    } else if let Ok(b) = s.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(s.trim_matches(['"', '\'']).to_string())
    }
}

/// `key=value, ...` for logs and the final table.
pub struct Show<'a>(pub &'a Assignment);

impl fmt::Display for Show<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("the base settings");
        }
        let mut first = true;
        for (k, v) in self.0 {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            match v {
                toml::Value::Float(x) => write!(f, "{k}={x:.4e}")?,
                toml::Value::String(s) => write!(f, "{k}={s}")?,
                other => write!(f, "{k}={other}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(spec: &str) -> anyhow::Result<Param> {
        Space::parse(&[spec.to_string()]).map(|s| s.params[0].clone())
    }

    #[test]
    fn each_distribution_parses_with_its_values() {
        assert_eq!(
            one("lr=loguniform(1e-4, 1e-2)").unwrap().dist,
            Dist::LogUniform {
                lo: 1e-4,
                hi: 1e-2,
                integer: false
            }
        );
        assert_eq!(
            one("local-epochs=uniform(1,4)").unwrap(),
            Param {
                key: "local_epochs".into(),
                dist: Dist::Uniform {
                    lo: 1.0,
                    hi: 4.0,
                    integer: true
                }
            }
        );
        assert_eq!(
            one("strategy=choice(fedavg,fedadam)").unwrap().dist,
            Dist::Choice(vec!["fedavg".into(), "fedadam".into()])
        );
        assert_eq!(
            one("local_epochs=choice(1,2,4)").unwrap().dist,
            Dist::Choice(vec![1.into(), 2.into(), 4.into()])
        );
    }

    #[test]
    fn bad_spaces_are_refused_naming_what_is_wrong() {
        let cases = [
            ("rounds=choice(1,2)", "cannot be searched"),
            ("lr=loguniform(0,1)", "above 0"),
            ("lr=uniform(0.1,0.01)", "below the upper bound"),
            ("lr=normal(0,1)", "unknown distribution"),
            ("lr", "KEY=DISTRIBUTION"),
            ("lr=uniform(1)", "two bounds"),
            ("strategy=choice()", "separated by commas"),
        ];
        for (spec, want) in cases {
            let e = format!("{:#}", one(spec).unwrap_err());
            assert!(e.contains(want) && e.contains(spec), "{spec}: {e}");
        }
        let twice = Space::parse(&["lr=uniform(0,1)".into(), "lr=uniform(0,2)".into()]);
        assert!(format!("{:#}", twice.unwrap_err()).contains("twice"));
    }
}
