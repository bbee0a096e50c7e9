//! `serve` settings: defaults, then a TOML file (`--config`), then flags (flags win). Every key
//! is validated once here, so the rest of the coordinator works with checked values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_common::augment::Augment;
use fedtune_common::freeze;
use fedtune_common::logging::LogFormat;
use fedtune_common::models::{DROPOUT, ModelSpec};
use fedtune_common::optim::OptimizerSettings;
use fedtune_common::pretrained::{InitOptions, Remap};

use crate::strategy::{StrategyKind, StrategySettings};

mod compression;
mod privacy;
mod resolved;
mod secure_agg;
mod security;
mod text_model;
mod upstream;
mod validate;

// The file's schema and parsing: fedtune-settings (burn-free, fuzzed); merged and checked here.
pub use compression::{Compression, CompressionArgs};
pub use fedtune_settings::{InitFile, InitTable, OnRoundFailure, ServeFile};
pub use privacy::{PrivacyArgs, PrivacyFile};
pub use resolved::{RoundPolicy, ServeConfig};
pub use secure_agg::{SecAggSettings, SecureAggArgs, SecureAggFile};
pub use security::{Security, SecurityArgs, SecurityFile, TlsFiles};
pub use text_model::{TextModelArgs, TextModelFile};
pub use upstream::UpstreamArgs;

