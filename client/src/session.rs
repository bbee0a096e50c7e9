//! The client's side of the protocol: connect, join, pull tasks, download the model, upload the
//! update. Reconnects by itself with backoff; re-joins when the coordinator restarted.

use crate::tls::{ClientAuth, ClientSecurity};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use fedtune_common::device::DeviceChoice;
use fedtune_common::logging::NET;
use fedtune_proto::federation_client::FederationClient;
use fedtune_proto::{self as pb, task::Kind};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::attack::Attack;
use crate::connection::{Backoff, refused, transient};
use crate::control_variate::VariateStore;
use crate::error_feedback::ErrorFeedback;
use crate::evaluate_task::{EvalData, evaluate_round};
use crate::frozen_cache::FrozenCache;
use crate::join::{JoinError, Joiner, join, reach};
use crate::local_data::{Columns, LocalData};
use crate::task_config::Caps;
use crate::train_task::{Held, keep_variate, train_round};
use crate::transfer::{PendingUpload, UndeliveredUpdate, decline, resend};

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

/// Whether to draw a progress bar: only on a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
