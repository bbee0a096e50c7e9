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
use fedtune_common::tensors::{TensorSet, TensorSpec};
use fedtune_common::wire::{EncodedTensors, Payload};
use fedtune_proto::{self as pb, PROTOCOL_VERSION};
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

pub use crate::broadcast::Broadcast;
use crate::clients::{Clients, TrainingProgress, Transfer};
use crate::config::{OnRoundFailure, ServeConfig};
use crate::evaluation::ServerEval;
use crate::journal::{AttemptHeader, Journal, JournalTask, Journaled};
use crate::round_record::{ClientOutcome, RoundRecord, human_bytes};
use crate::run_dir::RunDir;
use crate::strategy::{
    AggregateError, Aggregator, Candidate, EndRun, EvalReport, FitPlan, LocalDp, Strategy,
    UpdateWeight,
};
use crate::telemetry::{Metrics, PhaseName, RefusalReason};

mod engine;
mod phases;
mod relay;
mod reopen;
mod requests;
mod secure;
mod secure_requests;
mod status;
mod uploads;

pub use relay::{Personalize, RelayTrain, RelayedEvaluation, RelayedFit};
use secure::{SecAggPhase, SecAggSlot};

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
/// Uploads received at once. A masked (secure aggregation) upload is assembled in memory, so
/// this bounds memory there; plain uploads stream to their journal file, and this bounds the
/// disk writers and what waiting clients park in HTTP/2 buffers.
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
    #[error("{0}")]
    NoAggregators(String),
    #[error("unknown session token (the coordinator may have restarted): join again")]
    UnknownSession,
    #[error(
        "the federation is full: {live} live clients, at most {max} (--max-clients); retry later"
    )]
    Full { live: usize, max: usize },
    #[error("unknown task `{0}`")]
    UnknownTask(String),
    /// A task id arrived before the run opened its first round: it may be one the journal is
    /// about to restore, so the client keeps its result and retries.
    #[error(
        "task `{0}` is not known yet: the coordinator is starting (restoring its open round from the journal); retry shortly"
    )]
    Opening(String),
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
    #[error("secure aggregation of task `{task_id}`: {reason}")]
    SecAgg { task_id: String, reason: String },
    #[error("the coordinator is stopping; it continues this run when started again: retry then")]
    Stopping,
}

impl Refusal {
    /// The refusal as `fedtune_refused_total` counts it.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Self::ProtocolMismatch { .. } | Self::NoAggregators(_) => RefusalReason::Unauthorized,
            Self::UnknownSession => RefusalReason::UnknownSession,
            Self::Full { .. } => RefusalReason::Limit,
            Self::UnknownTask(_) | Self::Opening(_) => RefusalReason::UnknownTask,
            Self::NotYourTask { .. } => RefusalReason::NotYourTask,
            Self::RoundClosed { .. } | Self::AttemptClosed { .. } => RefusalReason::Late,
            Self::WrongKind { .. } | Self::InvalidUpdate { .. } => RefusalReason::Invalid,
            Self::UploadInProgress(_) | Self::TaskFailed { .. } => RefusalReason::TaskState,
            Self::Internal { .. } => RefusalReason::Internal,
            Self::SecAgg { .. } => RefusalReason::SecureAggregation,
            Self::Stopping => RefusalReason::Stopping,
        }
    }
}

/// An update's claims, before its tensors arrive.
pub struct UpdateClaim {
    pub token: String,
    pub task_id: String,
    pub model_version: u64,
    pub num_examples: u64,
    pub metrics: HashMap<String, f64>,
    /// The update's size as its manifest states it (for `status`'s progress).
    pub total_bytes: u64,
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
    progress: Arc<Transfer>,
    /// Secure aggregation: the participant whose masked update this is, and its length in
    /// words; `None` for a plain update.
    masked: Option<(u32, usize)>,
}

impl UploadTicket {
    /// Bytes of the update received, as they travel.
    pub fn count_bytes_up(&self, n: u64) {
        self.stats.bytes_up.fetch_add(n, Ordering::Relaxed);
        self.progress.add(n);
    }

    /// Bytes of the update accepted, as f32 (decoded, when it travels compressed).
    pub fn count_decoded(&self, n: u64) {
        self.stats.fp32_up.fetch_add(n, Ordering::Relaxed);
    }

    /// The number of words of a masked update (secure aggregation); `None` for a plain one.
    pub fn masked_words(&self) -> Option<usize> {
        self.masked.map(|(_, len)| len)
    }
}

/// A model download the service streams: the encoded model, the round's byte counts, and how
/// far this client got (for `status`).
pub struct Download {
    pub encoded: Arc<EncodedTensors>,
    pub stats: Arc<RoundStats>,
    pub progress: Arc<Transfer>,
}

/// What an accepted or repeated upload got.
pub enum SubmitOutcome {
    Accepted,
    Duplicate { round: u64 },
}

