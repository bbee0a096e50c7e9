//! The fedtune coordinator: holds the global model, runs federation rounds over gRPC and merges
//! client updates.
//!
//! - [`config`]: `serve` settings (defaults < TOML < flags), validated once.
//! - [`round`]: the round state machine, the heart; [`clients`]: who joined.
//! - [`service`]: the thin tonic service over the engine.
//! - [`strategy`]: configure and aggregate: FedAvg and the other strategies, client sampling.
//! - [`run_dir`], [`round_record`]: what each round writes and logs.
//! - [`evaluation`]: server-side evaluation; [`demo`]: the one-command local federation;
//!   [`pretrain`]: central pre-training, the starting point of a fine-tuning run.

pub mod auth;
pub mod bench;
pub mod broadcast;
pub mod cli;
pub mod clients;
pub mod config;
pub mod demo;
mod demo_text;
pub mod dp_plan;
pub mod embed_cmd;
pub mod evaluation;
pub mod hf_export;
pub mod journal;
pub mod limits;
pub mod partition_cmd;
pub mod pretrain;
pub mod probe;
pub mod provision;
pub mod report;
pub mod round;
pub mod round_record;
pub mod run_dir;
pub mod run_identity;
pub mod run_start;
pub mod secure_agg;
pub mod server;
pub mod service;
pub mod status_cmd;
pub mod status_view;
pub mod strategy;
pub mod telemetry;
pub mod tier;
pub mod tls;
pub mod tokens;
pub mod tune;
pub mod upload;
pub mod watched;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fedtune_common::models::hf_bert;
use fedtune_common::pretrained;
use fedtune_common::tensors::TensorSet;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::ServeConfig;
use crate::evaluation::{ServerEval, TextColumns};
use crate::hf_export::HfSources;
use crate::round::{Federation, RunSummary, Start};
use crate::run_dir::RunDir;
use crate::run_start::RunStart;
use crate::strategy::Strategy;
use crate::strategy::dp::Private;
use crate::strategy::layout::Layout;

/// HTTP/2 flow-control windows: the defaults (64 KiB) halve throughput for large models even
/// on loopback; larger than these, what clients park in the coordinator's buffers (an upload
/// waiting for its slot, a download ahead of its reader) grows by megabytes per client.
pub const STREAM_WINDOW: u32 = 2 << 20;
pub const CONNECTION_WINDOW: u32 = 4 << 20;
/// HTTP/2 frames large enough that a 1 MiB chunk is a handful of frames, not 64.
pub const MAX_FRAME: u32 = (1 << 20) + (64 << 10);
/// Transport keep-alive, so idle connections through NATs and load balancers stay open.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Binds `cfg.listen` with an error that says what to do.
pub async fn bind(cfg: &ServeConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(cfg.listen).await.with_context(|| format!("cannot listen on {} (is another coordinator running? choose another address with --listen)", cfg.listen))
}

/// Loads a Hugging Face BERT folder onto the fresh model `init` and reports what it did.
fn load_hf(dir: &std::path::Path, init: &TensorSet) -> anyhow::Result<TensorSet> {
    let path = hf_bert::weights_path(dir).map_err(anyhow::Error::msg)?;
    let (loaded, report) = hf_bert::load(&path, init)?;
    info!(
        "loaded {}: {} tensors applied, {} fresh (head, adapters), {} unused in the file",
        path.display(),
        report.applied.len(),
        report.missing.len(),
        report.unused.len()
    );
    if !report.missing.is_empty() {
        info!("fresh: {}", report.missing.join(", "));
    }
    if !report.unused.is_empty() {
        info!(
            "unused from {}: {}",
            path.display(),
            report.unused.join(", ")
        );
    }
    Ok(loaded)
}

/// Runs a whole federation on `listener` and returns when the last round is written.
pub async fn serve(cfg: ServeConfig, listener: TcpListener) -> anyhow::Result<RunSummary> {
    serve_until(cfg, listener, std::future::pending()).await
}

/// [`serve`], stopping early when `stop` completes with the reason (a signal): no new work,
/// the last completed round stays in `--out`, clients are told to wait for the coordinator to
/// come back, and the run resumes when the coordinator is started again.
pub async fn serve_until(
    cfg: ServeConfig,
    listener: TcpListener,
    stop: impl Future<Output = String>,
) -> anyhow::Result<RunSummary> {
    let global = initial_global(&cfg)?;
    let server_eval = match &cfg.eval_data {
        Some(dir) => {
            let text = cfg.tokenizer.as_deref().map(|tokenizer| TextColumns {
                tokenizer,
                text_column: &cfg.eval_text_column,
                label_column: &cfg.eval_label_column,
            });
            let eval = ServerEval::open(dir, cfg.model.clone(), text)?;
            info!(
                "server-side evaluation on {} examples from {}",
                eval.examples(),
                dir.display()
            );
            Some(Arc::new(eval))
        }
        None => None,
    };
    let specs = global.specs();
    let (strategy, run_dir, start) = open_run(&cfg, global)?;
    if start.round > 1 && !cfg.resume {
        // Resuming is the default when the settings match; say how not to.
        info!(
            "--fresh starts a new run instead (this one is moved to {}/{})",
            cfg.out.display(),
            crate::run_dir::EARLIER_RUNS
        );
    }
    let addr = listener.local_addr()?;
    info!(
        "coordinator listening on {addr}: model {} ({} tensors, {} parameters), rounds {}..={}, waiting for {} clients; writing to {}",
        cfg.model.kind,
        specs.len(),
        start.global.num_params(),
        start.round,
        cfg.rounds,
        cfg.policy.min_available_clients,
        cfg.out.display()
    );
    log_trainable(&cfg, &specs);

    let engine = Arc::new(Federation::new(cfg.clone(), specs));
    let serving = server::start(&cfg, listener, engine.clone()).await?;

    let hf_sources = match (&cfg.hf_init, &cfg.tokenizer) {
        (Some(model_dir), Some(tokenizer)) => Some(HfSources {
            model_dir: model_dir.clone(),
            tokenizer: tokenizer.clone(),
        }),
        _ => None,
    };
    let run_dir = run_dir.with_pytorch_export(cfg.export_pytorch, hf_sources);
    let result = engine
        .run(start, strategy, run_dir, server_eval, stop)
        .await;
    serving.shutdown().await;
    result
}

