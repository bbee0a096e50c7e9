//! A tiered aggregator (`serve --upstream URL`): a client of its parent coordinator and a
//! coordinator of its own clients. For each of the parent's training tasks it fetches the
//! model once, runs the round among its clients with the parent's recipe (`round::relay`),
//! and sends the parent one update: their example-weighted mean (accumulated in f64) with
//! their total examples, which the parent weighs like any client's, so that FedAvg over the
//! tree equals FedAvg over all clients. Evaluation tasks pass down the same way and their
//! figures come back combined. The parent's finish ends this aggregator's clients' run too.
//!
//! Nothing is resumed here: an aggregator that dies mid-round loses that round's update, and
//! its parent counts it failed by its own round policy (`accept_failures`, `min_fit_clients`).
//! One whose own round fails declines the parent's task (DeclineTask), so the parent does not
//! wait for its deadline.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fedtune_client::upstream::{Upstream, UpstreamOptions};
use fedtune_common::codec::Codec;
use fedtune_common::models::ModelSpec;
use fedtune_common::spec_wire;
use fedtune_common::tensors::{NamedTensor, TensorSet};
use fedtune_common::wire::{EncodedTensors, MAX_CHUNK_BYTES};
use fedtune_proto::{self as pb, task::Kind};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::ServeConfig;
use crate::round::{Federation, Personalize, RelayTrain};
use crate::round_record::human_bytes;
use crate::server::{self, Serving};

/// The clients' side, once the parent's first training task says what the model is.
struct Below {
    engine: Arc<Federation>,
    serving: Serving,
    spec: ModelSpec,
}

/// Runs the aggregator until the parent's run is finished, or `stop` says why to stop.
pub async fn aggregate_until(
    cfg: ServeConfig,
    upstream: UpstreamOptions,
    listener: TcpListener,
    stop: impl Future<Output = String>,
) -> anyhow::Result<()> {
    // The flags are checked in `UpstreamArgs::resolve`; these can also come from --config.
    if cfg.secure_agg.is_some() || cfg.privacy.is_some() {
        bail!(
            "an aggregator (--upstream) takes privacy settings from its parent: remove `secure_aggregation` and `dp` from its --config"
        );
    }
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("cannot create --out {}", cfg.out.display()))?;
    info!(
        "aggregator {}: parent {}; serves its clients on {} once the parent's first round says what the model is",
        upstream.name,
        upstream.coordinator,
        listener.local_addr()?
    );
    let up = Upstream::new(upstream)?;
    let mut below = None;
    let result = tokio::select! {
        r = relay(cfg, up, listener, &mut below) => r,
        why = stop => {
            info!("aggregator stopped ({why}); its clients wait for it to come back");
            Ok(())
        }
    };
    if let Some(b) = below {
        b.serving.shutdown().await;
    }
    result
}

/// Answers the parent's tasks until it says the run is finished.
async fn relay(
    mut cfg: ServeConfig,
    mut up: Upstream,
    listener: TcpListener,
    below: &mut Option<Below>,
) -> anyhow::Result<()> {
    let mut listener = Some(listener);
    // (round, attempt) of the last relayed training round: the parent's retry of a round is
    // a fresh attempt here too, so its clients' tasks get new ids.
    let mut last = (0u64, 0u32);
    loop {
        match up.next_task().await?.kind {
            Some(Kind::Train(task)) => {
                let spec =
                    spec_wire::from_pb(task.model.as_ref().context("a task without a model")?)
                        .context("the parent asked for a model this aggregator cannot build")?;
                let config = task
                    .config
                    .clone()
                    .context("a task without a training config")?;
                let _heartbeat = up
                    .heartbeat(format!("aggregating round {}", task.round))
                    .await?;
                let global = match up
                    .fetch_model(&task.task_id, task.round, &spec, &config.frozen)
                    .await
                {
                    Ok(g) => g,
                    // The download was already retried: this round goes on without this
                    // subtree, and the aggregator asks for the next task.
                    Err(e) => {
                        let why = format!("{e:#}");
                        let said = up
                            .decline(&task.task_id, &why)
                            .await
                            .unwrap_or_else(|e| format!("the parent could not be told: {e:#}"));
                        warn!("aggregator round {}: {why} ({said})", task.round);
                        continue;
                    }
                };
                if below.is_none() {
                    cfg.model = spec.clone();
                    cfg.frozen = config.frozen.clone();
                    // The parent decides how many rounds there are.
                    cfg.rounds = 0;
                    let engine = Arc::new(Federation::new(cfg.clone(), global.specs()));
                    let listener = listener.take().context("the listener was already used")?;
                    let serving = server::start(&cfg, listener, engine.clone()).await?;
                    info!(
                        "aggregator: model {} ({} parameters); waiting for {} clients",
                        spec.kind,
                        global.num_params(),
                        cfg.policy.min_available_clients
                    );
                    *below = Some(Below {
                        engine,
                        serving,
                        spec: spec.clone(),
                    });
                }
                let Some(b) = below.as_ref() else {
                    bail!("the aggregator's server did not start")
                };
                if b.spec != spec {
                    bail!(
                        "the parent changed the model from {} to {} within a run; restart this aggregator",
                        b.spec.kind,
                        spec.kind
                    );
                }
                let attempt = if last.0 == task.round { last.1 + 1 } else { 1 };
                last = (task.round, attempt);
                train(&mut up, &b.engine, task, config, global, attempt).await?;
            }
            Some(Kind::Evaluate(task)) => {
                let (examples, metrics) = match below.as_ref() {
                    Some(b) => {
                        let _heartbeat = up
                            .heartbeat(format!("evaluating round {}", task.round))
                            .await?;
                        let frozen = up.frozen_held();
                        let global = match up
                            .fetch_model(&task.task_id, task.round, &b.spec, &frozen)
                            .await
                        {
                            Ok(g) => g,
                            Err(e) => {
                                warn!(
                                    "aggregator round {} evaluation: {e:#}; the parent goes on without it",
                                    task.round
                                );
                                continue;
                            }
                        };
                        let e = b
                            .engine
                            .relay_evaluate(
                                task.round,
                                task.model_version,
                                Arc::new(global),
                                Personalize::of(&task),
                            )
                            .await?;
                        info!(
                            "aggregator round {} evaluation: {} of {} clients reported on {} examples",
                            task.round, e.reported, e.selected, e.num_examples
                        );
                        (e.num_examples, e.metrics)
                    }
                    // No clients yet: a zero-weight report rather than a wait.
                    None => (0, Default::default()),
                };
                let said = up.submit_evaluation(&task, examples, metrics).await?;
                tracing::debug!("evaluation sent to the parent: {said}");
            }
            Some(Kind::Wait(w)) => {
                tracing::debug!("parent: {}", w.reason);
                tokio::time::sleep(Duration::from_millis(u64::from(w.retry_after_ms))).await;
            }
            Some(Kind::Finished(f)) => {
                info!(
                    "the parent finished the run ({}); telling the clients",
                    f.reason
                );
                if let Some(b) = below.as_ref() {
                    b.engine
                        .relay_finished(format!("the parent coordinator finished: {}", f.reason))
                        .await;
                }
                return Ok(());
            }
            Some(Kind::Secagg(_)) => bail!(
                "the parent sent a secure-aggregation step, which an aggregator cannot take part in"
            ),
            None => bail!("the parent sent an empty task; it may speak a newer protocol"),
        }
    }
}

