//! What the coordinator tells the outside world besides its log: Prometheus metrics
//! ([`metrics`]), the process's own figures ([`process`]), and the plain-HTTP endpoint that
//! serves them with health and readiness ([`http`]).
//!
//! The round engine and the service count into [`Metrics`] as things happen (cheap atomics,
//! always on); where the run is (phase, round, live clients) is read from the engine's state at
//! each scrape. The endpoint only runs with `serve --metrics-listen`. Labels never carry client ids: the number
//! of series stays the same whether ten or ten thousand clients join (per-client detail is in
//! `metrics.jsonl` and `fedtune-coordinator status`).

pub mod http;
pub mod metrics;
mod process;

pub use metrics::{Metrics, Now, PhaseName, RefusalReason};
