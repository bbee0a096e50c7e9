//! The round state machine: the one place that decides what happens when.
//!
//! ```text
//!  Waiting ──(min clients live)──▶ Training(round r) ──(all selected reported/failed, or deadline)──▶
//!  Closing(r): aggregate ▶ evaluate ▶ checkpoint ▶ log ──(r < rounds)──▶ Training(r+1)
//!                                                     └─(r = rounds)──▶ Finished
//! ```
//!
//! [`Federation::run`] drives the transitions; the RPC-facing methods (`join`, `next_task`,
//! `model_for`, `begin_upload`, `commit_upload`, ...) only read the current phase and record
//! what clients did. Locks: `state` is never held across an await or a heavy computation;
//! `aggregate` is taken before `state` when both are needed, never the other way round.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use fedtune_common::logging::LogFormat;
use fedtune_common::tensors::{TensorSet, TensorSpec};
use fedtune_common::wire::{EncodedTensors, MAX_CHUNK_BYTES, Payload};
use fedtune_proto::{self as pb, PROTOCOL_VERSION};
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use crate::clients::Clients;
use crate::config::ServeConfig;
use crate::evaluation::ServerEval;
use crate::round_record::{RoundRecord, human_bytes};
use crate::run_dir::RunDir;
use crate::strategy::{Aggregator, FedAvg};

/// How long NextTask holds a call open when there is nothing to do.
pub const LONG_POLL: Duration = Duration::from_secs(20);
/// How often a busy client must send Heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// A selected client not heard from for this long is counted as failed for the round.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the wait for clients is logged.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(5);
/// After the last round, how long to keep answering so that clients learn the run is over.
const FINISH_GRACE: Duration = Duration::from_secs(10);
/// Uploads staged at once; each holds one model-sized buffer, so this bounds memory.
pub const UPLOAD_SLOTS: usize = 2;

/// Why an RPC was refused; the service turns it into a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "protocol version mismatch: client speaks {client}, coordinator speaks {server}; upgrade the older side"
    )]
    ProtocolMismatch { client: u32, server: u32 },
    #[error("unknown session token (the coordinator may have restarted): join again")]
    UnknownSession,
    #[error("unknown task `{0}`")]
    UnknownTask(String),
    #[error("task `{task_id}` belongs to another client")]
    NotYourTask { task_id: String },
    #[error(
        "round {task_round} has closed (the current round is {current}); update for task `{task_id}` refused"
    )]
    RoundClosed {
        task_id: String,
        task_round: u64,
        current: u64,
    },
    #[error("an upload for task `{0}` is already in progress")]
    UploadInProgress(String),
    #[error("task `{task_id}` was already marked failed: {reason}")]
    TaskFailed { task_id: String, reason: String },
    #[error("update for task `{task_id}` refused: {reason}")]
    InvalidUpdate { task_id: String, reason: String },
}

/// An update's claims, before its tensors arrive.
pub struct UpdateClaim {
    pub token: String,
    pub task_id: String,
    pub model_version: u64,
    pub num_examples: u64,
    pub metrics: HashMap<String, f64>,
}

/// Permission to stream one upload, from `begin_upload` to `commit_upload` / `abort_upload`.
pub struct UploadTicket {
    pub task_id: String,
    round: u64,
    client_id: String,
    num_examples: u64,
    metrics: HashMap<String, f64>,
    stats: Arc<RoundStats>,
}

impl UploadTicket {
    pub fn count_bytes_up(&self, n: u64) {
        self.stats.bytes_up.fetch_add(n, Ordering::Relaxed);
    }
}

/// What an accepted or repeated upload got.
pub enum SubmitOutcome {
    Accepted,
    Duplicate { round: u64 },
}

#[derive(Default)]
pub struct RoundStats {
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
}

