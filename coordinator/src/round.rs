//! The round state machine: the one place that decides what happens when.
//!
//! ```text
//!            ┌──────────── retry (same round, fresh selection) ◀── failed ──┐
//!            ▼                                                              │
//!  Waiting ──(≥ min available live)──▶ Open(fit r) ──(all selected reported/failed,
//!     ▲         deadline, or grace after min_fit)──▶ Closing(r): combine ─┴─ ok ─▶ server step
//!     │      ▶ [Open(evaluate r) ─(all reported / deadline)─▶] server eval ▶ checkpoint ▶ log
//!     └───────────────────────────────(r < rounds)─────────────────────────────┘   (r = rounds) ▶ Finished
//! ```
//!
//! [`Federation::run`] drives the transitions and owns the [`Strategy`]; the RPC-facing methods
//! (`join`, `next_task`, `model_for`, `begin_upload`, `commit_upload`, `evaluation_report`, ...)
//! only read the current phase and record what clients did. Every opened phase (a training
//! attempt or an evaluation) has a serial number; a task is only valid while its serial is the
//! open one, so a late or repeated upload can never reach another phase's aggregate. Locks:
//! `state` is never held across an await or a heavy computation; `aggregate` is taken before
//! `state` when both are needed, never the other way round.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedtune_common::logging::LogFormat;
use fedtune_common::tensors::{TensorSet, TensorSpec};
use fedtune_common::wire::{EncodedTensors, Payload};
use fedtune_proto::{self as pb, PROTOCOL_VERSION};
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

pub use crate::broadcast::Broadcast;
use crate::clients::Clients;
use crate::config::{OnRoundFailure, ServeConfig};
use crate::evaluation::ServerEval;
use crate::round_record::{RoundRecord, human_bytes};
use crate::run_dir::RunDir;
use crate::strategy::{AggregateError, Aggregator, Candidate, EvalReport, FitPlan, Strategy};

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
/// Batch size clients use to evaluate the global model.
const EVAL_BATCH: u32 = 256;

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
        "round {task_round} has closed (the current round is {current}); update for task `{task_id}` refused as late"
    )]
    RoundClosed {
        task_id: String,
        task_round: u64,
        current: u64,
    },
    #[error(
        "task `{task_id}` belongs to an earlier attempt of round {round}, which has closed; refused as late"
    )]
    AttemptClosed { task_id: String, round: u64 },
    #[error("task `{task_id}` is {is}; {hint}")]
    WrongKind {
        task_id: String,
        is: &'static str,
        hint: &'static str,
    },
    #[error("an upload for task `{0}` is already in progress")]
    UploadInProgress(String),
    #[error("task `{task_id}` was already marked failed: {reason}")]
    TaskFailed { task_id: String, reason: String },
    #[error("update for task `{task_id}` refused: {reason}")]
    InvalidUpdate { task_id: String, reason: String },
    #[error("the coordinator could not keep the update for task `{task_id}`: {reason}")]
    Internal { task_id: String, reason: String },
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
    serial: u64,
    round: u64,
    client_id: String,
    client_name: String,
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

#[derive(Debug, Clone, Copy, PartialEq)]
enum PhaseKind {
    Fit { proximal_mu: f64 },
    Evaluate,
}

impl PhaseKind {
    fn noun(self) -> &'static str {
        match self {
            Self::Fit { .. } => "a training task",
            Self::Evaluate => "an evaluation task",
        }
    }
}

/// A phase in which selected clients have tasks: a training attempt or an evaluation.
struct OpenPhase {
    serial: u64,
    kind: PhaseKind,
    round: u64,
    attempt: u32,
    model_version: u64,
    broadcast: Arc<Broadcast>,
    /// client id -> its task.
    tasks: HashMap<String, TaskState>,
    reports: Vec<ClientReport>,
    stats: Arc<RoundStats>,
}

enum Phase {
    Waiting { round: u64 },
    Open(OpenPhase),
    Closing { round: u64 },
    Finished { reason: String },
}

/// A task id as issued.
#[derive(Clone)]
struct Issued {
    serial: u64,
    kind: PhaseKind,
    round: u64,
    client_id: String,
}

impl Issued {
    fn key(&self) -> (u64, u64) {
        (self.serial, self.round)
    }
}