/// One relayed training round: the round among the clients, then one update to the parent.
async fn train(
    up: &mut Upstream,
    engine: &Federation,
    task: pb::TrainTask,
    config: pb::TrainConfig,
    global: TensorSet,
    attempt: u32,
) -> anyhow::Result<()> {
    let codec = Codec::from_proto(task.upload.as_ref())
        .context("the parent asked for an update encoding this aggregator cannot produce")?;
    let fit = engine
        .relay_train(RelayTrain {
            round: task.round,
            attempt,
            model_version: task.model_version,
            config,
            global: Arc::new(global),
        })
        .await?;
    let Some(mean) = fit.mean else {
        let why = fit.failure.as_deref().unwrap_or("no update");
        let said = up
            .decline(&task.task_id, &format!("its round failed: {why}"))
            .await
            .unwrap_or_else(|e| format!("the parent could not be told: {e:#}"));
        warn!(
            "aggregator round {}: {why}; no update for the parent, which counts this aggregator as failed by its round policy ({said})",
            task.round
        );
        return Ok(());
    };
    fedtune_common::crash_point::reached("relay-upload");
    let encoded = tokio::task::block_in_place(|| {
        let set = as_tensors(engine.update_specs(), mean)?;
        if codec == Codec::F32 {
            EncodedTensors::encode(&set, task.model_version, MAX_CHUNK_BYTES)
        } else {
            EncodedTensors::compress(&set, |_| true, codec, task.model_version, MAX_CHUNK_BYTES)
        }
        .map_err(anyhow::Error::from)
    })?;
    up.set_examples(fit.num_examples);
    let sent = match up
        .upload(&task, &encoded, fit.num_examples, &fit.metrics)
        .await
    {
        Ok(d) => format!(
            "up {}{} to the parent: {}",
            human_bytes(d.bytes),
            if codec == Codec::F32 {
                String::new()
            } else {
                format!(" {codec}")
            },
            if d.counted {
                d.message
            } else {
                format!("not counted: {}", d.message)
            }
        ),
        Err(e) => format!("the update did not reach the parent: {e:#}"),
    };
    info!(
        "aggregator round {}: {}/{} clients reported, {} examples | down {} up {} from the clients | {sent}",
        task.round,
        fit.reported,
        fit.selected,
        fit.num_examples,
        human_bytes(fit.bytes_down),
        human_bytes(fit.bytes_up),
    );
    Ok(())
}

/// A flat mean in the order of `specs` as named tensors.
fn as_tensors(
    specs: &[fedtune_common::tensors::TensorSpec],
    flat: Vec<f32>,
) -> anyhow::Result<TensorSet> {
    let mut at = 0;
    let mut tensors = Vec::with_capacity(specs.len());
    for s in specs {
        let n = s.num_elements();
        let values = flat
            .get(at..at + n)
            .context("the combined update is shorter than the model")?
            .to_vec();
        tensors.push(NamedTensor::new(s.name.clone(), s.shape.clone(), values)?);
        at += n;
    }
    Ok(TensorSet::new(tensors)?)
}
