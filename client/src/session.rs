//! The client's side of the protocol: connect, join, pull tasks, download the model, upload the
//! update. Reconnects by itself with backoff; re-joins when the coordinator restarted.

use crate::tls::{ClientAuth, ClientSecurity};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use fedtune_common::codec::Codec;
use fedtune_common::device::DeviceChoice;
use fedtune_common::logging::NET;
use fedtune_common::spec_wire;
use fedtune_common::wire::Payload;
use fedtune_proto::federation_client::FederationClient;
use fedtune_proto::{self as pb, task::Kind};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::attack::Attack;
use crate::connection::{Backoff, refused, transient};
use crate::control_variate::{VariateStore, server_variate_specs};
use crate::error_feedback::ErrorFeedback;
use crate::evaluate_task::{EvalData, evaluate_round};
use crate::fine_tune::{self, LocalUpdate, Split};
use crate::frozen_cache::FrozenCache;
use crate::join::{JoinError, Joiner, join, reach};
use crate::local_data::{Columns, LocalData};
use crate::progress::{ProgressView, report_training};
use crate::secure_agg::Contribution;
use crate::task_config::{self, Caps};
use crate::transfer::{
    PendingUpload, TaskRef, UndeliveredUpdate, decline, download, resend, spawn_heartbeat,
    undelivered, upload,
};

/// Longest the coordinator may hold a NextTask call, plus slack.
pub(crate) const NEXT_TASK_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts for one download or upload before the task is given up.
pub(crate) const TRANSFER_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainMode {
    /// Fine-tune with burn.
    Full,
    /// Return a small fixed delta without training (protocol benchmarks).
    None,
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub coordinator: String,
    /// TLS settings (or plaintext with `insecure`).
    pub security: ClientSecurity,
    pub data: Option<PathBuf>,
    pub device: DeviceChoice,
    pub name: String,
    pub train: TrainMode,
    pub val_fraction: f64,
    pub seed: u64,
    pub progress_bar: bool,
    /// Give up when the coordinator stays unreachable this long.
    pub give_up_after: Duration,
    /// Test tool: tamper with every update (robustness experiments).
    pub attack: Option<Attack>,
    /// Test tool: abort after a secure-aggregation step (fault tests).
    pub die_after: Option<crate::secure_agg::DieAfter>,
    /// Limits on what the coordinator may ask of this client.
    pub caps: Caps,
    /// The label column of CSV data and text files.
    pub label_column: String,
    /// The text column of text files.
    pub text_column: String,
    /// The tokenizer.json this client holds, for text models.
    pub tokenizer: Option<PathBuf>,
    /// A local test set: federated evaluation measures the global model on it (all of it)
    /// instead of on the validation split.
    pub test_data: Option<PathBuf>,
    /// What this client keeps between rounds and restarts (SCAFFOLD's control variate).
    pub state_dir: PathBuf,
}

/// What the client did over the run.
#[derive(Debug, Default)]
pub struct RunReport {
    pub rounds_trained: u64,
    pub rounds_evaluated: u64,
    pub updates_accepted: u64,
}

pub(crate) struct Session {
    pub rpc: FederationClient<InterceptedService<Channel, ClientAuth>>,
    /// The coordinator's id for this session (`c3`), next to the client's name in its lines.
    pub client_id: String,
    pub token: String,
    pub heartbeat_every: Duration,
}

