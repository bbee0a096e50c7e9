//! What clients send during secure aggregation, through the service: their public keys (the
//! report of a trained task), their sealed shares, the shares they reveal, and the check of a
//! masked upload's header. Each is checked against the step the client was sent; a malformed
//! message fails that client's task (the round goes on without it), a repeat is DUPLICATE.

use fedtune_common::secagg::Revealed;
use prost::Message as _;

use super::secure::{SecAggPhase, advertise_from, revealed_from, sealed_from};
use super::*;
use crate::secure_agg::SecAggRefusal;

/// What a SecAggMessage carries, checked for shape.
enum Message {
    Advertise(fedtune_common::secagg::Advertise),
    Shares {
        sealed: Vec<fedtune_common::secagg::SealedShare>,
        commitment: [u8; 32],
    },
    Reveal(Vec<Revealed>),
}

/// Who sent a message, for which attempt.
struct Sender {
    serial: u64,
    round: u64,
    client_id: String,
    participant: u32,
}

impl Federation {
    /// A client's secure-aggregation message for its training task.
    pub fn secagg_message(&self, msg: pb::SecAggMessage) -> Result<SubmitOutcome, Refusal> {
        use pb::sec_agg_message::Message as M;
        let task_id = msg.task_id.clone();
        let bytes = msg.encoded_len() as u64;
        let sender = self.secagg_sender(&msg)?;
        let malformed = |why: String| {
            self.fail_task(sender.serial, &sender.client_id, &why);
            Refusal::SecAgg {
                task_id: task_id.clone(),
                reason: why,
            }
        };
        let message = match msg.message {
            None => return Err(malformed("an empty secure-aggregation message".into())),
            Some(M::Advertise(keys)) => {
                if keys.participant != sender.participant {
                    return Err(malformed(format!(
                        "keys for participant {}, the task's is {}",
                        keys.participant, sender.participant
                    )));
                }
                Message::Advertise(advertise_from(&keys).map_err(malformed)?)
            }
            Some(M::Shares(s)) => Message::Shares {
                commitment: <[u8; 32]>::try_from(&s.commitment[..]).map_err(|_| {
                    malformed(format!(
                        "a seed commitment of {} bytes, not 32",
                        s.commitment.len()
                    ))
                })?,
                sealed: s.sealed.into_iter().map(sealed_from).collect(),
            },
            Some(M::Reveal(r)) => Message::Reveal(
                r.shares
                    .iter()
                    .map(revealed_from)
                    .collect::<Result<_, _>>()
                    .map_err(malformed)?,
            ),
        };
        let is_advertise = matches!(message, Message::Advertise(_));
        let applied = {
            let mut slot = lock(&self.secagg);
            match slot.as_mut().filter(|s| s.serial == sender.serial) {
                None => Err(SecAggRefusal::WrongStep {
                    who: sender.participant,
                    what: "a message",
                    step: crate::secure_agg::Step::Done,
                }),
                Some(s) => match message {
                    Message::Advertise(ad) => s.round.advertise(ad),
                    Message::Shares { sealed, commitment } => {
                        s.round.share_keys(sender.participant, sealed, commitment)
                    }
                    Message::Reveal(r) => s.round.reveal(sender.participant, r),
                },
            }
        };
        match applied {
            Ok(()) => {}
            Err(SecAggRefusal::Twice(_)) => {
                return Ok(SubmitOutcome::Duplicate {
                    round: sender.round,
                });
            }
            // Every refusal fails the task: a late step cannot be joined any more, and a
            // malformed one would fail again.
            Err(e) => return Err(malformed(e.to_string())),
        }
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let num_examples = st
            .clients
            .by_id(&sender.client_id)
            .map_or(1, |c| c.num_examples);
        if let Phase::Open(open) = &mut st.phase
            && open.serial == sender.serial
        {
            open.stats.count_bytes_up(bytes);
            if is_advertise {
                // Trained, and in the protocol: this is the task's report.
                if let Some(t) = open.tasks.get_mut(&sender.client_id)
                    && t.status == TaskStatus::Assigned
                {
                    t.status = TaskStatus::Reported;
                    open.reports.push(ClientReport {
                        client_id: sender.client_id.clone(),
                        num_examples,
                        metrics: HashMap::new(),
                    });
                }
            } else if let Some(s) = open.secagg.as_mut() {
                s.pending.remove(&sender.client_id);
            }
        }
        drop(guard);
        self.changed.notify_waiters();
        Ok(SubmitOutcome::Accepted)
    }

    /// The sender of `msg`: its task must be a secure training task of the open attempt, not
    /// failed.
    fn secagg_sender(&self, msg: &pb::SecAggMessage) -> Result<Sender, Refusal> {
        let task_id = msg.task_id.clone();
        let mut st = lock(&self.state);
        let st = &mut *st;
        let (issued, _) = Self::task_of(st, &msg.session_token, &task_id)?;
        if !matches!(issued.kind, PhaseKind::Fit { secure: true, .. }) {
            return Err(Refusal::WrongKind {
                task_id,
                is: issued.kind.noun(),
                hint: "only a securely aggregated training task takes SubmitSecAgg",
            });
        }
        let open = Self::open_for(&mut st.phase, st.current_round, issued.key(), &task_id)?;
        let participant = open
            .secagg
            .as_ref()
            .and_then(|s| s.participant.get(&issued.client_id).copied())
            .ok_or_else(|| Refusal::UnknownTask(task_id.clone()))?;
        if let Some(TaskState {
            status: TaskStatus::Failed(reason),
            ..
        }) = open.tasks.get(&issued.client_id)
        {
            return Err(Refusal::TaskFailed {
                task_id,
                reason: reason.clone(),
            });
        }
        Ok(Sender {
            serial: issued.serial,
            round: issued.round,
            client_id: issued.client_id,
            participant,
        })
    }

    /// A masked upload's header: the client must have been sent the masking step; returns
    /// the participant and the words its update must have.
    pub(super) fn masked_upload_check(
        s: &SecAggPhase,
        task: &TaskState,
        issued: &Issued,
        claim: &UpdateClaim,
        model_version: u64,
    ) -> Result<(u32, usize), Refusal> {
        let refuse = |reason: String| Refusal::SecAgg {
            task_id: claim.task_id.clone(),
            reason,
        };
        if let TaskStatus::Failed(reason) = &task.status {
            return Err(Refusal::TaskFailed {
                task_id: claim.task_id.clone(),
                reason: reason.clone(),
            });
        }
        if claim.model_version != model_version {
            return Err(refuse(format!(
                "computed against model version {}, the round's is {model_version}",
                claim.model_version
            )));
        }
        if let Some((k, v)) = claim.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(refuse(format!("metric `{k}` is not finite ({v})")));
        }
        let sent_mask = matches!(
            s.pending
                .get(&issued.client_id)
                .and_then(|p| p.step.as_ref()),
            Some(pb::sec_agg_step::Step::Mask(_))
        );
        if !sent_mask {
            return Err(refuse(
                "a masked update outside the masking step (send it after the SecAggStep that says whom to mask with)".into(),
            ));
        }
        let participant = s
            .participant
            .get(&issued.client_id)
            .copied()
            .ok_or_else(|| Refusal::UnknownTask(claim.task_id.clone()))?;
        Ok((participant, s.words))
    }
}