impl RoundStats {
    pub fn count_bytes_down(&self, n: u64) {
        self.bytes_down.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TaskStatus {
    Assigned,
    Uploading,
    Reported,
    Failed(String),
}

struct TaskState {
    task_id: String,
    status: TaskStatus,
}

struct ClientReport {
    num_examples: u64,
    metrics: HashMap<String, f64>,
}

struct OpenRound {
    round: u64,
    model_version: u64,
    broadcast: Arc<EncodedTensors>,
    /// client id -> its task.
    tasks: HashMap<String, TaskState>,
    reports: Vec<ClientReport>,
    stats: Arc<RoundStats>,
}

enum Phase {
    Waiting,
    Training(OpenRound),
    Closing { round: u64 },
    Finished,
}

struct State {
    clients: Clients,
    phase: Phase,
    /// Every task id ever issued: task id -> (round, client id).
    issued: HashMap<String, (u64, String)>,
    /// Task ids whose update was counted, with their round: a repeat is answered DUPLICATE.
    counted: HashMap<String, u64>,
    current_round: u64,
}

struct RoundAggregate {
    round: u64,
    aggregator: Box<dyn Aggregator>,
}

/// The coordinator's shared state and the round engine.
pub struct Federation {
    cfg: ServeConfig,
    run_id: String,
    specs: Vec<TensorSpec>,
    model_bytes: u64,
    state: Mutex<State>,
    changed: Notify,
    aggregate: Mutex<Option<RoundAggregate>>,
    pub upload_slots: Semaphore,
}

/// What a finished run leaves behind.
#[derive(Debug)]
pub struct RunSummary {
    pub records: Vec<RoundRecord>,
    pub global_path: std::path::PathBuf,
    pub metrics_path: std::path::PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Federation {
    pub fn new(cfg: ServeConfig, specs: Vec<TensorSpec>) -> Self {
        let model_bytes = specs.iter().map(|s| s.num_elements() as u64 * 4).sum();
        let mut id = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        Self {
            cfg,
            run_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            specs,
            model_bytes,
            state: Mutex::new(State {
                clients: Clients::default(),
                phase: Phase::Waiting,
                issued: HashMap::new(),
                counted: HashMap::new(),
                current_round: 0,
            }),
            changed: Notify::new(),
            aggregate: Mutex::new(None),
            upload_slots: Semaphore::new(UPLOAD_SLOTS),
        }
    }

    pub fn model_bytes(&self) -> u64 {
        self.model_bytes
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    fn model_spec_pb(&self) -> pb::ModelSpec {
        pb::ModelSpec {
            name: self.cfg.model.kind.to_string(),
            num_classes: self.cfg.model.num_classes,
        }
    }

    // ----- RPC-facing -------------------------------------------------------------------------

    pub fn join(&self, req: &pb::JoinRequest) -> Result<pb::JoinReply, Refusal> {
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Refusal::ProtocolMismatch {
                client: req.protocol_version,
                server: PROTOCOL_VERSION,
            });
        }
        let (id, token) = lock(&self.state)
            .clients
            .join(&req.name, &req.device, req.num_examples);
        info!(
            "client joined: {} ({}) on {} with {} examples",
            req.name, id, req.device, req.num_examples
        );
        self.changed.notify_waiters();
        Ok(pb::JoinReply {
            protocol_version: PROTOCOL_VERSION,
            client_id: id,
            session_token: token,
            run_id: self.run_id.clone(),
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
        })
    }

    pub fn heartbeat(&self, token: &str) -> Result<(), Refusal> {
        lock(&self.state)
            .clients
            .touch(token)
            .map(|_| ())
            .ok_or(Refusal::UnknownSession)
    }

    /// Long-poll: returns a task as soon as there is one for this client, or Wait after
    /// [`LONG_POLL`].
    pub async fn next_task(&self, token: &str) -> Result<pb::Task, Refusal> {
        use pb::task::Kind;
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let reason = {
                let mut st = lock(&self.state);
                let min_clients = self.cfg.min_clients;
                let st = &mut *st;
                let client = st.clients.touch(token).ok_or(Refusal::UnknownSession)?;
                let client_id = client.id.clone();
                match &st.phase {
                    Phase::Finished => {
                        client.told_finished = true;
                        return Ok(pb::Task {
                            kind: Some(Kind::Finished(pb::Finished {
                                reason: format!("all {} rounds done", self.cfg.rounds),
                            })),
                        });
                    }
                    Phase::Training(open) => match open.tasks.get(&client_id) {
                        Some(t) if t.status == TaskStatus::Assigned => {
                            return Ok(pb::Task {
                                kind: Some(Kind::Train(pb::TrainTask {
                                    round: open.round,
                                    task_id: t.task_id.clone(),
                                    model_version: open.model_version,
                                    model: Some(self.model_spec_pb()),
                                    config: Some(pb::TrainConfig {
                                        local_epochs: self.cfg.local_epochs,
                                        batch_size: self.cfg.batch_size,
                                        lr: self.cfg.lr,
                                        optimizer: self.cfg.optimizer.to_string(),
                                        seed: self.cfg.seed.wrapping_add(open.round),
                                    }),
                                })),
                            });
                        }
                        Some(_) => format!(
                            "round {} in progress; waiting for the other clients",
                            open.round
                        ),
                        None => format!(
                            "round {} in progress without you; you will be selected in the next round",
                            open.round
                        ),
                    },
                    Phase::Closing { round } => format!("aggregating round {round}"),
                    Phase::Waiting => {
                        let live = st.clients.live(LIVENESS_TIMEOUT).len();
                        format!("waiting for clients: {live}/{min_clients} joined")
                    }
                }
            };
            tokio::select! {
                _ = &mut notified => continue,
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(pb::Task { kind: Some(Kind::Wait(pb::Wait { retry_after_ms: 100, reason })) });
                }
            }
        }
    }