/// The model a run starts from: fresh weights from the seed, then the `init` file or
/// Hugging Face folder when there is one.
pub fn initial_global(cfg: &ServeConfig) -> anyhow::Result<TensorSet> {
    let mut global = cfg
        .model
        .init_weights(cfg.seed)
        .context("cannot initialise the model")?;
    if let Some(dir) = &cfg.hf_init {
        global = load_hf(dir, &global)?;
    } else if let Some(path) = &cfg.init {
        let (loaded, report, adapted) = pretrained::load(path, &global, &cfg.init_options)?;
        info!(
            "loaded pre-trained weights from {}: {} tensors applied, {} missing (fresh init), {} unused in the file",
            path.display(),
            report.applied.len(),
            report.missing.len(),
            report.unused.len()
        );
        let list = |v: &[String]| v.join(", ");
        if !report.missing.is_empty() {
            info!("missing from {}: {}", path.display(), list(&report.missing));
        }
        if !report.unused.is_empty() {
            info!("unused from {}: {}", path.display(), list(&report.unused));
        }
        if !adapted.transposed.is_empty() {
            info!(
                "transposed from PyTorch's [out, in] layout: {}",
                list(&adapted.transposed)
            );
        }
        for (name, file_shape) in &adapted.reset {
            let now = global
                .get(name)
                .map(|t| t.shape.clone())
                .unwrap_or_default();
            match file_shape {
                Some(shape) => info!(
                    "--reset-head: {name} re-initialised as {now:?} (the file's is {shape:?})"
                ),
                None => info!("--reset-head: {name} re-initialised as {now:?}"),
            }
        }
        global = loaded;
    }
    Ok(global)
}

/// The strategy (DP wrapped around it), the run folder and where the rounds start: a fresh
/// run from `global`, or the one in `cfg.out` resumed with its model and server state.
pub fn open_run(
    cfg: &ServeConfig,
    global: TensorSet,
) -> anyhow::Result<(Box<dyn Strategy>, RunDir, Start)> {
    let specs = global.specs();
    // The strategy sees only what trains: frozen tensors are never touched (not even by adding
    // zero, which turns -0.0 into 0.0 and would break the clients' frozen-tensor hash), and
    // server-optimiser state is sized to the trainable part (LoRA: the adapters, not 90 MB).
    let trainable: Vec<_> = specs
        .iter()
        .filter(|s| !cfg.frozen.contains(&s.name))
        .cloned()
        .collect();
    let mut strategy: Box<dyn Strategy> = strategy::build(cfg.strategy.clone(), &trainable);
    let strategy_name = cfg.strategy_name();
    if let Some(dp) = &cfg.privacy {
        strategy = Box::new(Private::new(
            strategy,
            dp.clone(),
            Arc::new(Layout::new(&trainable)),
        ));
        warn!(
            "differential privacy covers the model; the metrics clients report (training loss, validation figures) are not noised and reach this log and metrics.jsonl as they are"
        );
    }
    // DP keeps its accountant and clipping bound in the server state.
    let stateful = cfg.strategy.kind.is_stateful() || cfg.privacy.is_some();
    let (run_dir, start) = match run_start::open(cfg, &strategy_name, stateful)? {
        RunStart::Resume(r) => {
            r.global.check_matches(&specs).with_context(|| {
                format!(
                    "resume: {} does not fit the model",
                    r.run_dir.global_path().display()
                )
            })?;
            if let Some(state) = &r.strategy_state {
                strategy
                    .restore(state)
                    .map_err(anyhow::Error::msg)
                    .context("resume: the saved server state does not fit the model")?;
            }
            info!(
                "{} holds an unfinished run with these settings: resumed after round {} ({} server state restored)",
                cfg.out.display(),
                r.round,
                if r.strategy_state.is_some() {
                    strategy_name.as_str()
                } else {
                    "no"
                }
            );
            (
                r.run_dir,
                Start {
                    global: r.global,
                    round: r.round + 1,
                },
            )
        }
        RunStart::Fresh(run_dir) => (run_dir, Start { global, round: 1 }),
    };
    Ok((strategy, run_dir, start))
}

/// Says what trains: LoRA adapters, and the frozen tensors that travel once.
fn log_trainable(cfg: &ServeConfig, specs: &[fedtune_common::tensors::TensorSpec]) {
    if let Some(lora) = &cfg.model.lora {
        info!("LoRA adapters: {lora}");
    }
    if !cfg.frozen.is_empty() {
        let trains: Vec<_> = specs
            .iter()
            .filter(|s| !cfg.frozen.contains(&s.name))
            .collect();
        info!(
            "{} of {} tensors ({} parameters) train and travel; the other {} are frozen: sent to each client once and kept by content hash",
            trains.len(),
            specs.len(),
            trains.iter().map(|s| s.num_elements()).sum::<usize>(),
            specs.len() - trains.len()
        );
    }
}