/// Runs the client until the coordinator says the federation is finished.
pub async fn run(opts: ClientOptions) -> anyhow::Result<RunReport> {
    let columns = Columns {
        text: opts.text_column.clone(),
        label: opts.label_column.clone(),
    };
    let data = match (&opts.data, opts.train) {
        (Some(path), _) => Some(LocalData::open(
            path,
            &columns,
            opts.tokenizer.clone(),
            opts.val_fraction,
            opts.seed,
        )?),
        (None, TrainMode::None) => None,
        (None, TrainMode::Full) => {
            bail!("--data is required to train (only --train none runs without data)")
        }
    };
    // Opened with no validation split: every example is a test example.
    let test = match &opts.test_data {
        Some(path) => Some(
            LocalData::open(path, &columns, opts.tokenizer.clone(), 0.0, opts.seed)
                .context("--test-data")?,
        ),
        None => None,
    };
    if opts.train == TrainMode::Full {
        // Fail now, not at the first task, when the device is not usable.
        opts.device.device()?;
    }
    let num_examples = data.as_ref().map_or(1, |d| d.train_idx.len() as u64);
    if let Some(d) = &data {
        info!(
            "{}: {} training and {} validation examples from {}, device {}",
            opts.name,
            d.train_idx.len(),
            d.val_idx.len(),
            d.source,
            opts.device
        );
    }

    let (endpoint, auth) = reach(&opts.coordinator, &opts.security)?;
    let mut backoff = Backoff::new(opts.give_up_after);
    let joiner = Joiner {
        coordinator: &opts.coordinator,
        name: &opts.name,
        device: opts.device.to_string(),
        aggregator: false,
    };
    let mut report = RunReport::default();
    let mut session: Option<Session> = None;
    let mut frozen_cache = FrozenCache::default();
    let mut feedback = ErrorFeedback::default();
    let variates = VariateStore::new(opts.state_dir.clone());
    // A task the coordinator sent while this client was inside secure aggregation.
    let mut handed_back: Option<pb::Task> = None;
    // An update not delivered because the coordinator was away: sent again first.
    let mut pending: Option<Box<PendingUpload>> = None;
    loop {
        let s = match session.as_mut() {
            Some(s) => s,
            None => match join(&endpoint, &auth, &joiner, num_examples).await {
                Ok(s) => {
                    backoff.reset();
                    session.insert(s)
                }
                Err(JoinError::Fatal(e)) => return Err(e),
                Err(JoinError::Retry(e)) => {
                    backoff
                        .wait(&format!("joining {}", opts.coordinator), &e)
                        .await?;
                    continue;
                }
            },
        };
        if let Some(p) = pending.take() {
            let (round, task_id) = (p.task.round, p.task.task_id.clone());
            match resend(s, p).await {
                Ok((accepted, message)) => {
                    info!("{} round {round}: update sent again: {message}", opts.name);
                    report.updates_accepted += u64::from(accepted);
                    keep_variate(&variates, accepted, &task_id)?;
                }
                Err(e) => {
                    pending = after_task_error(e, &format!("round {round}"), &mut session)?;
                    if pending.is_some() && session.is_some() {
                        // Still away: wait (bounded by --give-up-after) before the next try.
                        backoff
                            .wait("sending the update again", &"coordinator unreachable")
                            .await?;
                    }
                }
            }
            continue;
        }
        let mut req = tonic::Request::new(pb::NextTaskRequest {
            session_token: s.token.clone(),
        });
        req.set_timeout(NEXT_TASK_TIMEOUT);
        let next = match handed_back.take() {
            Some(t) => Ok(tonic::Response::new(t)),
            None => s.rpc.next_task(req).await,
        };
        let task = match next {
            Ok(t) => {
                backoff.reset();
                t.into_inner()
            }
            Err(st) if st.code() == Code::Unauthenticated => {
                warn!(
                    "coordinator no longer knows this session ({}); joining again",
                    st.message()
                );
                session = None;
                continue;
            }
            Err(st) if transient(&st) => {
                backoff.wait("asking for work", &st).await?;
                continue;
            }
            Err(st) => bail!("coordinator refused NextTask: {st}"),
        };
        match task.kind {
            Some(Kind::Train(t)) => {
                let (round, task_id) = (t.round, t.task_id.clone());
                let held = Held {
                    frozen: &mut frozen_cache,
                    feedback: &mut feedback,
                    variates: &variates,
                };
                match train_round(s, t, &opts, data.as_ref(), held).await {
                    Ok((accepted, next)) => {
                        report.rounds_trained += 1;
                        report.updates_accepted += u64::from(accepted);
                        handed_back = next;
                    }
                    Err(e) => match after_task_error(e, &format!("round {round}"), &mut session) {
                        Ok(p) => pending = p,
                        Err(fatal) => {
                            // The coordinator learns why now, not at the round's deadline.
                            if let Some(s) = session.as_mut()
                                && let Err(st) = decline(s, &task_id, &format!("{fatal:#}")).await
                            {
                                tracing::debug!("could not decline task `{task_id}`: {st}");
                            }
                            return Err(fatal);
                        }
                    },
                }
            }
            Some(Kind::Evaluate(t)) => {
                let round = t.round;
                let local = EvalData {
                    data: data.as_ref(),
                    test: test.as_ref(),
                };
                match evaluate_round(s, t, &opts, local, &mut frozen_cache).await {
                    Ok(()) => report.rounds_evaluated += 1,
                    Err(e) => {
                        after_task_error(e, &format!("round {round} evaluation"), &mut session)?;
                    }
                }
            }
            Some(Kind::Wait(w)) => {
                tracing::debug!("waiting: {}", w.reason);
                tokio::time::sleep(Duration::from_millis(u64::from(w.retry_after_ms))).await;
            }
            Some(Kind::Secagg(step)) => {
                // A step of a task this client no longer holds (it restarted mid-round): the
                // round goes on without it.
                tracing::debug!(
                    "secure-aggregation step for task `{}`, which this client does not hold; waiting",
                    step.task_id
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Some(Kind::Finished(f)) => {
                info!(
                    "{}: federation finished ({}); trained {} rounds, {} updates accepted",
                    opts.name, f.reason, report.rounds_trained, report.updates_accepted
                );
                return Ok(report);
            }
            None => bail!("coordinator sent an empty task; it may speak a newer protocol"),
        }
    }
}

/// Times an undelivered update is sent again before it is given up.
const RESENDS: u32 = 5;

/// After a task failed: re-join (session lost), ask for work again (transfers already retried;
/// the NextTask loop reconnects with backoff), or stop the client with the error. Returns an
/// update to send again once the coordinator is back, if the task left one.
fn after_task_error(
    e: anyhow::Error,
    what: &str,
    session: &mut Option<Session>,
) -> anyhow::Result<Option<Box<PendingUpload>>> {
    let e = match e.downcast::<UndeliveredUpdate>() {
        Ok(mut u) if u.pending.resent < RESENDS => {
            warn!("{u}");
            if u.why.code() == Code::Unauthenticated {
                u.pending.resent += 1;
                *session = None;
            }
            return Ok(Some(u.pending));
        }
        Ok(u) => {
            warn!(
                "{what}: the update could not be delivered after {RESENDS} tries ({}); giving it up",
                u.why.message()
            );
            if u.why.code() == Code::Unauthenticated {
                *session = None;
            }
            return Ok(None);
        }
        Err(e) => e,
    };
    match e.downcast_ref::<Status>() {
        Some(st) if st.code() == Code::Unauthenticated => {
            warn!(target: NET, "{what}: session lost ({e}); joining again");
            *session = None;
            Ok(None)
        }
        Some(st) if transient(st) => {
            warn!(target: NET, "{what}: {e:#}; asking for work again");
            Ok(None)
        }
        // The task is gone (its attempt closed while this client was on it): the coordinator
        // has other work, or none, for it.
        Some(st) if refused(st) => {
            warn!(target: NET, "{what}: {}; asking for work again", st.message());
            Ok(None)
        }
        _ => Err(e.context(what.to_string())),
    }
}

/// One Train task: download, fine-tune (heartbeating), upload (or, under secure aggregation,
/// take part in its steps). Returns whether the update was counted, and a task the
/// coordinator sent instead of the next secure step, if it did.
/// What a client keeps between rounds.
struct Held<'a> {
    frozen: &'a mut FrozenCache,
    feedback: &'a mut ErrorFeedback,
    variates: &'a VariateStore,
}

/// SCAFFOLD: the variate staged for `task_id` becomes the client's once its update is counted,
/// and is dropped when it was refused.
fn keep_variate(store: &VariateStore, accepted: bool, task_id: &str) -> anyhow::Result<()> {
    if accepted {
        store.commit(task_id)
    } else {
        store.discard();
        Ok(())
    }
}

async fn train_round(
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

/// Whether to draw a progress bar: only on a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
