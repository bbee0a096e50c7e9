//! `serve` settings: defaults, then a TOML file (`--config`), then flags (flags win). Every key
//! is validated once here, so the rest of the coordinator works with checked values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_common::logging::LogFormat;
use fedtune_common::models::{ModelKind, ModelSpec};
use fedtune_common::train::OptimizerKind;
use serde::Deserialize;

/// The TOML file: the same keys as the flags, with `-` written `_` (e.g. `min_clients = 3`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub listen: SocketAddr,
    pub rounds: u64,
    pub min_clients: usize,
    pub model: String,
    pub num_classes: u32,
    pub init: Option<PathBuf>,
    pub out: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub optimizer: String,
    #[serde(with = "humantime_serde")]
    pub round_timeout: Duration,
    pub log_format: LogFormat,
    pub seed: u64,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            rounds: 5,
            min_clients: 2,
            model: "mlp".into(),
            num_classes: 10,
            init: None,
            out: PathBuf::from("runs/latest"),
            eval_data: None,
            local_epochs: 1,
            batch_size: 32,
            lr: 0.001,
            optimizer: "adam".into(),
            round_timeout: Duration::from_secs(600),
            log_format: LogFormat::Text,
            seed: 42,
        }
    }
}

/// Flags of `fedtune-coordinator serve`. Each overrides the same key of `--config`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the keys below (flags given on the command line win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051; use 0.0.0.0:PORT for clients on other machines].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Number of federation rounds [default: 5].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Clients that must have joined before the first round starts [default: 2].
    #[arg(long)]
    pub min_clients: Option<usize>,
    /// Model: mlp, cnn (28x28x1 images) or synthetic:<params> (protocol benchmarks) [default: mlp].
    #[arg(long)]
    pub model: Option<String>,
    /// Number of output classes [default: 10].
    #[arg(long)]
    pub num_classes: Option<u32>,
    /// Start from pre-trained weights (safetensors, tensor names as the model's, e.g. fc1.weight).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Output folder: global.safetensors after every round, metrics.jsonl [default: runs/latest].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// IDX folder for server-side evaluation of the global model after every round.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Local epochs per round on each client [default: 1].
    #[arg(long)]
    pub local_epochs: Option<u32>,
    /// Local mini-batch size [default: 32].
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Local learning rate [default: 0.001].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Local optimiser: sgd or adam [default: adam].
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Longest a round waits for updates, e.g. 90s, 10m [default: 10m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub round_timeout: Option<Duration>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// Seed of the initial weights and of the clients' shuffling [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Validated settings of one coordinator run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub rounds: u64,
    pub min_clients: usize,
    pub model: ModelSpec,
    pub init: Option<PathBuf>,
    pub out: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub round_timeout: Duration,
    pub log_format: LogFormat,
    pub seed: u64,
}

impl ServeArgs {
    /// Merges defaults, the `--config` file and the flags, and validates the result.
    pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let pick = |flag: &Option<PathBuf>, file: Option<PathBuf>| flag.clone().or(file);
        let model_name = self.model.clone().unwrap_or(file.model);
        let num_classes = self.num_classes.unwrap_or(file.num_classes);
        let optimizer = self.optimizer.clone().unwrap_or(file.optimizer);
        let cfg = ServeConfig {
            listen: self.listen.unwrap_or(file.listen),
            rounds: self.rounds.unwrap_or(file.rounds),
            min_clients: self.min_clients.unwrap_or(file.min_clients),
            model: ModelSpec::parse(&model_name, num_classes)
                .context("invalid `model` / `num_classes`")?,
            init: pick(&self.init, file.init),
            out: self.out.clone().unwrap_or(file.out),
            eval_data: pick(&self.eval_data, file.eval_data),
            local_epochs: self.local_epochs.unwrap_or(file.local_epochs),
            batch_size: self.batch_size.unwrap_or(file.batch_size),
            lr: self.lr.unwrap_or(file.lr),
            optimizer: optimizer
                .parse()
                .map_err(anyhow::Error::msg)
                .context("invalid `optimizer`")?,
            round_timeout: self.round_timeout.unwrap_or(file.round_timeout),
            log_format: self.log_format.unwrap_or(file.log_format),
            seed: self.seed.unwrap_or(file.seed),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

impl ServeConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.rounds == 0 {
            bail!("`rounds` must be at least 1");
        }
        if self.min_clients == 0 {
            bail!("`min_clients` must be at least 1");
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
        if self.round_timeout.is_zero() {
            bail!("`round_timeout` must be longer than zero");
        }
        if let Some(init) = &self.init
            && !init.is_file()
        {
            bail!("`init`: {} is not a file", init.display());
        }
        if self.eval_data.is_some() && matches!(self.model.kind, ModelKind::Synthetic { .. }) {
            bail!(
                "`eval_data` cannot be used with a synthetic model (it has no architecture to evaluate)"
            );
        }
        if let Some(eval) = &self.eval_data
            && !eval.is_dir()
        {
            bail!(
                "`eval_data`: {} is not a folder (it must hold an IDX images/labels pair)",
                eval.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "rounds = 7\nmin_clients = 4\nround_timeout = \"90s\"\nmodel = \"cnn\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(p.clone()),
            min_clients: Some(3),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        assert_eq!((cfg.rounds, cfg.min_clients), (7, 3));
        assert_eq!(cfg.round_timeout, Duration::from_secs(90));
        assert_eq!(cfg.model.kind.to_string(), "cnn");

        std::fs::write(&p, "roundz = 7\n").unwrap();
        let e = format!("{:#}", args.resolve().unwrap_err());
        assert!(e.contains("roundz"), "{e}");
        let bad = ServeArgs {
            lr: Some(-1.0),
            ..Default::default()
        };
        assert!(format!("{:#}", bad.resolve().unwrap_err()).contains("lr"));
    }
}
