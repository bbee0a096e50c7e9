//! An update's life in the engine: admitted (`begin_upload`), staged to its journal file while
//! it arrives (`stage_upload`), then counted and folded exactly once (`commit_upload`) or given
//! back to its client (`abort_upload`). The service streams the bytes; this decides what they
//! count for.

use crate::journal::{Accepted, StagedWriter};
use fedtune_common::blocks::Blocks;
use fedtune_common::tensors::TensorSpec;

use super::*;

impl Federation {
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
                warn!("update from {client_name} not taken: {refusal}");
                return Err(refusal);
            }
        };
        let Some(task) = open.tasks.get_mut(&issued.client_id) else {
            return Err(Refusal::UnknownTask(task_id));
        };
        let progress = Transfer::new(&task_id, claim.total_bytes);
        if let Some(c) = st.clients.by_id_mut(&issued.client_id) {
            c.upload = Some(progress.clone());
        }
        let masked = match &open.secagg {
            Some(s) => Some(Self::masked_upload_check(
                s,
                task,
                &issued,
                &claim,
                open.model_version,
            )?),
            None => None,
        };
        if masked.is_none()
            && let Some(duplicate) = Self::admit_plain(
                task,
                &issued,
                &claim,
                (
                    open.model_version,
                    self.cfg().strategy.kind.needs_step_weight(),
                ),
                &task_id,
            )?
        {
            return Ok(Err(duplicate));
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
            progress,
            masked,
        }))
    }

    /// A plain update's header against its task: the model version, examples and metrics it
    /// claims (a bad one fails the task: it would fail the same way again), and the task's
    /// state (already uploading or failed: refused; reported: a duplicate, `Some`).
    fn admit_plain(
        task: &mut TaskState,
        issued: &Issued,
        claim: &UpdateClaim,
        (model_version, needs_step_weight): (u64, bool),
        task_id: &str,
    ) -> Result<Option<SubmitOutcome>, Refusal> {
        let step_weight = claim.metrics.get(UpdateWeight::STEP_METRIC).copied();
        let invalid = if claim.model_version != model_version {
            Some(format!(
                "computed against model version {}, the round's is {model_version}",
                claim.model_version
            ))
        } else if claim.num_examples == 0 {
            Some("num_examples is 0; an update must come from at least one example".to_string())
        } else if needs_step_weight && !step_weight.is_some_and(|a| a.is_finite() && a > 0.0) {
            Some(format!(
                "metric `{}` is missing or not positive ({step_weight:?}); this run's strategy (FedNova or SCAFFOLD) divides the update by it: update the client",
                UpdateWeight::STEP_METRIC,
            ))
        } else {
            claim
                .metrics
                .iter()
                .find(|(_, v)| !v.is_finite())
                .map(|(k, v)| format!("metric `{k}` is not finite ({v})"))
        };
        let task_id = task_id.to_string();
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
            TaskStatus::Uploading => Err(Refusal::UploadInProgress(task_id)),
            TaskStatus::Failed(reason) => Err(Refusal::TaskFailed {
                task_id,
                reason: reason.clone(),
            }),
            TaskStatus::Reported => Ok(Some(SubmitOutcome::Duplicate {
                round: issued.round,
            })),
            TaskStatus::Assigned => {
                task.status = TaskStatus::Uploading;
                Ok(None)
            }
        }
    }

    /// An upload that did not complete: `failure` marks the task failed for the round (invalid
    /// content); `None` lets the client retry (a broken stream).
    pub fn abort_upload(&self, ticket: UploadTicket, failure: Option<String>) {
        if failure.is_some() {
            self.metrics.refused(RefusalReason::Invalid);
        }
        if ticket.masked.is_some() {
            // A masked update's task stays reported (its keys are in the protocol); a broken
            // stream may be retried, an invalid one fails the task.
            if let Some(reason) = failure {
                self.fail_task(
                    ticket.serial,
                    &ticket.client_id,
                    &format!(
                        "masked update for task `{}` refused: {reason}",
                        ticket.task_id
                    ),
                );
            }
            return;
        }
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
        // Its client may be waiting in NextTask for the task it holds again.
        self.changed.notify_waiters();
        self.progress.notify_waiters();
    }

    /// Starts an upload's journal file (`None` without a journal: secure aggregation), so
    /// its chunks go to disk as they arrive.
    pub fn stage_upload(
        &self,
        specs: &[TensorSpec],
        checksum: Option<u64>,
    ) -> anyhow::Result<Option<StagedWriter>> {
        self.journal
            .as_ref()
            .map(|j| j.stage(specs, checksum))
            .transpose()
    }

    /// Writing an upload's journal file failed: the upload ends, the task stays with its
    /// client (it may send it again), and the `Internal` refusal says why.
    pub fn staging_failed(&self, ticket: UploadTicket, e: &anyhow::Error) -> Refusal {
        let reason = format!("{e:#}");
        warn!("round {}: {reason}", ticket.round);
        let task_id = ticket.task_id.clone();
        self.abort_upload(ticket, None);
        Refusal::Internal { task_id, reason }
    }

    /// Counts a complete, verified delta (journaled first, when `file` names its synced
    /// journal file) and folds it into the round's aggregate, exactly once. Blocking: call it
    /// from a blocking thread.
    pub fn commit_upload(
        &self,
        ticket: UploadTicket,
        delta: &dyn Blocks,
        file: Option<String>,
    ) -> Result<SubmitOutcome, Refusal> {
        let discard = |file: &Option<String>| {
            if let (Some(j), Some(f)) = (&self.journal, file) {
                j.discard(f);
            }
        };
        let mut aggregate = lock(&self.aggregate);
        let weight = UpdateWeight::of(ticket.num_examples, &ticket.metrics);
        {
            let mut st = lock(&self.state);
            let st = &mut *st;
            let key = (ticket.serial, ticket.round);
            let open = match Self::open_for(&mut st.phase, st.current_round, key, &ticket.task_id) {
                Ok(open) => open,
                Err(refusal) => {
                    discard(&file);
                    warn!("update from {} not taken: {refusal}", ticket.client_name);
                    return Err(refusal);
                }
            };
            let Some(task) = open
                .tasks
                .get_mut(&ticket.client_id)
                .filter(|t| t.status == TaskStatus::Uploading)
            else {
                discard(&file);
                return Err(Refusal::AttemptClosed {
                    task_id: ticket.task_id,
                    round: ticket.round,
                });
            };
            if let (Some(journal), Some(file)) = (&self.journal, &file) {
                fedtune_common::crash_point::reached("journal");
                let entry = Accepted {
                    task_id: ticket.task_id.clone(),
                    client: ticket.client_name.clone(),
                    num_examples: ticket.num_examples,
                    metrics: ticket.metrics.clone(),
                    file: file.clone(),
                };
                if let Err(e) = journal.record(&entry) {
                    journal.discard(file);
                    task.status = TaskStatus::Assigned;
                    let reason = format!("{e:#}");
                    warn!("round {}: {reason}", ticket.round);
                    return Err(Refusal::Internal {
                        task_id: ticket.task_id,
                        reason,
                    });
                }
            }
            task.status = TaskStatus::Reported;
            open.reports.push(ClientReport {
                client_id: ticket.client_id.clone(),
                num_examples: ticket.num_examples,
                metrics: ticket.metrics,
            });
            st.counted.insert(ticket.task_id.clone(), ticket.round);
        }
        // Still holding `aggregate`: the round cannot close before this update is folded in.
        if let Some(agg) = aggregate.as_mut().filter(|a| a.serial == ticket.serial)
            && let Err(e) = agg.aggregator.accept(&ticket.client_name, delta, weight)
        {
            let reason = e.to_string();
            warn!("round {}: {reason}", ticket.round);
            agg.error.get_or_insert(e);
            drop(aggregate);
            self.progress.notify_waiters();
            return Err(Refusal::Internal {
                task_id: ticket.task_id,
                reason,
            });
        }
        drop(aggregate);
        self.progress.notify_waiters();
        Ok(SubmitOutcome::Accepted)
    }
}
