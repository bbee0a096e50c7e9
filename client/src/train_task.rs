//! One Train task on the client: download the model (and SCAFFOLD's server variate), fine-tune
//! while heartbeating, then upload the update or take part in secure aggregation's steps.

use anyhow::{Context, bail};
use fedtune_common::codec::Codec;
use fedtune_common::spec_wire;
use fedtune_common::wire::Payload;
use fedtune_proto as pb;
use tracing::{info, warn};

use crate::control_variate::{VariateStore, server_variate_specs};
use crate::error_feedback::ErrorFeedback;
use crate::fine_tune::{self, LocalUpdate, Split};
use crate::frozen_cache::FrozenCache;
use crate::local_data::LocalData;
use crate::progress::{ProgressView, report_training};
use crate::secure_agg::Contribution;
use crate::session::{ClientOptions, Session, TrainMode};
use crate::task_config;
use crate::transfer::{PendingUpload, TaskRef, download, spawn_heartbeat, undelivered, upload};

/// What a client keeps between rounds.
pub(crate) struct Held<'a> {
    pub(crate) frozen: &'a mut FrozenCache,
    pub(crate) feedback: &'a mut ErrorFeedback,
    pub(crate) variates: &'a VariateStore,
}

/// SCAFFOLD: the variate staged for `task_id` becomes the client's once its update is counted,
/// and is dropped when it was refused.
pub(crate) fn keep_variate(
    store: &VariateStore,
    accepted: bool,
    task_id: &str,
) -> anyhow::Result<()> {
    if accepted {
        store.commit(task_id)
    } else {
        store.discard();
        Ok(())
    }
}

