//! `serve` settings once merged and validated: what the rest of the coordinator reads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedtune_common::augment::Augment;
use fedtune_common::logging::LogFormat;
use fedtune_common::models::ModelSpec;
use fedtune_common::optim::{LrSchedule, OptimizerSettings};
use fedtune_common::pretrained::InitOptions;

use super::{Compression, OnRoundFailure, SecAggSettings, Security};
use crate::strategy::StrategySettings;

/// Validated settings of one coordinator run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    pub rounds: u64,
    pub policy: RoundPolicy,
    pub strategy: StrategySettings,
    /// Differential privacy wrapped around the strategy; `None` when off.
    pub privacy: Option<crate::strategy::dp::DpSettings>,
    /// Secure aggregation of the training updates; `None` when off.
    pub secure_agg: Option<SecAggSettings>,
    /// How updates and broadcasts are encoded on the wire.
    pub compression: Compression,
    pub resume: bool,
    /// Start a new run, moving an earlier one in `out` aside.
    pub fresh: bool,
    pub model: ModelSpec,
    pub init: Option<PathBuf>,
    pub init_options: InitOptions,
    /// `init` is a Hugging Face folder (BERT): loaded by its known names and layout.
    pub hf_init: Option<PathBuf>,
    /// The tokenizer file of a text model (its hash travels in the model spec).
    pub tokenizer: Option<PathBuf>,
    pub export_pytorch: bool,
    pub out: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub eval_text_column: String,
    pub eval_label_column: String,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub optimizer: OptimizerSettings,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u32,
    pub lr_round_decay: f64,
    /// 0 = off.
    pub clip_norm: f64,
    pub dropout: f64,
    /// Exact names of the frozen tensors, resolved from `freeze`.
    pub frozen: Vec<String>,
    /// TLS, mutual TLS or plaintext.
    pub security: Security,
    /// Limits against abuse.
    pub limits: crate::limits::Limits,
    pub augment: Augment,
    pub early_stopping_patience: u32,
    /// Federated evaluation also reports each client's figures after this many local steps
    /// of fine-tuning from the global model (0 = off).
    pub personalize_steps: u32,
    /// Ditto's λ: personalisation continues each client's personal model, pulled towards the
    /// global one (0 = off: it fine-tunes the global model afresh).
    pub ditto_lambda: f64,
    pub log_format: LogFormat,
    pub seed: u64,
}

/// When rounds start and end, and what a failed round does.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPolicy {
    pub min_available_clients: usize,
    pub available_timeout: Duration,
    pub round_timeout: Duration,
    pub grace_period: Option<Duration>,
    pub accept_failures: bool,
    pub on_round_failure: OnRoundFailure,
    pub round_retries: u32,
}
