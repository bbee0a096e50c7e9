//! The engine's refusals and answers as gRPC replies: the status code each refusal maps to,
//! counted by reason, and the reply to a taken result.

use fedtune_proto::{self as pb, submit_reply::Outcome};
use tonic::Status;

use crate::round::{Refusal, SubmitOutcome};
use crate::telemetry::Metrics;

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Self {
        let msg = r.to_string();
        match r {
            Refusal::ProtocolMismatch { .. }
            | Refusal::NoAggregators(_)
            | Refusal::RoundClosed { .. }
            | Refusal::AttemptClosed { .. }
            | Refusal::WrongKind { .. }
            | Refusal::TaskFailed { .. } => Status::failed_precondition(msg),
            Refusal::Internal { .. } => Status::internal(msg),
            Refusal::Full { .. } => Status::resource_exhausted(msg),
            Refusal::UnknownSession => Status::unauthenticated(msg),
            Refusal::UnknownTask(_) => Status::not_found(msg),
            Refusal::NotYourTask { .. } => Status::permission_denied(msg),
            Refusal::UploadInProgress(_) => Status::aborted(msg),
            Refusal::Stopping | Refusal::Opening(_) => Status::unavailable(msg),
            Refusal::InvalidUpdate { .. } | Refusal::SecAgg { .. } => Status::invalid_argument(msg),
        }
    }
}

/// A refusal of the engine as a gRPC status, counted by reason, and told in a WARN line where
/// the engine has not told it already (late and invalid updates, a full federation).
pub(super) fn refused(metrics: &Metrics, r: Refusal) -> Status {
    metrics.refused(r.reason());
    match &r {
        Refusal::UnknownSession
        | Refusal::UnknownTask(_)
        | Refusal::NotYourTask { .. }
        | Refusal::WrongKind { .. }
        | Refusal::TaskFailed { .. }
        | Refusal::NoAggregators(_)
        | Refusal::ProtocolMismatch { .. } => {
            tracing::warn!(target: fedtune_common::logging::NET, "refused a request: {r}");
        }
        _ => {}
    }
    r.into()
}

/// The answer to a taken training update, counted.
pub(super) fn update_reply(
    metrics: &Metrics,
    outcome: SubmitOutcome,
    task_id: &str,
) -> pb::SubmitReply {
    metrics.update_taken(matches!(outcome, SubmitOutcome::Duplicate { .. }));
    reply(outcome, task_id)
}

/// The answer to a taken result.
pub(super) fn reply(outcome: SubmitOutcome, task_id: &str) -> pb::SubmitReply {
    match outcome {
        SubmitOutcome::Accepted => pb::SubmitReply {
            outcome: Outcome::Accepted as i32,
            message: format!("result of task `{task_id}` accepted"),
        },
        SubmitOutcome::Duplicate { round } => pb::SubmitReply {
            outcome: Outcome::Duplicate as i32,
            message: format!(
                "result of task `{task_id}` was already counted in round {round}; this copy was ignored"
            ),
        },
    }
}