/// A round's bytes on the wire, and what they carried as raw f32 (the same, uncompressed).
#[derive(Default)]
pub struct RoundStats {
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
    fp32_down: AtomicU64,
    fp32_up: AtomicU64,
}

impl RoundStats {
    /// Bytes sent that are not compressed.
    pub fn count_bytes_down(&self, n: u64) {
        self.count_down(n, n);
    }

    /// `wire` bytes sent, carrying `fp32` bytes of values.
    pub fn count_down(&self, wire: u64, fp32: u64) {
        self.bytes_down.fetch_add(wire, Ordering::Relaxed);
        self.fp32_down.fetch_add(fp32, Ordering::Relaxed);
    }

    /// Bytes received that are not compressed.
    pub fn count_bytes_up(&self, n: u64) {
        self.bytes_up.fetch_add(n, Ordering::Relaxed);
        self.fp32_up.fetch_add(n, Ordering::Relaxed);
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
    /// The session that sent it.
    client_id: String,
    num_examples: u64,
    metrics: HashMap<String, f64>,
}

impl ClientReport {
    /// An evaluation's report as the strategy combines it.
    fn into_eval(self) -> EvalReport {
        EvalReport {
            num_examples: self.num_examples,
            metrics: self.metrics,
        }
    }

    /// The training clients behind this report: 1, or a tiered aggregator's count (a peer's
    /// figure: a sane one only).
    fn contributors(&self) -> u64 {
        match self.metrics.get("contributors") {
            Some(&n) if n.is_finite() && n >= 1.0 => n as u64,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PhaseKind {
    Fit {
        proximal_mu: f64,
        local_dp: Option<LocalDp>,
        /// Updates are securely aggregated: clients follow SecAgg steps instead of uploading.
        secure: bool,
    },
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
    /// Secure aggregation's routing of this training attempt; `None` for plain updates.
    secagg: Option<Box<SecAggPhase>>,
    /// When it opened (an attempt opened again after a restart fails the tasks whose
    /// clients have not joined again 60 s later).
    opened: Instant,
    /// When it closes at the latest (the round deadline, or the end of the grace period),
    /// once the engine waits for it.
    deadline: Option<Instant>,
}

enum Phase {
    Waiting {
        round: u64,
    },
    Open(Box<OpenPhase>),
    Closing {
        round: u64,
    },
    Finished {
        reason: String,
    },
    /// Stopped by a signal: clients are told to wait for the coordinator to come back.
    Stopping {
        reason: String,
    },
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
    /// When `phase` was entered (for `status`).
    phase_since: Instant,
    /// Every task id ever issued.
    issued: HashMap<String, Issued>,
    /// Task ids whose result was counted, with their round: a repeat is answered DUPLICATE.
    counted: HashMap<String, u64>,
    current_round: u64,
    /// No phase entered yet: the engine may still be restoring a round from its journal, so
    /// a task id it does not know yet may be about to come back (see [`Refusal::Opening`]).
    opening: bool,
}

impl State {
    /// A run's state before its first round: no clients, no tasks.
    fn new() -> Self {
        Self {
            clients: Clients::default(),
            phase: Phase::Waiting { round: 1 },
            phase_since: Instant::now(),
            issued: HashMap::new(),
            counted: HashMap::new(),
            current_round: 0,
            opening: true,
        }
    }

    /// Enters `phase`; returns the one it leaves.
    fn enter(&mut self, phase: Phase) -> Phase {
        self.phase_since = Instant::now();
        self.opening = false;
        std::mem::replace(&mut self.phase, phase)
    }
}

struct RoundAggregate {
    serial: u64,
    aggregator: Box<dyn Aggregator>,
    /// An update that could not be kept (e.g. the spill disk is full) fails the round.
    error: Option<AggregateError>,
}

/// The coordinator's shared state and the round engine.
pub struct Federation {
    /// This run's settings; `tune` swaps them between trials ([`Federation::set_run`]),
    /// never while a round runs.
    cfg: std::sync::RwLock<Arc<ServeConfig>>,
    run_id: String,
    /// The key clients keep this run's state under (SCAFFOLD's control variate, Ditto's
    /// personal model): the settings and the output folder, so another run starts afresh.
    run_key: std::sync::RwLock<String>,
    /// Prefixed to task ids, so that runs on the same clients (`tune` trials) never reuse one
    /// (empty for a single run).
    task_prefix: std::sync::RwLock<String>,
    specs: Vec<TensorSpec>,
    /// The tensors an update carries: all but the frozen ones.
    update_specs: Vec<TensorSpec>,
    model_bytes: u64,
    state: Mutex<State>,
    /// The phase changed (or a secure-aggregation step is pending): what NextTask waits for.
    changed: Notify,
    /// A client joined, reported or failed: what the engine waits for. Kept apart from
    /// `changed` so that each join or upload does not wake every long-polling client.
    progress: Notify,
    aggregate: Mutex<Option<RoundAggregate>>,
    /// The open attempt's secure-aggregation round (lock order: `aggregate`, `secagg`, then
    /// `state`).
    secagg: Mutex<Option<SecAggSlot>>,
    next_serial: AtomicU64,
    /// What the engine and the service count for Prometheus (always kept; served with
    /// `--metrics-listen`).
    pub metrics: Arc<Metrics>,
    pub upload_slots: Semaphore,
    /// The open training attempt's journal (`None` under secure aggregation).
    journal: Option<Journal>,
    /// A tiered aggregator's: the parent's recipe its training tasks carry instead of this
    /// coordinator's settings (`relay.rs`).
    relayed: Mutex<Option<Box<pb::TrainConfig>>>,
    /// A tiered aggregator: the parent's personalisation of its evaluation task, handed on.
    relayed_personalize: Mutex<Option<relay::Personalize>>,
}

/// What a finished run leaves behind.
#[derive(Debug)]
pub struct RunSummary {
    pub records: Vec<RoundRecord>,
    /// Why the run ended before its last round (the privacy budget, a signal), if it did.
    pub ended_early: Option<String>,
    /// Stopped by a signal: the run is unfinished and resumes when started again.
    pub stopped: bool,
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
        Self::with_journal(cfg, specs, true)
    }

    /// A federation whose settings change between runs on the same clients (`tune`): no round
    /// journal (an interrupted round runs again; each trial's folder keeps its checkpoints).
    pub fn for_tuning(cfg: ServeConfig, specs: Vec<TensorSpec>) -> Self {
        Self::with_journal(cfg, specs, false)
    }

    /// The settings of the next run on the same clients (a `tune` trial), with the key its
    /// clients keep their state under. Only between runs: a round reads them throughout.
    pub fn set_run(&self, cfg: ServeConfig, tag: &str) {
        *self.run_key.write().unwrap_or_else(|p| p.into_inner()) = Self::run_key_of(&cfg);
        *self.task_prefix.write().unwrap_or_else(|p| p.into_inner()) = format!("{tag}.");
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
    }

    fn cfg(&self) -> Arc<ServeConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn run_key_of(cfg: &ServeConfig) -> String {
        crate::run_identity::RunIdentity::of(cfg).federation_key(&cfg.out)
    }

    fn run_key(&self) -> String {
        self.run_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn with_journal(cfg: ServeConfig, specs: Vec<TensorSpec>, journaled: bool) -> Self {
        let model_bytes = specs.iter().map(|s| s.num_elements() as u64 * 4).sum();
        let update_specs = specs
            .iter()
            .filter(|s| !cfg.frozen.contains(&s.name))
            .cloned()
            .collect();
        let mut id = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        let run_key = Self::run_key_of(&cfg);
        Self {
            run_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            run_key: std::sync::RwLock::new(run_key),
            task_prefix: std::sync::RwLock::new(String::new()),
            specs,
            update_specs,
            model_bytes,
            state: Mutex::new(State::new()),
            changed: Notify::new(),
            progress: Notify::new(),
            aggregate: Mutex::new(None),
            secagg: Mutex::new(None),
            next_serial: AtomicU64::new(1),
            metrics: Arc::new(Metrics::new(
                &cfg.strategy_name(),
                &cfg.model.kind.to_string(),
                cfg.rounds,
            )),
            upload_slots: Semaphore::new(UPLOAD_SLOTS),
            journal: (cfg.secure_agg.is_none() && journaled).then(|| Journal::new(&cfg.out)),
            relayed: Mutex::new(None),
            relayed_personalize: Mutex::new(None),
            cfg: std::sync::RwLock::new(Arc::new(cfg)),
        }
    }

    /// Whether the run takes clients (`/readyz`): not once it has finished or is stopping.
    pub fn ready(&self) -> bool {
        !matches!(
            lock(&self.state).phase,
            Phase::Finished { .. } | Phase::Stopping { .. }
        )
    }

    pub fn model_bytes(&self) -> u64 {
        self.model_bytes
    }

    /// Whether plain updates are journaled (all but secure aggregation's): they are then
    /// staged to their journal file as they arrive.
    pub fn stages_uploads(&self) -> bool {
        self.journal.is_some()
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// The tensors every update must carry (the model minus its frozen tensors).
    pub fn update_specs(&self) -> &[TensorSpec] {
        &self.update_specs
    }

    /// How this run's tasks tell clients to encode their updates.
    pub fn upload_codec(&self) -> fedtune_common::codec::Codec {
        self.cfg().compression.up
    }

    fn model_spec_pb(&self) -> pb::ModelSpec {
        fedtune_common::spec_wire::to_pb(&self.cfg().model)
    }

    /// Clients needed before a round opens.
    fn needed_clients(&self) -> usize {
        self.cfg()
            .policy
            .min_available_clients
            .max(self.cfg().strategy.min_fit_clients)
    }
}

impl crate::telemetry::http::Probe for Federation {
    fn ready(&self) -> bool {
        Federation::ready(self)
    }

    fn scrape(&self) -> String {
        let now = lock(&self.state).now();
        self.metrics.set_now(now);
        self.metrics.encode()
    }
}