struct State {
    clients: Clients,
    phase: Phase,
    /// Every task id ever issued.
    issued: HashMap<String, Issued>,
    /// Task ids whose result was counted, with their round: a repeat is answered DUPLICATE.
    counted: HashMap<String, u64>,
    current_round: u64,
}

struct RoundAggregate {
    serial: u64,
    aggregator: Box<dyn Aggregator>,
    /// An update that could not be kept (e.g. the spill disk is full) fails the round.
    error: Option<AggregateError>,
}

/// The coordinator's shared state and the round engine.
pub struct Federation {
    cfg: ServeConfig,
    run_id: String,
    specs: Vec<TensorSpec>,
    /// The tensors an update carries: all but the frozen ones.
    update_specs: Vec<TensorSpec>,
    model_bytes: u64,
    state: Mutex<State>,
    changed: Notify,
    aggregate: Mutex<Option<RoundAggregate>>,
    next_serial: AtomicU64,
    pub upload_slots: Semaphore,
}

/// What a finished run leaves behind.
#[derive(Debug)]
pub struct RunSummary {
    pub records: Vec<RoundRecord>,
    pub global_path: std::path::PathBuf,
    pub metrics_path: std::path::PathBuf,
}

/// Where a run starts: round 1 with fresh weights, or after the last checkpoint of `--resume`.
pub struct Start {
    pub global: TensorSet,
    /// The first round to run.
    pub round: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Federation {
    pub fn new(cfg: ServeConfig, specs: Vec<TensorSpec>) -> Self {
        let model_bytes = specs.iter().map(|s| s.num_elements() as u64 * 4).sum();
        let update_specs = specs
            .iter()
            .filter(|s| !cfg.frozen.contains(&s.name))
            .cloned()
            .collect();
        let mut id = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        Self {
            cfg,
            run_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            specs,
            update_specs,
            model_bytes,
            state: Mutex::new(State {
                clients: Clients::default(),
                phase: Phase::Waiting { round: 1 },
                issued: HashMap::new(),
                counted: HashMap::new(),
                current_round: 0,
            }),
            changed: Notify::new(),
            aggregate: Mutex::new(None),
            next_serial: AtomicU64::new(1),
            upload_slots: Semaphore::new(UPLOAD_SLOTS),
        }
    }

    pub fn model_bytes(&self) -> u64 {
        self.model_bytes
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// The tensors every update must carry (the model minus its frozen tensors).
    pub fn update_specs(&self) -> &[TensorSpec] {
        &self.update_specs
    }

    fn model_spec_pb(&self) -> pb::ModelSpec {
        fedtune_common::spec_wire::to_pb(&self.cfg.model)
    }

    /// Clients needed before a round opens.
    fn needed_clients(&self) -> usize {
        self.cfg
            .policy
            .min_available_clients
            .max(self.cfg.strategy.min_fit_clients)
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
                let needed = self.needed_clients();
                let st = &mut *st;
                let client = st.clients.touch(token).ok_or(Refusal::UnknownSession)?;
                let client_id = client.id.clone();
                match &st.phase {
                    Phase::Finished { reason } => {
                        client.told_finished = true;
                        return Ok(pb::Task {
                            kind: Some(Kind::Finished(pb::Finished {
                                reason: reason.clone(),
                            })),
                        });
                    }
                    Phase::Open(open) => match open.tasks.get(&client_id) {
                        Some(t) if t.status == TaskStatus::Assigned => {
                            return Ok(pb::Task {
                                kind: Some(self.task_message(open, &t.task_id)),
                            });
                        }
                        Some(_) => format!(
                            "round {} in progress; waiting for the other clients",
                            open.round
                        ),
                        None => format!(
                            "round {} in progress without you (not selected this time)",
                            open.round
                        ),
                    },
                    Phase::Closing { round } => format!("aggregating round {round}"),
                    Phase::Waiting { round } => {
                        let live = st.clients.live(LIVENESS_TIMEOUT).len();
                        format!("waiting for clients before round {round}: {live}/{needed} live")
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

    fn task_message(&self, open: &OpenPhase, task_id: &str) -> pb::task::Kind {
        use pb::task::Kind;
        match open.kind {
            PhaseKind::Fit { proximal_mu } => Kind::Train(pb::TrainTask {
                round: open.round,
                task_id: task_id.to_string(),
                model_version: open.model_version,
                model: Some(self.model_spec_pb()),
                config: Some(pb::TrainConfig {
                    local_epochs: self.cfg.local_epochs,
                    batch_size: self.cfg.batch_size,
                    // Server-side decay of the clients' learning rate across rounds.
                    lr: self.cfg.lr * self.cfg.lr_round_decay.powi(open.round as i32 - 1),
                    optimizer: self.cfg.optimizer.kind.to_string(),
                    momentum: self.cfg.optimizer.momentum,
                    nesterov: self.cfg.optimizer.nesterov,
                    weight_decay: self.cfg.optimizer.weight_decay,
                    lr_schedule: self.cfg.lr_schedule.to_string(),
                    warmup_steps: self.cfg.warmup_steps,
                    clip_norm: self.cfg.clip_norm,
                    dropout: self.cfg.dropout,
                    frozen: self.cfg.frozen.clone(),
                    augment: Some(pb::Augmentation {
                        crop_padding: self.cfg.augment.crop_padding as u32,
                        flip: self.cfg.augment.flip,
                        noise_std: f64::from(self.cfg.augment.noise_std),
                    }),
                    early_stopping_patience: self.cfg.early_stopping_patience,
                    seed: self
                        .cfg
                        .seed
                        .wrapping_add(open.round)
                        .wrapping_add(u64::from(open.attempt - 1) << 32),
                    proximal_mu,
                }),
            }),
            PhaseKind::Evaluate => Kind::Evaluate(pb::EvaluateTask {
                round: open.round,
                task_id: task_id.to_string(),
                model_version: open.model_version,
                model: Some(self.model_spec_pb()),
                batch_size: EVAL_BATCH,
            }),
        }
    }

    /// Finds the task `task_id` of the client holding `token`; checks it is this client's.
    fn task_of(st: &mut State, token: &str, task_id: &str) -> Result<(Issued, String), Refusal> {
        let client = st.clients.touch(token).ok_or(Refusal::UnknownSession)?;
        let (client_id, client_name) = (client.id.clone(), client.name.clone());
        let issued = st
            .issued
            .get(task_id)
            .cloned()
            .ok_or_else(|| Refusal::UnknownTask(task_id.to_string()))?;
        if issued.client_id != client_id {
            return Err(Refusal::NotYourTask {
                task_id: task_id.to_string(),
            });
        }
        Ok((issued, client_name))
    }

    /// The open phase `issued` belongs to, or why it is over.
    /// The open phase with `serial` (a task's round `round`), or why it is over.
    fn open_for<'a>(
        phase: &'a mut Phase,
        current_round: u64,
        (serial, round): (u64, u64),
        task_id: &str,
    ) -> Result<&'a mut OpenPhase, Refusal> {
        match phase {
            Phase::Open(open) if open.serial == serial => Ok(open),
            _ if round == current_round => Err(Refusal::AttemptClosed {
                task_id: task_id.to_string(),
                round,
            }),
            _ => Err(Refusal::RoundClosed {
                task_id: task_id.to_string(),
                task_round: round,
                current: current_round,
            }),
        }
    }

    /// The broadcast a client must download for `task_id` (without the frozen tensors when it
    /// holds them, by `frozen_hash`), and the round's byte counters.
    pub fn model_for(
        &self,
        token: &str,
        task_id: &str,
        frozen_hash: u64,
    ) -> Result<(Arc<EncodedTensors>, Arc<RoundStats>), Refusal> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let (issued, _) = Self::task_of(st, token, task_id)?;
        let open = Self::open_for(&mut st.phase, st.current_round, issued.key(), task_id)?;
        Ok((open.broadcast.for_client(frozen_hash), open.stats.clone()))
    }

    /// Checks an update's header before any tensor bytes are accepted.
    pub fn begin_upload(
        &self,
        claim: UpdateClaim,
    ) -> Result<Result<UploadTicket, SubmitOutcome>, Refusal> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let task_id = claim.task_id.clone();
        let (issued, client_name) = Self::task_of(st, &claim.token, &task_id)?;
        if issued.kind == PhaseKind::Evaluate {
            return Err(Refusal::WrongKind {
                task_id,
                is: issued.kind.noun(),
                hint: "send its result with SubmitEvaluation",
            });
        }
        if let Some(&round) = st.counted.get(&task_id) {
            return Ok(Err(SubmitOutcome::Duplicate { round }));
        }
        let open = match Self::open_for(&mut st.phase, st.current_round, issued.key(), &task_id) {
            Ok(open) => open,
            Err(refusal) => {
                warn!("late update from {client_name}: {refusal}");
                return Err(refusal);
            }
        };
        let Some(task) = open.tasks.get_mut(&issued.client_id) else {
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
            warn!(
                "round {}: update for task `{task_id}` refused: {reason}",
                issued.round
            );
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
            TaskStatus::Reported => {
                return Ok(Err(SubmitOutcome::Duplicate {
                    round: issued.round,
                }));
            }
            TaskStatus::Assigned => task.status = TaskStatus::Uploading,
        }
        Ok(Ok(UploadTicket {
            task_id,
            serial: issued.serial,
            round: issued.round,
            client_id: issued.client_id,
            client_name,
            num_examples: claim.num_examples,
            metrics: claim.metrics,
            stats: open.stats.clone(),
        }))
    }

    /// An upload that did not complete: `failure` marks the task failed for the round (invalid
    /// content); `None` lets the client retry (a broken stream).
    pub fn abort_upload(&self, ticket: UploadTicket, failure: Option<String>) {
        let mut st = lock(&self.state);
        if let Phase::Open(open) = &mut st.phase
            && open.serial == ticket.serial
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
            let key = (ticket.serial, ticket.round);
            let open = match Self::open_for(&mut st.phase, st.current_round, key, &ticket.task_id) {
                Ok(open) => open,
                Err(refusal) => {
                    warn!("late update from {}: {refusal}", ticket.client_name);
                    return Err(refusal);
                }
            };
            let Some(task) = open
                .tasks
                .get_mut(&ticket.client_id)
                .filter(|t| t.status == TaskStatus::Uploading)
            else {
                return Err(Refusal::AttemptClosed {
                    task_id: ticket.task_id,
                    round: ticket.round,
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
        if let Some(agg) = aggregate.as_mut().filter(|a| a.serial == ticket.serial)
            && let Err(e) = agg
                .aggregator
                .accept(&ticket.client_name, delta, ticket.num_examples)
        {
            let reason = e.to_string();
            warn!("round {}: {reason}", ticket.round);
            agg.error.get_or_insert(e);
            drop(aggregate);
            self.changed.notify_waiters();
            return Err(Refusal::Internal {
                task_id: ticket.task_id,
                reason,
            });
        }
        drop(aggregate);
        self.changed.notify_waiters();
        Ok(SubmitOutcome::Accepted)
    }

    /// Records a client's evaluation of the global model.
    pub fn evaluation_report(
        &self,
        token: &str,
        report: &pb::EvaluationReport,
    ) -> Result<SubmitOutcome, Refusal> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let task_id = report.task_id.clone();
        let (issued, client_name) = Self::task_of(st, token, &task_id)?;
        if issued.kind != PhaseKind::Evaluate {
            return Err(Refusal::WrongKind {
                task_id,
                is: issued.kind.noun(),
                hint: "send its result with SubmitUpdate",
            });
        }
        if let Some(&round) = st.counted.get(&task_id) {
            return Ok(SubmitOutcome::Duplicate { round });
        }
        let open = match Self::open_for(&mut st.phase, st.current_round, issued.key(), &task_id) {
            Ok(open) => open,
            Err(refusal) => {
                warn!("late evaluation from {client_name}: {refusal}");
                return Err(refusal);
            }
        };
        let Some(task) = open.tasks.get_mut(&issued.client_id) else {
            return Err(Refusal::UnknownTask(task_id));
        };
        if let Some((k, v)) = report.metrics.iter().find(|(_, v)| !v.is_finite()) {
            let reason = format!("metric `{k}` is not finite ({v})");
            task.status = TaskStatus::Failed(reason.clone());
            return Err(Refusal::InvalidUpdate { task_id, reason });
        }
        match &task.status {
            TaskStatus::Failed(reason) => {
                return Err(Refusal::TaskFailed {
                    task_id,
                    reason: reason.clone(),
                });
            }
            TaskStatus::Reported => {
                return Ok(SubmitOutcome::Duplicate {
                    round: issued.round,
                });
            }
            TaskStatus::Assigned | TaskStatus::Uploading => task.status = TaskStatus::Reported,
        }
        open.reports.push(ClientReport {
            num_examples: report.num_examples,
            metrics: report.metrics.clone(),
        });
        st.counted.insert(task_id, issued.round);
        drop(guard);
        self.changed.notify_waiters();
        Ok(SubmitOutcome::Accepted)
    }

    // ----- the round engine ---------------------------------------------------------------------

    /// Runs the rounds from `start` to the end and returns what was written. On every exit,
    /// clients are told the run is over, and why.
    pub async fn run(
        self: Arc<Self>,
        start: Start,
        strategy: Box<dyn Strategy>,
        run_dir: RunDir,
        server_eval: Option<Arc<ServerEval>>,
    ) -> anyhow::Result<RunSummary> {
        info!("strategy: {}", strategy.describe());
        let result = self
            .clone()
            .run_rounds(start, strategy, run_dir, server_eval)
            .await;
        let reason = match &result {
            Ok(_) => format!("all {} rounds done", self.cfg.rounds),
            Err(e) => format!("the coordinator stopped the run: {e:#}"),
        };
        lock(&self.state).phase = Phase::Finished { reason };
        self.changed.notify_waiters();
        self.wait_for_goodbyes().await;
        result
    }

    async fn run_rounds(
        self: Arc<Self>,
        start: Start,
        mut strategy: Box<dyn Strategy>,
        mut run_dir: RunDir,
        server_eval: Option<Arc<ServerEval>>,
    ) -> anyhow::Result<RunSummary> {
        let mut global = start.global;
        let mut records = Vec::new();
        // The broadcast of the current global model, when evaluation or a failed attempt
        // already encoded it.
        let mut encoded: Option<Arc<Broadcast>> = None;
        for round in start.round..=self.cfg.rounds {
            // Version v is the model after v aggregations: round r trains on version r - 1.
            let model_version = round - 1;
            let started = Instant::now();
            let mut attempt = 0;
            let (fit, combined, aggregate_ms) = loop {
                attempt += 1;
                self.wait_for_clients(round).await?;
                let broadcast = match encoded.take() {
                    Some(b) => b,
                    None => Arc::new(tokio::task::block_in_place(|| {
                        Broadcast::encode(&global, model_version, &self.cfg.frozen)
                    })?),
                };
                let plan = strategy.configure_fit(round, attempt, &self.candidates(false));
                let serial = self.open_phase(
                    PhaseKind::Fit {
                        proximal_mu: plan.proximal_mu,
                    },
                    round,
                    attempt,
                    model_version,
                    broadcast.clone(),
                    &plan.clients,
                    Some(strategy.aggregator(round)),
                );
                self.wait_for_reports(serial, round, true).await;
                let fit = self.close_phase(serial, round);

                // Combine (heavy: off the async threads).
                let agg_started = Instant::now();
                let aggregate = lock(&self.aggregate).take().filter(|a| a.serial == serial);
                let combined = tokio::task::spawn_blocking(move || match aggregate {
                    Some(RoundAggregate { error: Some(e), .. }) => Err(e),
                    Some(a) => a.aggregator.finish(),
                    None => Ok(None),
                })
                .await?;
                let aggregate_ms = agg_started.elapsed().as_millis() as u64;
                let failure = match (&combined, self.round_failure(&plan, &fit)) {
                    (_, Some(why)) => Some(why),
                    (Err(e), None) => Some(e.to_string()),
                    (Ok(_), None) => None,
                };
                match failure {
                    None => break (fit, combined.ok().flatten(), aggregate_ms),
                    Some(why) => {
                        let policy = &self.cfg.policy;
                        if policy.on_round_failure == OnRoundFailure::Retry
                            && attempt <= policy.round_retries
                        {
                            warn!(
                                "round {round} failed (attempt {attempt}): {why}; retrying with freshly selected clients (retry {attempt} of {})",
                                policy.round_retries
                            );
                            encoded = Some(broadcast);
                            continue;
                        }
                        let what = if policy.on_round_failure == OnRoundFailure::Retry {
                            format!("after {} retries", policy.round_retries)
                        } else {
                            "on_round_failure = stop".to_string()
                        };
                        bail!(
                            "round {round} failed: {why}; stopping ({what}). The output folder holds the model after round {model_version}; run again with --resume to continue from there"
                        );
                    }
                }
            };

            // The server step.
            if let Some(combined) = combined {
                let (s, g) = tokio::task::spawn_blocking(move || {
                    strategy.apply(&mut global, &combined);
                    (strategy, global)
                })
                .await?;
                (strategy, global) = (s, g);
            }

            // Federated evaluation of the new model.
            let eval_clients = strategy.configure_evaluate(round, &self.candidates(true));
            let mut fed_eval = None;
            let mut eval_bytes_down = 0;
            if !eval_clients.is_empty() {
                let broadcast = Arc::new(tokio::task::block_in_place(|| {
                    Broadcast::encode(&global, round, &self.cfg.frozen)
                })?);
                // Clients train on this same model next round: encode it once.
                encoded = Some(broadcast.clone());
                let serial = self.open_phase(
                    PhaseKind::Evaluate,
                    round,
                    1,
                    round,
                    broadcast,
                    &eval_clients,
                    None,
                );
                self.wait_for_reports(serial, round, false).await;
                let closed = self.close_phase(serial, round);
                eval_bytes_down = closed.stats.bytes_down.load(Ordering::Relaxed);
                let reports: Vec<EvalReport> = closed
                    .reports
                    .into_iter()
                    .map(|r| EvalReport {
                        num_examples: r.num_examples,
                        metrics: r.metrics,
                    })
                    .collect();
                fed_eval = Some(strategy.aggregate_evaluate(&reports));
            }

            // Server-side evaluation.
            let eval_started = Instant::now();
            let mut record = RoundRecord {
                round,
                rounds: self.cfg.rounds,
                attempt,
                model_version: model_version + 1,
                clients_selected: fit.selected,
                clients_reported: fit.reports.len(),
                clients_failed: fit.selected - fit.reports.len(),
                train_loss: weighted_mean(&fit.reports, "train_loss", |r| r.num_examples as f64),
                eval_source: "clients",
                eval_loss: None,
                eval_accuracy: None,
                eval_precision: None,
                eval_recall: None,
                eval_f1: None,
                eval_examples: 0,
                eval_per_class_f1: None,
                eval_confusion: None,
                fed_eval_clients: 0,
                fed_eval_examples: 0,
                fed_eval_loss: None,
                fed_eval_accuracy: None,
                fed_eval_precision: None,
                fed_eval_recall: None,
                fed_eval_f1: None,
                bytes_down: fit.stats.bytes_down.load(Ordering::Relaxed) + eval_bytes_down,
                bytes_up: fit.stats.bytes_up.load(Ordering::Relaxed),
                bytes_up_full: self
                    .specs
                    .iter()
                    .map(|t| t.num_elements() as u64 * 4)
                    .sum::<u64>()
                    * fit.reports.len() as u64,
                aggregate_ms,
                eval_ms: 0,
                round_ms: 0,
            };
            if let Some(f) = fed_eval {
                record.set_fed_eval(&f);
            }
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
                    record.eval_per_class_f1 = Some(e.confusion.per_class_f1());
                    record.eval_confusion = Some(e.confusion.rows());
                }
                None => {
                    let by_val =
                        |r: &ClientReport| r.metrics.get("val_examples").copied().unwrap_or(0.0);
                    record.eval_loss = weighted_mean(&fit.reports, "val_loss", by_val);
                    record.eval_accuracy = weighted_mean(&fit.reports, "val_accuracy", by_val);
                    record.eval_precision = weighted_mean(&fit.reports, "val_precision", by_val);
                    record.eval_recall = weighted_mean(&fit.reports, "val_recall", by_val);
                    record.eval_f1 = weighted_mean(&fit.reports, "val_f1", by_val);
                    record.eval_examples = fit.reports.iter().map(by_val).sum::<f64>() as u64;
                }
            }
            record.eval_ms = eval_started.elapsed().as_millis() as u64;
            record.round_ms = started.elapsed().as_millis() as u64;

            // Checkpoint, then tell the world.
            let state = strategy
                .state()
                .context("cannot collect the strategy's server state")?;
            run_dir.checkpoint(&global, &self.cfg.model, &record, state.as_ref())?;
            log_round(&record, self.cfg.log_format);
            records.push(record);
        }
        Ok(RunSummary {
            records,
            global_path: run_dir.global_path(),
            metrics_path: run_dir.metrics_path(),
        })
    }

    /// Why a closed training attempt cannot be aggregated, if it cannot.
    fn round_failure(&self, plan: &FitPlan, fit: &Closed) -> Option<String> {
        let min = self.cfg.strategy.min_fit_clients;
        let got = fit.reports.len();
        if got < min {
            return Some(format!(
                "{got} of {} selected clients sent an update, fewer than min_fit_clients = {min}",
                plan.clients.len()
            ));
        }
        let failed = fit.selected - got;
        if failed > 0 && !self.cfg.policy.accept_failures {
            return Some(format!(
                "{failed} of {} selected clients failed and accept_failures is false",
                plan.clients.len()
            ));
        }
        None
    }

    /// The live clients, with how often each was selected for training (or evaluation).
    fn candidates(&self, evaluation: bool) -> Vec<Candidate> {
        let st = lock(&self.state);
        st.clients
            .live(LIVENESS_TIMEOUT)
            .iter()
            .map(|c| Candidate {
                id: c.id.clone(),
                times_selected: if evaluation {
                    c.times_evaluated
                } else {
                    c.times_trained
                },
            })
            .collect()
    }

    /// Waits until enough clients are live, logging the wait; gives up after
    /// `available_timeout` with an error that says what to do.
    async fn wait_for_clients(&self, round: u64) -> anyhow::Result<()> {
        let needed = self.needed_clients();
        let timeout = self.cfg.policy.available_timeout;
        let give_up = Instant::now() + timeout;
        let mut last_log = Instant::now() - WAIT_LOG_EVERY;
        {
            let mut st = lock(&self.state);
            if !matches!(st.phase, Phase::Open(_)) {
                st.phase = Phase::Waiting { round };
            }
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let names: Vec<String> = {
                let st = lock(&self.state);
                st.clients
                    .live(LIVENESS_TIMEOUT)
                    .iter()
                    .map(|c| c.name.clone())
                    .collect()
            };
            let live = names.len();
            if live >= needed {
                return Ok(());
            }
            if Instant::now() >= give_up {
                bail!(
                    "only {live} of the {needed} clients needed for round {round} were live after waiting {}; start more clients, lower --min-available-clients / --min-fit-clients, or wait longer with --available-timeout",
                    humantime::format_duration(timeout)
                );
            }
            if last_log.elapsed() >= WAIT_LOG_EVERY {
                info!(
                    "waiting for clients before round {round}: {live}/{needed} live{}; waiting for {} more (gives up in {}s)",
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", names.join(", "))
                    },
                    needed - live,
                    give_up.saturating_duration_since(Instant::now()).as_secs()
                );
                last_log = Instant::now();
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Issues tasks to `clients` and opens a phase. Returns its serial number.
    #[allow(clippy::too_many_arguments)]
    fn open_phase(
        &self,
        kind: PhaseKind,
        round: u64,
        attempt: u32,
        model_version: u64,
        broadcast: Arc<Broadcast>,
        clients: &[String],
        aggregator: Option<Box<dyn Aggregator>>,
    ) -> u64 {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let bytes = broadcast.full_bytes();
        if let Some(aggregator) = aggregator {
            // Installed before `state` is locked (lock order: `aggregate` is never taken while
            // `state` is held). Nothing is folded into it before the phase below opens.
            *lock(&self.aggregate) = Some(RoundAggregate {
                serial,
                aggregator,
                error: None,
            });
        }
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut tasks = HashMap::new();
        let mut names = Vec::new();
        for id in clients {
            let task_id = match (kind, attempt) {
                (PhaseKind::Evaluate, _) => format!("e{round}-{id}"),
                (_, 1) => format!("r{round}-{id}"),
                _ => format!("r{round}.{attempt}-{id}"),
            };
            if let Some(c) = st.clients.by_id_mut(id) {
                match kind {
                    PhaseKind::Evaluate => c.times_evaluated += 1,
                    PhaseKind::Fit { .. } => c.times_trained += 1,
                }
                names.push(c.name.clone());
            }
            st.issued.insert(
                task_id.clone(),
                Issued {
                    serial,
                    kind,
                    round,
                    client_id: id.clone(),
                },
            );
            tasks.insert(
                id.clone(),
                TaskState {
                    task_id,
                    status: TaskStatus::Assigned,
                },
            );
        }
        st.current_round = round;
        st.phase = Phase::Open(OpenPhase {
            serial,
            kind,
            round,
            attempt,
            model_version,
            broadcast,
            tasks,
            reports: Vec::new(),
            stats: Arc::new(RoundStats::default()),
        });
        let live = st.clients.live(LIVENESS_TIMEOUT).len();
        drop(guard);
        match kind {
            PhaseKind::Fit { .. } => info!(
                "round {round}/{}{} started: {} of {live} live clients selected ({}), model v{model_version}, broadcast {}",
                self.cfg.rounds,
                if attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                },
                clients.len(),
                names.join(", "),
                human_bytes(bytes)
            ),
            PhaseKind::Evaluate => info!(
                "round {round}/{}: federated evaluation of model v{model_version} by {} of {live} live clients ({})",
                self.cfg.rounds,
                clients.len(),
                names.join(", ")
            ),
        }
        self.changed.notify_waiters();
        serial
    }

    /// Until every selected client reported or failed, the round deadline, or (training, with
    /// `grace_period`) the grace period after `min_fit_clients` reported. Clients silent for
    /// longer than [`LIVENESS_TIMEOUT`] (no heartbeat, no call) are marked failed.
    async fn wait_for_reports(&self, serial: u64, round: u64, training: bool) {
        let policy = &self.cfg.policy;
        let mut deadline = tokio::time::Instant::now() + policy.round_timeout;
        let mut grace_started = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&self.state);
                let st = &mut *st;
                let Phase::Open(open) = &mut st.phase else {
                    return;
                };
                if open.serial != serial {
                    return;
                }
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
                if training
                    && !grace_started
                    && let Some(grace) = policy.grace_period
                    && open.reports.len() >= self.cfg.strategy.min_fit_clients
                {
                    grace_started = true;
                    let until = tokio::time::Instant::now() + grace;
                    if until < deadline {
                        deadline = until;
                        info!(
                            "round {round}: {} updates in (min_fit_clients = {}); waiting up to {} for the other {}",
                            open.reports.len(),
                            self.cfg.strategy.min_fit_clients,
                            humantime::format_duration(grace),
                            open.tasks.len() - open.reports.len()
                        );
                    }
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let what = if !training { "evaluation" } else if grace_started { "grace period" } else { "deadline" };
                    warn!("round {round} {what} reached: closing with the results received");
                    return;
                }
            }
        }
    }

    /// Stops accepting results for phase `serial`; returns what it gathered.
    fn close_phase(&self, serial: u64, round: u64) -> Closed {
        let mut st = lock(&self.state);
        let phase = std::mem::replace(&mut st.phase, Phase::Closing { round });
        let names: HashMap<String, String> = match &phase {
            Phase::Open(open) => open
                .tasks
                .keys()
                .map(|id| {
                    let name = st.clients.by_id(id).map_or(id.clone(), |c| c.name.clone());
                    (id.clone(), name)
                })
                .collect(),
            _ => HashMap::new(),
        };
        drop(st);
        self.changed.notify_waiters();
        match phase {
            Phase::Open(open) if open.serial == serial => {
                let what = match open.kind {
                    PhaseKind::Fit { .. } => "update",
                    PhaseKind::Evaluate => "evaluation",
                };
                for (id, t) in &open.tasks {
                    let name = names.get(id).map_or(id.as_str(), String::as_str);
                    match &t.status {
                        TaskStatus::Assigned | TaskStatus::Uploading => {
                            warn!("no {what} from {name} before round {round} closed")
                        }
                        TaskStatus::Failed(reason) => {
                            warn!("{name} failed in round {round}: {reason}")
                        }
                        TaskStatus::Reported => {}
                    }
                }
                Closed {
                    selected: open.tasks.len(),
                    reports: open.reports,
                    stats: open.stats,
                }
            }
            _ => Closed {
                selected: 0,
                reports: Vec::new(),
                stats: Arc::new(RoundStats::default()),
            },
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

/// What a closed phase gathered.
struct Closed {
    selected: usize,
    reports: Vec<ClientReport>,
    stats: Arc<RoundStats>,
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
        attempt = r.attempt,
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
        fed_eval_clients = r.fed_eval_clients,
        fed_eval_examples = r.fed_eval_examples,
        fed_eval_loss = r.fed_eval_loss,
        fed_eval_accuracy = r.fed_eval_accuracy,
        fed_eval_precision = r.fed_eval_precision,
        fed_eval_recall = r.fed_eval_recall,
        fed_eval_f1 = r.fed_eval_f1,
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
