//! The coordinator's `serve --config` TOML file: every `serve` flag as a key, with the defaults.
//! The coordinator merges it with the flags (flags win) and validates the result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{FileKind, LogFormat, ParseError, SettingsError};

/// What the file is, for the message when it is not valid.
const KIND: FileKind = FileKind {
    flag: "--config",
    what: "serve settings file",
    keys: "the README's configuration table lists every key",
};

/// The TOML file: the same keys as the flags, with `-` written `_` (e.g. `min_clients = 3`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeFile {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub rounds: u64,
    #[serde(alias = "min_clients")]
    pub min_available_clients: usize,
    #[serde(with = "humantime_serde")]
    pub available_timeout: Duration,
    pub model: String,
    pub num_classes: Option<u32>,
    pub init: Option<InitFile>,
    pub tokenizer: Option<PathBuf>,
    pub labels: Vec<String>,
    pub max_seq_len: Option<usize>,
    pub lora_rank: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub lora_targets: Vec<String>,
    pub lora_mode: Option<String>,
    pub lora_dropout: Option<f64>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub allowed_clients: Option<PathBuf>,
    pub client_tokens: Option<PathBuf>,
    pub admins: Vec<String>,
    pub insecure: bool,
    pub max_clients: Option<usize>,
    pub max_streams_per_client: Option<usize>,
    pub max_joins_per_minute: Option<u32>,
    pub export_pytorch: bool,
    pub out: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub eval_text_column: String,
    pub eval_label_column: String,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub optimizer: String,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub lr_schedule: String,
    pub warmup_steps: u32,
    pub lr_round_decay: f64,
    pub clip_norm: f64,
    /// `None`: the model's own default (`fedtune_common::models::DROPOUT`).
    pub dropout: Option<f64>,
    pub freeze: String,
    pub augment_crop_padding: u32,
    pub augment_flip: bool,
    pub augment_noise: f64,
    pub early_stopping_patience: u32,
    #[serde(with = "humantime_serde")]
    pub round_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub grace_period: Option<Duration>,
    pub accept_failures: bool,
    pub on_round_failure: OnRoundFailure,
    pub round_retries: u32,
    pub strategy: String,
    pub server_lr: Option<f64>,
    pub server_momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
    pub proximal_mu: Option<f64>,
    pub trim_fraction: f64,
    pub krum_f: usize,
    pub krum_m: usize,
    pub fraction_fit: f64,
    pub min_fit_clients: usize,
    pub fraction_evaluate: f64,
    pub min_evaluate_clients: usize,
    pub evaluate_every: u64,
    pub personalize_steps: u32,
    pub ditto_lambda: f64,
    pub buffer_memory_mb: u64,
    pub dp: Option<String>,
    pub dp_clip: Option<String>,
    pub dp_noise_multiplier: Option<f64>,
    pub dp_clip_initial: Option<f64>,
    pub dp_target_quantile: Option<f64>,
    pub dp_clip_lr: Option<f64>,
    pub dp_clipped_count_stddev: Option<f64>,
    pub dp_delta: Option<f64>,
    pub dp_max_epsilon: Option<f64>,
    pub secure_aggregation: bool,
    pub secagg_threshold: Option<usize>,
    pub secagg_neighbours: Option<usize>,
    pub secagg_clip: Option<f64>,
    pub secagg_bits: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub secagg_step_timeout: Option<Duration>,
    pub compress_up: Option<String>,
    pub compress_down: Option<String>,
    pub resume: bool,
    pub log_format: LogFormat,
    pub seed: u64,
}