    /// The broadcast a client must download for `task_id`, and the round's byte counters.
    pub fn model_for(
        &self,
        token: &str,
        task_id: &str,
    ) -> Result<(Arc<EncodedTensors>, Arc<RoundStats>), Refusal> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let client_id = st
            .clients
            .touch(token)
            .ok_or(Refusal::UnknownSession)?
            .id
            .clone();
        let (task_round, owner) = st
            .issued
            .get(task_id)
            .cloned()
            .ok_or_else(|| Refusal::UnknownTask(task_id.to_string()))?;
        if owner != client_id {
            return Err(Refusal::NotYourTask {
                task_id: task_id.to_string(),
            });
        }
        match &st.phase {
            Phase::Training(open) if open.round == task_round => {
                Ok((open.broadcast.clone(), open.stats.clone()))
            }
            _ => Err(Refusal::RoundClosed {
                task_id: task_id.to_string(),
                task_round,
                current: st.current_round,
            }),
        }
    }

    /// Checks an update's header before any tensor bytes are accepted.
    pub fn begin_upload(
        &self,
        claim: UpdateClaim,
    ) -> Result<Result<UploadTicket, SubmitOutcome>, Refusal> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let client_id = st
            .clients
            .touch(&claim.token)
            .ok_or(Refusal::UnknownSession)?
            .id
            .clone();
        let task_id = claim.task_id.clone();
        let (task_round, owner) = st
            .issued
            .get(&task_id)
            .cloned()
            .ok_or_else(|| Refusal::UnknownTask(task_id.clone()))?;
        if owner != client_id {
            return Err(Refusal::NotYourTask { task_id });
        }
        if let Some(&round) = st.counted.get(&task_id) {
            return Ok(Err(SubmitOutcome::Duplicate { round }));
        }
        let current = st.current_round;
        let Phase::Training(open) = &mut st.phase else {
            return Err(Refusal::RoundClosed {
                task_id,
                task_round,
                current,
            });
        };
        if open.round != task_round {
            return Err(Refusal::RoundClosed {
                task_id,
                task_round,
                current,
            });
        }
        let Some(task) = open.tasks.get_mut(&client_id) else {
            return Err(Refusal::UnknownTask(task_id));
        };
        let invalid = if claim.model_version != open.model_version {
            Some(format!(
                "computed against model version {}, the round's is {}",
                claim.model_version, open.model_version
            ))
        } else if claim.num_examples == 0 {
            Some("num_examples is 0; an update must come from at least one example".to_string())
        } else {
            claim
                .metrics
                .iter()
                .find(|(_, v)| !v.is_finite())
                .map(|(k, v)| format!("metric `{k}` is not finite ({v})"))
        };
        if let Some(reason) = invalid
            && task.status == TaskStatus::Assigned
        {
            // The same task would fail the same way again: the round goes on without it.
            warn!("round {task_round}: update for task `{task_id}` refused: {reason}");
            task.status = TaskStatus::Failed(reason.clone());
            return Err(Refusal::InvalidUpdate { task_id, reason });
        }
        match &task.status {
            TaskStatus::Uploading => return Err(Refusal::UploadInProgress(task_id)),
            TaskStatus::Failed(reason) => {
                return Err(Refusal::TaskFailed {
                    task_id,
                    reason: reason.clone(),
                });
            }
            TaskStatus::Reported => return Ok(Err(SubmitOutcome::Duplicate { round: task_round })),
            TaskStatus::Assigned => task.status = TaskStatus::Uploading,
        }
        Ok(Ok(UploadTicket {
            task_id,
            round: task_round,
            client_id,
            num_examples: claim.num_examples,
            metrics: claim.metrics,
            stats: open.stats.clone(),
        }))
    }

    /// An upload that did not complete: `failure` marks the task failed for the round (invalid
    /// content); `None` lets the client retry (a broken stream).
    pub fn abort_upload(&self, ticket: UploadTicket, failure: Option<String>) {
        let mut st = lock(&self.state);
        if let Phase::Training(open) = &mut st.phase
            && open.round == ticket.round
            && let Some(task) = open.tasks.get_mut(&ticket.client_id)
            && task.status == TaskStatus::Uploading
        {
            task.status = match failure {
                Some(reason) => {
                    warn!(
                        "round {}: update for task `{}` refused: {reason}",
                        ticket.round, ticket.task_id
                    );
                    TaskStatus::Failed(reason)
                }
                None => TaskStatus::Assigned,
            };
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Folds a complete, verified delta into the round's aggregate, exactly once. Blocking:
    /// call it from a blocking thread.
    pub fn commit_upload(
        &self,
        ticket: UploadTicket,
        delta: &Payload,
    ) -> Result<SubmitOutcome, Refusal> {
        let mut aggregate = lock(&self.aggregate);
        {
            let mut st = lock(&self.state);
            let st = &mut *st;
            let current = st.current_round;
            let open = match &mut st.phase {
                Phase::Training(open) if open.round == ticket.round => open,
                _ => {
                    return Err(Refusal::RoundClosed {
                        task_id: ticket.task_id,
                        task_round: ticket.round,
                        current,
                    });
                }
            };
            let Some(task) = open
                .tasks
                .get_mut(&ticket.client_id)
                .filter(|t| t.status == TaskStatus::Uploading)
            else {
                return Err(Refusal::RoundClosed {
                    task_id: ticket.task_id,
                    task_round: ticket.round,
                    current,
                });
            };
            task.status = TaskStatus::Reported;
            open.reports.push(ClientReport {
                num_examples: ticket.num_examples,
                metrics: ticket.metrics,
            });
            st.counted.insert(ticket.task_id.clone(), ticket.round);
        }
        // Still holding `aggregate`: the round cannot close before this update is folded in.
        if let Some(agg) = aggregate.as_mut().filter(|a| a.round == ticket.round) {
            agg.aggregator.accept(delta, ticket.num_examples);
        }
        drop(aggregate);
        self.changed.notify_waiters();
        Ok(SubmitOutcome::Accepted)
    }

    /// Records a client's evaluation report. Federated evaluation rounds are not scheduled yet
    /// (no Evaluate task is issued), so any report refers to an unknown task.
    pub fn evaluation_report(&self, token: &str, task_id: &str) -> Result<SubmitOutcome, Refusal> {
        lock(&self.state)
            .clients
            .touch(token)
            .ok_or(Refusal::UnknownSession)?;
        Err(Refusal::UnknownTask(task_id.to_string()))
    }

    // ----- the round engine ---------------------------------------------------------------------

    /// Runs every round to the end and returns what was written.
    pub async fn run(
        self: Arc<Self>,
        mut global: TensorSet,
        mut run_dir: RunDir,
        server_eval: Option<Arc<ServerEval>>,
    ) -> anyhow::Result<RunSummary> {
        let mut records = Vec::new();
        for round in 1..=self.cfg.rounds {
            // Version v is the model after v aggregations: round r trains on version r - 1.
            let model_version = round - 1;
            self.wait_for_clients(round).await;
            let started = Instant::now();

            // Encoded once per round, on this thread (no copy of the global model).
            let encoded = tokio::task::block_in_place(|| {
                EncodedTensors::encode(&global, model_version, MAX_CHUNK_BYTES)
            })?;
            let selected = self.open_round(round, model_version, Arc::new(encoded));
            self.wait_for_reports(round).await;
            let (reports, failed, stats) = self.close_round(round, selected.len());

            // Aggregate.
            let agg_started = Instant::now();
            let this = self.clone();
            global = tokio::task::spawn_blocking(move || {
                if let Some(agg) = lock(&this.aggregate).take() {
                    agg.aggregator.finish(&mut global);
                }
                global
            })
            .await?;
            let aggregate_ms = agg_started.elapsed().as_millis() as u64;

            // Evaluate.
            let eval_started = Instant::now();
            let mut record = RoundRecord {
                round,
                rounds: self.cfg.rounds,
                model_version: model_version + 1,
                clients_selected: selected.len(),
                clients_reported: reports.len(),
                clients_failed: failed,
                train_loss: weighted_mean(&reports, "train_loss", |r| r.num_examples as f64),
                eval_source: "clients",
                eval_loss: None,
                eval_accuracy: None,
                eval_precision: None,
                eval_recall: None,
                eval_f1: None,
                eval_examples: 0,
                bytes_down: stats.bytes_down.load(Ordering::Relaxed),
                bytes_up: stats.bytes_up.load(Ordering::Relaxed),
                aggregate_ms,
                eval_ms: 0,
                round_ms: 0,
            };
            match &server_eval {
                Some(eval) => {
                    let (eval, g) = (eval.clone(), global.clone());
                    let e = tokio::task::spawn_blocking(move || eval.evaluate(&g))
                        .await?
                        .context("server-side evaluation failed")?;
                    let m = e.metrics();
                    record.eval_source = "server";
                    record.eval_loss = Some(e.loss).filter(|v| v.is_finite());
                    record.eval_accuracy = Some(m.accuracy);
                    record.eval_precision = Some(m.precision);
                    record.eval_recall = Some(m.recall);
                    record.eval_f1 = Some(m.f1);
                    record.eval_examples = m.examples;
                }
                None => {
                    let by_val =
                        |r: &ClientReport| r.metrics.get("val_examples").copied().unwrap_or(0.0);
                    record.eval_loss = weighted_mean(&reports, "val_loss", by_val);
                    record.eval_accuracy = weighted_mean(&reports, "val_accuracy", by_val);
                    record.eval_precision = weighted_mean(&reports, "val_precision", by_val);
                    record.eval_recall = weighted_mean(&reports, "val_recall", by_val);
                    record.eval_f1 = weighted_mean(&reports, "val_f1", by_val);
                    record.eval_examples = reports.iter().map(by_val).sum::<f64>() as u64;
                }
            }
            record.eval_ms = eval_started.elapsed().as_millis() as u64;
            record.round_ms = started.elapsed().as_millis() as u64;

            // Checkpoint, then tell the world.
            run_dir.checkpoint(&global, &self.cfg.model, &record)?;
            log_round(&record, self.cfg.log_format);
            if reports.is_empty() {
                warn!("round {round} closed without any update: the global model is unchanged");
            }
            records.push(record);
        }
        lock(&self.state).phase = Phase::Finished;
        self.changed.notify_waiters();
        self.wait_for_goodbyes().await;
        Ok(RunSummary {
            records,
            global_path: run_dir.global_path(),
            metrics_path: run_dir.metrics_path(),
        })
    }

    async fn wait_for_clients(&self, round: u64) {
        let mut last_log = Instant::now() - WAIT_LOG_EVERY;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (live, names) = {
                let st = lock(&self.state);
                let live = st.clients.live(LIVENESS_TIMEOUT);
                (
                    live.len(),
                    live.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                )
            };
            if live >= self.cfg.min_clients {
                return;
            }
            if last_log.elapsed() >= WAIT_LOG_EVERY {
                info!(
                    "waiting for clients before round {round}: {live}/{} joined{}; waiting for {} more",
                    self.cfg.min_clients,
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", names.join(", "))
                    },
                    self.cfg.min_clients - live
                );
                last_log = Instant::now();
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Selects the live clients, issues their tasks and opens the round. Returns the selected ids.
    fn open_round(
        &self,
        round: u64,
        model_version: u64,
        broadcast: Arc<EncodedTensors>,
    ) -> Vec<String> {
        let bytes = broadcast.total_bytes();
        // Installed before `state` is locked (lock order: `aggregate` is never taken while
        // `state` is held). Nothing is folded into it before the phase below names this round.
        *lock(&self.aggregate) = Some(RoundAggregate {
            round,
            aggregator: Box::new(FedAvg::new(&self.specs)),
        });
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let selected: Vec<(String, String)> = st
            .clients
            .live(LIVENESS_TIMEOUT)
            .iter()
            .map(|c| (c.id.clone(), c.name.clone()))
            .collect();
        let mut tasks = HashMap::new();
        for (id, _) in &selected {
            let task_id = format!("r{round}-{id}");
            st.issued.insert(task_id.clone(), (round, id.clone()));
            tasks.insert(
                id.clone(),
                TaskState {
                    task_id,
                    status: TaskStatus::Assigned,
                },
            );
        }
        st.current_round = round;
        st.phase = Phase::Training(OpenRound {
            round,
            model_version,
            broadcast,
            tasks,
            reports: Vec::new(),
            stats: Arc::new(RoundStats::default()),
        });
        drop(guard);
        info!(
            "round {round}/{} started: {} clients selected ({}), model v{model_version}, broadcast {}",
            self.cfg.rounds,
            selected.len(),
            selected
                .iter()
                .map(|(_, n)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            human_bytes(bytes)
        );
        self.changed.notify_waiters();
        selected.into_iter().map(|(id, _)| id).collect()
    }

    /// Until every selected client reported or failed, or the round deadline. Clients silent
    /// for longer than [`LIVENESS_TIMEOUT`] (no heartbeat, no call) are marked failed.
    async fn wait_for_reports(&self, round: u64) {
        let deadline = tokio::time::Instant::now() + self.cfg.round_timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&self.state);
                let st = &mut *st;
                let Phase::Training(open) = &mut st.phase else {
                    return;
                };
                for (id, task) in open.tasks.iter_mut() {
                    if task.status == TaskStatus::Assigned
                        && let Some(c) = st.clients.by_id(id)
                        && c.last_seen.elapsed() > LIVENESS_TIMEOUT
                    {
                        let reason = format!(
                            "no word from {} for {}s",
                            c.name,
                            LIVENESS_TIMEOUT.as_secs()
                        );
                        warn!("{reason}: counted as failed for round {round}");
                        task.status = TaskStatus::Failed(reason);
                    }
                }
                if open
                    .tasks
                    .values()
                    .all(|t| matches!(t.status, TaskStatus::Reported | TaskStatus::Failed(_)))
                {
                    return;
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    warn!("round {round} deadline ({}) reached: closing with the updates received", humantime::format_duration(self.cfg.round_timeout));
                    return;
                }
            }
        }
    }

    /// Stops accepting updates for `round`; returns the reports, the failure count and the stats.
    fn close_round(
        &self,
        round: u64,
        selected: usize,
    ) -> (Vec<ClientReport>, usize, Arc<RoundStats>) {
        let mut st = lock(&self.state);
        let phase = std::mem::replace(&mut st.phase, Phase::Closing { round });
        drop(st);
        self.changed.notify_waiters();
        match phase {
            Phase::Training(open) => {
                let reported = open.reports.len();
                for (id, t) in &open.tasks {
                    match &t.status {
                        TaskStatus::Assigned | TaskStatus::Uploading => {
                            warn!("no update from {id} before round {round} closed")
                        }
                        TaskStatus::Failed(reason) => {
                            warn!("{id} failed in round {round}: {reason}")
                        }
                        TaskStatus::Reported => {}
                    }
                }
                (open.reports, selected - reported, open.stats)
            }
            _ => (Vec::new(), selected, Arc::new(RoundStats::default())),
        }
    }

    async fn wait_for_goodbyes(&self) {
        let deadline = Instant::now() + FINISH_GRACE;
        while Instant::now() < deadline {
            let waiting = {
                let st = lock(&self.state);
                st.clients
                    .live(LIVENESS_TIMEOUT)
                    .iter()
                    .filter(|c| !c.told_finished)
                    .count()
            };
            if waiting == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn weighted_mean(
    reports: &[ClientReport],
    key: &str,
    weight: impl Fn(&ClientReport) -> f64,
) -> Option<f64> {
    let (mut sum, mut total) = (0.0, 0.0);
    for r in reports {
        if let Some(v) = r.metrics.get(key) {
            let w = weight(r);
            sum += w * v;
            total += w;
        }
    }
    (total > 0.0).then(|| sum / total)
}

fn log_round(r: &RoundRecord, format: LogFormat) {
    if format == LogFormat::Text {
        info!("{}", r.text_line());
        return;
    }
    info!(
        round = r.round,
        rounds = r.rounds,
        model_version = r.model_version,
        clients_selected = r.clients_selected,
        clients_reported = r.clients_reported,
        clients_failed = r.clients_failed,
        train_loss = r.train_loss,
        eval_source = r.eval_source,
        eval_loss = r.eval_loss,
        eval_accuracy = r.eval_accuracy,
        eval_precision = r.eval_precision,
        eval_recall = r.eval_recall,
        eval_f1 = r.eval_f1,
        eval_examples = r.eval_examples,
        bytes_down = r.bytes_down,
        bytes_up = r.bytes_up,
        aggregate_ms = r.aggregate_ms,
        eval_ms = r.eval_ms,
        round_ms = r.round_ms,
        "round {}/{} complete",
        r.round,
        r.rounds
    );
}
