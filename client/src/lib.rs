//! The fedtune edge client: pulls work from the coordinator, fine-tunes locally with burn and
//! returns weight deltas with metrics.
//!
//! - [`session`]: the protocol loop (join, tasks, transfers, reconnects, heartbeats);
//!   `train_task`: a Train task downloaded, trained and uploaded; `evaluate_task`: an Evaluate
//!   task measured and reported; [`secure_agg`]: a training
//!   task's secure-aggregation steps;
//!   `connection` and [`tls`] (from `fedtune-connect`): the endpoint, TLS from the kit,
//!   retryable failures and backoff.
//! - [`fine_tune`]: a Train task -> a delta and metrics (no gRPC); [`task_config`]: the task's
//!   training settings, checked and capped; [`control_variate`]: SCAFFOLD's client variate,
//!   kept on disk across rounds.
//! - [`local_data`]: the private data and its validation split; [`progress`]: what a user sees.
//! - [`upstream`]: a session with a parent coordinator for a tiered aggregator (`serve
//!   --upstream`), on the same join, transfer and heartbeat code.
//! - [`attack`]: `--simulate-attack`, a test tool for robustness experiments.

pub mod attack;
pub mod bench;
pub mod cli;
pub mod control_variate;
pub mod error_feedback;
mod evaluate_task;
pub mod fine_tune;
pub mod frozen_cache;
mod join;
pub mod local_data;
pub mod personal_model;
pub mod progress;
pub mod secure_agg;
pub mod session;
mod state_files;
pub mod task_config;
mod train_task;
mod transfer;
pub mod upstream;

// Reaching the coordinator is shared with the coordinator's own status command.
use fedtune_connect::connection;
pub use fedtune_connect::tls;