/// `init = "file"`, or a table with the rules that adapt the file to the model:
///
/// ```toml
/// [init]
/// file = "resnet-ish.pt"
/// layout = "pytorch"        # auto (by extension), burn or pytorch
/// reset_head = true         # re-initialise the classifier head (new number of classes)
/// [init.remap]              # regex -> replacement, applied in order to every file key
/// "^backbone\\." = ""
/// "^classifier\\." = "fc2."
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum InitFile {
    Path(PathBuf),
    Table(InitTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitTable {
    pub file: PathBuf,
    #[serde(default)]
    pub layout: Option<String>,
    #[serde(default)]
    pub reset_head: bool,
    #[serde(default)]
    pub remap: toml::Table,
}

/// What happens to a round that gathered too few updates (or any failure, without
/// `accept_failures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnRoundFailure {
    /// Run the round again with freshly selected clients (up to `round_retries` times).
    Retry,
    /// End the run with an error; the last completed round stays in the output folder.
    Stop,
}

impl Default for ServeFile {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            rounds: 5,
            min_available_clients: 2,
            available_timeout: Duration::from_secs(30 * 60),
            model: "mlp".into(),
            num_classes: None,
            init: None,
            tokenizer: None,
            labels: Vec::new(),
            max_seq_len: None,
            lora_rank: None,
            lora_alpha: None,
            lora_targets: Vec::new(),
            lora_mode: None,
            lora_dropout: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            allowed_clients: None,
            client_tokens: None,
            admins: Vec::new(),
            insecure: false,
            max_clients: None,
            max_streams_per_client: None,
            max_joins_per_minute: None,
            export_pytorch: false,
            out: PathBuf::from("runs/latest"),
            eval_data: None,
            eval_text_column: "text".into(),
            eval_label_column: "label".into(),
            local_epochs: 1,
            batch_size: 32,
            lr: 0.001,
            optimizer: "adam".into(),
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            lr_schedule: "constant".into(),
            warmup_steps: 0,
            lr_round_decay: 1.0,
            clip_norm: 0.0,
            dropout: None,
            freeze: "none".into(),
            augment_crop_padding: 0,
            augment_flip: false,
            augment_noise: 0.0,
            early_stopping_patience: 0,
            round_timeout: Duration::from_secs(600),
            grace_period: None,
            accept_failures: true,
            on_round_failure: OnRoundFailure::Retry,
            round_retries: 3,
            strategy: "fedavg".into(),
            server_lr: None,
            server_momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            proximal_mu: None,
            trim_fraction: 0.2,
            krum_f: 1,
            krum_m: 0,
            fraction_fit: 1.0,
            min_fit_clients: 1,
            fraction_evaluate: 0.0,
            min_evaluate_clients: 1,
            evaluate_every: 1,
            personalize_steps: 0,
            ditto_lambda: 0.0,
            buffer_memory_mb: 1024,
            dp: None,
            dp_clip: None,
            dp_noise_multiplier: None,
            dp_clip_initial: None,
            dp_target_quantile: None,
            dp_clip_lr: None,
            dp_clipped_count_stddev: None,
            dp_delta: None,
            dp_max_epsilon: None,
            secure_aggregation: false,
            secagg_threshold: None,
            secagg_neighbours: None,
            secagg_clip: None,
            secagg_bits: None,
            secagg_step_timeout: None,
            compress_up: None,
            compress_down: None,
            resume: false,
            log_format: LogFormat::Text,
            seed: 42,
        }
    }
}

impl ServeFile {
    /// Reads `path` (`--config`); relative paths in it stay as written (taken from the
    /// coordinator's working folder, like the flags).
    pub fn read(path: &Path) -> Result<Self, SettingsError> {
        let text = crate::read_text(KIND.flag, path)?;
        Self::parse(&text).map_err(|e| e.at(path, &KIND))
    }

    /// Parses the text of a settings file; [`ParseError::at`] names the file.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let file: Self = toml::from_str(text).map_err(|e| ParseError::Toml(Box::new(e)))?;
        file.init_remap_rules()?;
        Ok(file)
    }

    /// The `[init.remap]` rules in the order written, as (regex, replacement) pairs; empty
    /// without an `[init]` table. The regexes are compiled where they are used.
    pub fn init_remap_rules(&self) -> Result<Vec<(&str, &str)>, ParseError> {
        let Some(InitFile::Table(table)) = &self.init else {
            return Ok(Vec::new());
        };
        table
            .remap
            .iter()
            .map(|(pattern, replacement)| match replacement.as_str() {
                Some(r) => Ok((pattern.as_str(), r)),
                None => Err(ParseError::Value(format!(
                    "`[init.remap]`: the replacement for `{pattern}` must be a string, got {}",
                    replacement.type_str()
                ))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_is_refused_naming_it_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, "rounds = 3\nroundz = 7\n").unwrap();
        let e = ServeFile::read(&path).unwrap_err().to_string();
        assert!(e.contains("serve.toml") && e.contains("roundz"), "{e}");
    }

    #[test]
    fn a_malformed_duration_is_refused_naming_its_key() {
        let e = ServeFile::parse("round_timeout = \"ten minutes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("round_timeout"), "{e}");
    }

    #[test]
    fn remap_rules_keep_their_order_and_must_be_strings() {
        let file = ServeFile::parse(
            "[init]\nfile = \"w.pt\"\n[init.remap]\n\"^b\\\\.\" = \"\"\n\"^a\\\\.\" = \"fc.\"\n",
        )
        .unwrap();
        assert_eq!(
            file.init_remap_rules().unwrap(),
            vec![("^b\\.", ""), ("^a\\.", "fc.")]
        );
        let e = ServeFile::parse("[init]\nfile = \"w.pt\"\n[init.remap]\n\"^x\" = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`^x`") && e.contains("must be a string"), "{e}");
    }
}