/// Flags of `fedtune-coordinator serve`. Each overrides the same key of `--config`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the keys below (flags given on the command line win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051; use 0.0.0.0:PORT for clients on other machines].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` over plain HTTP on this
    /// address, e.g. 0.0.0.0:9090 [default: off].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Number of federation rounds [default: 5].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Live clients needed before a round starts; the wait is logged every 5 s [default: 2].
    #[arg(long, visible_alias = "min-clients")]
    pub min_available_clients: Option<usize>,
    /// Longest to wait for `min_available_clients`; then the run ends with an error [default: 30m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub available_timeout: Option<Duration>,
    /// Model: mlp, cnn (28x28x1 images), tabular-mlp:<features> (CSV rows), bert (text; with
    /// --init DIR, a Hugging Face BERT folder), synthetic:<params> (protocol benchmarks), or an
    /// architecture a program built on the fedtune libraries registered [default: mlp].
    #[arg(long)]
    pub model: Option<String>,
    /// Number of output classes [default: 10, or the number of --labels].
    #[arg(long)]
    pub num_classes: Option<u32>,
    /// Start from pre-trained weights: a safetensors or PyTorch (.pt/.pth) file, or for
    /// --model bert a Hugging Face folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub text: TextModelArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub privacy: PrivacyArgs,
    #[command(flatten)]
    pub secure_agg: SecureAggArgs,
    #[command(flatten)]
    pub compression: CompressionArgs,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// Rename the file's keys: REGEX=REPLACEMENT (repeatable, applied in order; after the
    /// `[init.remap]` rules of the config file).
    #[arg(long = "init-remap", value_name = "REGEX=REPLACEMENT")]
    pub init_remap: Vec<String>,
    /// Layout of the --init file: auto (.pt/.pth are PyTorch's, safetensors burn's), burn or
    /// pytorch (Linear weights [out, in]) [default: auto].
    #[arg(long)]
    pub init_layout: Option<String>,
    /// Re-initialise the classifier head instead of loading it (e.g. a new number of classes).
    #[arg(long)]
    pub reset_head: bool,
    /// Also write the global model in PyTorch's layout (global.pytorch.safetensors) every round.
    #[arg(long)]
    pub export_pytorch: bool,
    /// Output folder: global.safetensors after every round, metrics.jsonl [default: runs/latest].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Held-out data for server-side evaluation of the global model after every round: an IDX
    /// folder, an image folder or a CSV file; for text models a CSV, TSV or JSONL file.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Text column of a text --eval-data file [default: text].
    #[arg(long)]
    pub eval_text_column: Option<String>,
    /// Label column of a text --eval-data file [default: label].
    #[arg(long)]
    pub eval_label_column: Option<String>,
    /// Local epochs per round on each client [default: 1].
    #[arg(long)]
    pub local_epochs: Option<u32>,
    /// Local mini-batch size [default: 32].
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Local learning rate [default: 0.001].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Local optimiser: sgd, adam or adamw [default: adam].
    #[arg(long)]
    pub optimizer: Option<String>,
    /// SGD momentum; 0 is plain SGD [default: 0].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// SGD: Nesterov momentum [default: false].
    #[arg(long)]
    pub nesterov: Option<bool>,
    /// Weight decay: L2 penalty for sgd/adam, decoupled for adamw; 0 = off [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule within local training: constant, step:EVERY_EPOCHS:GAMMA,
    /// cosine or cosine:MIN_FACTOR [default: constant].
    #[arg(long)]
    pub lr_schedule: Option<String>,
    /// Linear warm-up over the first N local steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<u32>,
    /// Across rounds: round r trains with lr × decay^(r−1) [default: 1.0, no decay].
    #[arg(long)]
    pub lr_round_decay: Option<f64>,
    /// Clip local gradients to this global norm; 0 = off [default: 0].
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Dropout probability of the built-in models while training [default: 0.1].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Frozen tensors: patterns (conv1.*,conv2.*), head-only, or none [default: none].
    #[arg(long)]
    pub freeze: Option<String>,
    /// Augmentation: random crop after padding each side by N pixels; 0 = off [default: 0].
    #[arg(long)]
    pub augment_crop_padding: Option<u32>,
    /// Augmentation: random horizontal flip [default: false].
    #[arg(long)]
    pub augment_flip: Option<bool>,
    /// Augmentation: Gaussian pixel noise σ on the [0, 1] scale; 0 = off [default: 0].
    #[arg(long)]
    pub augment_noise: Option<f64>,
    /// Stop local training after N epochs without a lower validation loss, keeping the best
    /// weights; 0 = off [default: 0].
    #[arg(long)]
    pub early_stopping_patience: Option<u32>,
    /// Round deadline: longest a round waits for updates, e.g. 90s, 10m [default: 10m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub round_timeout: Option<Duration>,
    /// Once `min_fit_clients` updates are in, wait at most this much longer for the rest
    /// [default: off: wait for every selected client or the deadline].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub grace_period: Option<Duration>,
    /// Aggregate a round in which some selected clients failed, if at least `min_fit_clients`
    /// reported; with false any failure fails the round [default: true].
    #[arg(long)]
    pub accept_failures: Option<bool>,
    /// A failed round is retried (`retry`) or ends the run (`stop`) [default: retry].
    #[arg(long, value_enum)]
    pub on_round_failure: Option<OnRoundFailure>,
    /// Retries of one failed round before the run stops [default: 3].
    #[arg(long)]
    pub round_retries: Option<u32>,
    /// Aggregation strategy: fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox,
    /// scaffold, fednova, median, trimmed-mean, krum, multi-krum [default: fedavg].
    #[arg(long)]
    pub strategy: Option<String>,
    /// Server learning rate η [default: 1.0; 0.01 for fedadam, fedyogi, fedadagrad].
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// fedavgm: server momentum β [default: 0.9].
    #[arg(long)]
    pub server_momentum: Option<f64>,
    /// fedadam/fedyogi/fedadagrad: first-moment decay β1 [default: 0.9].
    #[arg(long)]
    pub beta1: Option<f64>,
    /// fedadam/fedyogi: second-moment decay β2 [default: 0.99].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// fedadam/fedyogi/fedadagrad: adaptivity τ [default: 0.001].
    #[arg(long)]
    pub tau: Option<f64>,
    /// Proximal term μ clients add to their loss (FedProx) [default: 0.01 with fedprox, else 0].
    #[arg(long)]
    pub proximal_mu: Option<f64>,
    /// trimmed-mean: fraction β cut from each end, 0 ≤ β < 0.5 [default: 0.2].
    #[arg(long)]
    pub trim_fraction: Option<f64>,
    /// krum/multi-krum: number of attackers f to tolerate [default: 1].
    #[arg(long)]
    pub krum_f: Option<usize>,
    /// multi-krum: updates kept, m; 0 keeps n − f [default: 0].
    #[arg(long)]
    pub krum_m: Option<usize>,
    /// Fraction of live clients selected to train each round [default: 1.0].
    #[arg(long)]
    pub fraction_fit: Option<f64>,
    /// Fewest clients selected to train, and fewest updates for a round to count [default: 1].
    #[arg(long)]
    pub min_fit_clients: Option<usize>,
    /// Fraction of live clients that evaluate the new global model on their validation data
    /// after a round; 0 turns federated evaluation off [default: 0].
    #[arg(long)]
    pub fraction_evaluate: Option<f64>,
    /// Fewest clients selected to evaluate [default: 1].
    #[arg(long)]
    pub min_evaluate_clients: Option<usize>,
    /// Federated evaluation after every N-th round [default: 1].
    #[arg(long)]
    pub evaluate_every: Option<u64>,
    /// Federated evaluation also fine-tunes the global model for N local steps on each
    /// evaluating client's training data and reports those figures too (personalised next to
    /// global); 0 = off [default: 0].
    #[arg(long)]
    pub personalize_steps: Option<u32>,
    /// Ditto: with --personalize-steps, each client keeps a personal model across rounds (in
    /// its --state-dir) and trains it on its own data pulled towards the global model by
    /// λ/2·‖v − w‖², instead of fine-tuning the global model afresh; 0 = off [default: 0].
    #[arg(long)]
    pub ditto_lambda: Option<f64>,
    /// Robust strategies (median, trimmed-mean, krum) hold a round's updates in memory up to
    /// this many MiB, then spill them to `<out>/spill` [default: 1024].
    #[arg(long)]
    pub buffer_memory_mb: Option<u64>,
    /// Require resuming: fail unless `--out` holds an unfinished run to continue. Without it,
    /// an unfinished run with the same settings is resumed anyway, and an empty folder starts a
    /// new run.
    #[arg(long)]
    pub resume: bool,
    /// Start a new run even though `--out` holds one (finished, unfinished, or with other
    /// settings): the earlier run's files are moved to `<out>/earlier-runs/<time>/`.
    #[arg(long, conflicts_with = "resume")]
    pub fresh: bool,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// Seed of the initial weights and of the clients' shuffling [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl ServeArgs {
    /// Merges defaults, the `--config` file and the flags, and validates the result.
    pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => ServeFile::read(path)?,
            None => ServeFile::default(),
        };
        self.resolve_with(file)
    }

    /// [`ServeArgs::resolve`] with the settings file already read (`tune`'s trials).
    pub fn resolve_with(&self, file: ServeFile) -> anyhow::Result<ServeConfig> {
        let pick = |flag: &Option<PathBuf>, file: Option<PathBuf>| flag.clone().or(file);
        let model_name = self.model.clone().unwrap_or(file.model.clone());
        let optimizer = self.optimizer.clone().unwrap_or(file.optimizer.clone());
        // The init file and its rules: the file's table, then the flags.
        let (mut init_file, mut remap, mut init_layout, mut reset_head) =
            (None, Vec::new(), None, false);
        match &file.init {
            Some(InitFile::Path(p)) => init_file = Some(p.clone()),
            Some(InitFile::Table(t)) => {
                init_file = Some(t.file.clone());
                init_layout = t.layout.clone();
                reset_head = t.reset_head;
                for (pattern, replacement) in file.init_remap_rules()? {
                    remap.push(Remap::new(pattern, replacement).map_err(anyhow::Error::msg)?);
                }
            }
            None => {}
        }
        if let Some(p) = &self.init {
            init_file = Some(p.clone());
        }
        let resolved = text_model::resolve(
            &model_name,
            self.num_classes.or(file.num_classes),
            init_file.as_deref(),
            &self.text,
            &TextModelFile {
                tokenizer: file.tokenizer.clone(),
                labels: file.labels.clone(),
                max_seq_len: file.max_seq_len,
                lora_rank: file.lora_rank,
                lora_alpha: file.lora_alpha,
                lora_targets: file.lora_targets.clone(),
                lora_mode: file.lora_mode.clone(),
                lora_dropout: file.lora_dropout,
            },
        )?;
        let model = resolved.spec;
        let security_file = SecurityFile {
            tls_cert: file.tls_cert.clone(),
            tls_key: file.tls_key.clone(),
            client_ca: file.client_ca.clone(),
            allowed_clients: file.allowed_clients.clone(),
            client_tokens: file.client_tokens.clone(),
            admins: file.admins.clone(),
            insecure: file.insecure,
            max_clients: file.max_clients,
            max_streams_per_client: file.max_streams_per_client,
            max_joins_per_minute: file.max_joins_per_minute,
        };
        let limits = security::limits(&self.security, &security_file)?;
        let security = security::resolve(
            &self.security,
            &security_file,
            self.config.as_deref().and_then(std::path::Path::parent),
        )?;
        if resolved.hf_dir.is_some() && (!remap.is_empty() || init_layout.is_some()) {
            bail!(
                "`init.remap` / --init-remap and `init_layout` do not apply to a Hugging Face folder: its names and layout are known"
            );
        }
        for rule in &self.init_remap {
            let (pattern, replacement) = rule
                .split_once('=')
                .with_context(|| format!("--init-remap `{rule}`: write it as REGEX=REPLACEMENT"))?;
            remap.push(Remap::new(pattern, replacement).map_err(anyhow::Error::msg)?);
        }
        init_layout = self.init_layout.clone().or(init_layout);
        reset_head |= self.reset_head;
        if (reset_head || !remap.is_empty()) && init_file.is_none() {
            bail!("`reset_head` and `init.remap` / --init-remap need an `init` file");
        }
        let out = self.out.clone().unwrap_or(file.out);
        let kind: StrategyKind = self
            .strategy
            .clone()
            .unwrap_or(file.strategy)
            .parse()
            .map_err(anyhow::Error::msg)
            .context("invalid `strategy`")?;
        let strategy = StrategySettings {
            kind,
            server_lr: self
                .server_lr
                .or(file.server_lr)
                .unwrap_or(kind.default_server_lr()),
            server_momentum: self.server_momentum.unwrap_or(file.server_momentum),
            beta1: self.beta1.unwrap_or(file.beta1),
            beta2: self.beta2.unwrap_or(file.beta2),
            tau: self.tau.unwrap_or(file.tau),
            proximal_mu: self.proximal_mu.or(file.proximal_mu).unwrap_or(
                if kind == StrategyKind::FedProx {
                    0.01
                } else {
                    0.0
                },
            ),
            trim_fraction: self.trim_fraction.unwrap_or(file.trim_fraction),
            krum_f: self.krum_f.unwrap_or(file.krum_f),
            krum_m: self.krum_m.unwrap_or(file.krum_m),
            fraction_fit: self.fraction_fit.unwrap_or(file.fraction_fit),
            min_fit_clients: self.min_fit_clients.unwrap_or(file.min_fit_clients),
            fraction_evaluate: self.fraction_evaluate.unwrap_or(file.fraction_evaluate),
            min_evaluate_clients: self
                .min_evaluate_clients
                .unwrap_or(file.min_evaluate_clients),
            evaluate_every: self.evaluate_every.unwrap_or(file.evaluate_every),
            buffer_memory: validate::mib_to_bytes(
                "buffer_memory_mb",
                self.buffer_memory_mb.unwrap_or(file.buffer_memory_mb),
            )?,
            spill_dir: out.join("spill"),
            seed: self.seed.unwrap_or(file.seed),
        };
        let policy = RoundPolicy {
            min_available_clients: self
                .min_available_clients
                .unwrap_or(file.min_available_clients),
            available_timeout: self.available_timeout.unwrap_or(file.available_timeout),
            round_timeout: self.round_timeout.unwrap_or(file.round_timeout),
            grace_period: self.grace_period.or(file.grace_period),
            accept_failures: self.accept_failures.unwrap_or(file.accept_failures),
            on_round_failure: self.on_round_failure.unwrap_or(file.on_round_failure),
            round_retries: self.round_retries.unwrap_or(file.round_retries),
        };
        let privacy = privacy::resolve(
            &self.privacy,
            &PrivacyFile {
                dp: file.dp.clone(),
                dp_clip: file.dp_clip.clone(),
                dp_noise_multiplier: file.dp_noise_multiplier,
                dp_clip_initial: file.dp_clip_initial,
                dp_target_quantile: file.dp_target_quantile,
                dp_clip_lr: file.dp_clip_lr,
                dp_clipped_count_stddev: file.dp_clipped_count_stddev,
                dp_delta: file.dp_delta,
                dp_max_epsilon: file.dp_max_epsilon,
            },
            &strategy,
            &policy,
        )?;
        let secure_agg = secure_agg::resolve(
            &self.secure_agg,
            &SecureAggFile {
                secure_aggregation: file.secure_aggregation,
                secagg_threshold: file.secagg_threshold,
                secagg_neighbours: file.secagg_neighbours,
                secagg_clip: file.secagg_clip,
                secagg_bits: file.secagg_bits,
                secagg_step_timeout: file.secagg_step_timeout,
            },
            &strategy,
            privacy.as_ref(),
        )?;
        let compression = compression::resolve(
            &self.compression,
            file.compress_up.as_deref(),
            file.compress_down.as_deref(),
            secure_agg.is_some(),
        )?;
        let cfg = ServeConfig {
            listen: self.listen.unwrap_or(file.listen),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            rounds: self.rounds.unwrap_or(file.rounds),
            policy,
            privacy,
            secure_agg,
            compression,
            strategy,
            resume: self.resume || file.resume,
            fresh: self.fresh,
            init: init_file,
            hf_init: resolved.hf_dir,
            tokenizer: resolved.tokenizer,
            init_options: InitOptions {
                remap,
                layout: init_layout
                    .as_deref()
                    .unwrap_or("auto")
                    .parse()
                    .map_err(anyhow::Error::msg)
                    .context("invalid `init_layout`")?,
                reset_head: if reset_head {
                    Some(
                        model
                            .head_prefix()
                            .context("`reset_head`: this model has no classifier head")?
                            .to_string(),
                    )
                } else {
                    None
                },
            },
            export_pytorch: self.export_pytorch || file.export_pytorch,
            out,
            eval_data: pick(&self.eval_data, file.eval_data),
            eval_text_column: self
                .eval_text_column
                .clone()
                .unwrap_or(file.eval_text_column),
            eval_label_column: self
                .eval_label_column
                .clone()
                .unwrap_or(file.eval_label_column),
            local_epochs: self.local_epochs.unwrap_or(file.local_epochs),
            batch_size: self.batch_size.unwrap_or(file.batch_size),
            lr: self.lr.unwrap_or(file.lr),
            optimizer: OptimizerSettings {
                kind: optimizer
                    .parse()
                    .map_err(anyhow::Error::msg)
                    .context("invalid `optimizer`")?,
                momentum: self.momentum.unwrap_or(file.momentum),
                nesterov: self.nesterov.unwrap_or(file.nesterov),
                weight_decay: self.weight_decay.unwrap_or(file.weight_decay),
            },
            lr_schedule: self
                .lr_schedule
                .clone()
                .unwrap_or(file.lr_schedule)
                .parse()
                .map_err(anyhow::Error::msg)
                .context("invalid `lr_schedule`")?,
            warmup_steps: self.warmup_steps.unwrap_or(file.warmup_steps),
            lr_round_decay: self.lr_round_decay.unwrap_or(file.lr_round_decay),
            clip_norm: self.clip_norm.unwrap_or(file.clip_norm),
            dropout: self.dropout.or(file.dropout).unwrap_or(DROPOUT),
            security,
            limits,
            frozen: frozen_tensors(&self.freeze.clone().unwrap_or(file.freeze), &model)?,
            model,
            augment: Augment {
                crop_padding: self
                    .augment_crop_padding
                    .unwrap_or(file.augment_crop_padding) as usize,
                flip: self.augment_flip.unwrap_or(file.augment_flip),
                noise_std: self.augment_noise.unwrap_or(file.augment_noise) as f32,
            },
            early_stopping_patience: self
                .early_stopping_patience
                .unwrap_or(file.early_stopping_patience),
            personalize_steps: self.personalize_steps.unwrap_or(file.personalize_steps),
            ditto_lambda: self.ditto_lambda.unwrap_or(file.ditto_lambda),
            log_format: self.log_format.unwrap_or(file.log_format),
            seed: self.seed.unwrap_or(file.seed),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ServeConfig {
    /// The strategy as logs and metrics name it: `fedavg`, or `fedavg+dp-central` under DP.
    pub fn strategy_name(&self) -> String {
        match &self.privacy {
            Some(dp) => format!("{}+dp-{}", self.strategy.kind, dp.mode.name()),
            None => self.strategy.kind.to_string(),
        }
    }
}

/// `--freeze` resolved to exact names, plus the frozen base of LoRA adapters.
fn frozen_tensors(freeze_spec: &str, model: &ModelSpec) -> anyhow::Result<Vec<String>> {
    let mut frozen = freeze::resolve(freeze_spec, model)
        .map_err(anyhow::Error::msg)
        .context("invalid `freeze`")?;
    if model.lora.is_some() {
        if !frozen.is_empty() {
            bail!(
                "`freeze` and `lora_rank` both choose what trains: with LoRA only the adapters and the head train; drop one of them"
            );
        }
        frozen = model.lora_frozen();
    }
    Ok(frozen)
}

#[cfg(test)]
mod tests;