/// One Train task: download, fine-tune (heartbeating), upload (or, under secure aggregation,
/// take part in its steps). Returns whether the update was counted, and a task the
/// coordinator sent instead of the next secure step, if it did.
pub(crate) async fn train_round(
    s: &mut Session,
    task: pb::TrainTask,
    opts: &ClientOptions,
    data: Option<&LocalData>,
    held: Held<'_>,
) -> anyhow::Result<(bool, Option<pb::Task>)> {
    let cache = held.frozen;
    let spec_pb = task.model.clone().context("train task without a model")?;
    let spec = spec_wire::from_pb(&spec_pb)
        .context("coordinator asked for a model this client cannot build")?;
    let codec = Codec::from_proto(task.upload.as_ref())
        .context("the coordinator asked for an update encoding this client cannot produce")?;
    // Heartbeats from download to upload, so a long transfer or training is never taken for
    // a dead client.
    let (training_tx, training_rx) = tokio::sync::watch::channel(None);
    let _heartbeat = spawn_heartbeat(s, format!("round {}", task.round), Some(training_rx));
    let download_started = std::time::Instant::now();
    let frozen = task
        .config
        .as_ref()
        .map(|c| c.frozen.clone())
        .unwrap_or_default();
    // SCAFFOLD: the server's control variate follows the model.
    let variate_key = task
        .config
        .as_ref()
        .map(|c| c.control_variate.clone())
        .filter(|k| !k.is_empty());
    let with_model = match &variate_key {
        Some(_) => server_variate_specs(&spec.specs(), &frozen),
        None => Vec::new(),
    };
    let payload = download(
        s,
        TaskRef {
            task_id: &task.task_id,
            round: task.round,
        },
        &spec,
        cache.offer(&frozen),
        &with_model,
    )
    .await?;
    fedtune_common::crash_point::reached("train");
    let (bytes_down, download_s) = (
        // As it travelled (compressed or not).
        payload.manifest.total_bytes,
        download_started.elapsed().as_secs_f64(),
    );
    // The coordinator's order of the trainable tensors: a masked update is one flat vector.
    let order: Vec<String> = payload
        .specs
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| !frozen.contains(n))
        .collect();

    let cfg = task
        .config
        .clone()
        .context("train task without a training config")?;
    // Different clients shuffle differently within a round, the same way in every run.
    let seed = cfg.seed ^ opts.seed.rotate_left(17) ^ fxhash(&opts.name);
    let (mut settings, dropout) = task_config::settings_from(&cfg, opts.caps, seed, &opts.name)?;
    let local_dp = task_config::local_dp_from(&cfg)?;

    let started = std::time::Instant::now();
    let mut variates = None;
    let update = match (opts.train, data) {
        (TrainMode::None, _) if variate_key.is_some() => {
            bail!("SCAFFOLD trains with a control variate: run this client with --train full")
        }
        (TrainMode::None, _) => {
            // The download was verified; free it before building the fixed delta.
            let Payload { specs, bytes, .. } = payload;
            drop(bytes);
            let trainable: Vec<_> = specs
                .into_iter()
                .filter(|s| !frozen.contains(&s.name))
                .collect();
            fine_tune::fixed_update(&trainable, data.map_or(1, |d| d.train_idx.len() as u64))
        }
        (TrainMode::Full, None) => Err(anyhow::anyhow!("no local data")),
        (TrainMode::Full, Some(data)) => {
            if spec.kind.is_synthetic() {
                bail!(
                    "the coordinator runs a synthetic model, which cannot be trained: run this client with --train none"
                );
            }
            let examples = data.examples_for(&spec)?;
            let mut received = payload.into_tensor_set()?;
            if let Some(key) = &variate_key {
                let (model, round) = held.variates.begin(key, received)?;
                settings.correction = Some(round.correction(&model)?);
                received = model;
                variates = Some(round);
            }
            let global = cache.complete(received, &spec, &frozen)?;
            let (device, bar, round, name) = (
                opts.device,
                opts.progress_bar,
                task.round,
                opts.name.clone(),
            );
            let task_id = task.task_id.clone();
            // Training is CPU/GPU-bound: keep it off the async threads so heartbeats flow.
            tokio::task::block_in_place(|| {
                let mut view = ProgressView::new(bar, &name, round);
                let r = fine_tune::fine_tune(
                    &global,
                    &spec,
                    &settings,
                    dropout,
                    Split::of(data, examples.as_ref()),
                    device,
                    &mut |p| {
                        view.update(p);
                        report_training(&training_tx, &task_id, p);
                    },
                );
                view.finish();
                r
            })
        }
    };
    let mut update = update?;
    let train_s = started.elapsed().as_secs_f64();
    if let Some(v) = &variates {
        let step_weight = update
            .metrics
            .get("step_weight")
            .copied()
            .unwrap_or(f64::NAN);
        let next = v.next(&update.delta, step_weight)?;
        held.variates.stage(&task.task_id, &v.key, &next)?;
    }
    if let Some((clip, sigma)) = local_dp {
        let norm = fedtune_common::dp::privatize(&mut update.delta, clip, sigma);
        info!(
            "{} round {}: local DP: update norm {norm:.4} {} {clip}, Gaussian noise σ {sigma:.4} added",
            opts.name,
            task.round,
            if norm > clip { "clipped to" } else { "within" }
        );
    }
    if let Some(attack) = opts.attack {
        attack.apply(&mut update.delta, settings.seed);
    }

    // Encode, then free the delta before streaming: one model-sized buffer, not two.
    let LocalUpdate {
        delta,
        num_examples,
        metrics,
    } = update;
    if let Some(spec) = &task.secagg {
        let upload_started = std::time::Instant::now();
        let outcome = crate::secure_agg::contribute(
            s,
            &task,
            spec,
            &order,
            delta,
            num_examples,
            metrics,
            opts.die_after,
        )
        .await?;
        return Ok(match outcome {
            Contribution::Done {
                masked_accepted,
                message,
            } => {
                info!(
                    "{} round {} | down {:.2} MB in {:.1} s | {} epochs on {} examples in {:.1} s | masked update and shares in {:.1} s | {}",
                    opts.name,
                    task.round,
                    bytes_down as f64 / 1e6,
                    download_s,
                    settings.epochs,
                    num_examples,
                    train_s,
                    upload_started.elapsed().as_secs_f64(),
                    message
                );
                (masked_accepted, None)
            }
            Contribution::Superseded(next) => {
                warn!(
                    "{} round {}: the round went on without this client's secure contribution",
                    opts.name, task.round
                );
                (false, Some(*next))
            }
        });
    }
    let update = tokio::task::block_in_place(|| {
        held.feedback
            .encode(delta, codec, task.model_version, &opts.name)
    })?;
    let upload_started = std::time::Instant::now();
    let (accepted, bytes_up, message) =
        match upload(s, &task, &update.encoded, num_examples, &metrics).await {
            Ok(r) => r,
            Err(e) => {
                // Sent again later; what top-k left behind this time is not carried.
                let pending = PendingUpload {
                    task,
                    encoded: update.encoded,
                    num_examples,
                    metrics,
                    resent: 0,
                };
                return Err(undelivered(e, Box::new(pending)));
            }
        };
    let upload_s = upload_started.elapsed().as_secs_f64();
    let codec = update.codec;
    if accepted {
        held.feedback.counted(update);
    }
    if variates.is_some() {
        keep_variate(held.variates, accepted, &task.task_id)?;
    }
    let up_codec = match codec {
        Codec::F32 => String::new(),
        // What error feedback carries to the next round: visible, so it can be watched.
        Codec::TopK(_) => format!(
            " {codec} (unsent values carried: norm {:.4})",
            held.feedback.carried_norm()
        ),
        c => format!(" {c}"),
    };
    let m = |k: &str| metrics.get(k).copied();
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
    info!(
        "{} ({}) round {} | down {:.2} MB in {:.1} s | {} epochs on {} examples in {:.1} s | train loss {} | val loss {} acc {} f1 {} | up {:.2} MB{up_codec} in {:.1} s | {}",
        opts.name,
        s.client_id,
        task.round,
        bytes_down as f64 / 1e6,
        download_s,
        settings.epochs,
        num_examples,
        train_s,
        fmt(m("train_loss"), 4),
        fmt(m("val_loss"), 4),
        m("val_accuracy").map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
        fmt(m("val_f1"), 4),
        bytes_up as f64 / 1e6,
        upload_s,
        message
    );
    Ok((accepted, None))
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}
