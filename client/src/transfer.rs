//! Moving tensors over the session: the model download (checked against the task's model,
//! completed from the frozen cache), the update upload (retried under the same task id, which
//! the coordinator counts once), and the heartbeats that keep a long transfer or training
//! from being taken for a dead client.

use std::collections::HashMap;

use anyhow::{Context, bail};
use fedtune_common::logging::NET;
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::{TensorSpec, check_specs};
use fedtune_common::wire::{Assembler, EncodedTensors, Payload};
use fedtune_proto::{self as pb, model_frame, submit_reply::Outcome, update_frame};
use tokio_stream::StreamExt;
use tonic::Status;
use tracing::warn;

use crate::connection::{BACKOFF_START, refused, transient};
use crate::session::{Session, TRANSFER_ATTEMPTS};

/// Sends Heartbeat every interval until dropped.
pub struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How far local training is, for the heartbeats: the trainer updates it at every step and
/// wakes the heartbeat when an epoch starts or ends.
pub(crate) type TrainingWatch = tokio::sync::watch::Receiver<Option<pb::TrainingProgress>>;

/// Sends Heartbeat every interval, and with `training` whenever the trainer marks a change,
/// until dropped.
pub(crate) fn spawn_heartbeat(
    s: &Session,
    activity: String,
    mut training: Option<TrainingWatch>,
) -> Heartbeat {
    let (mut rpc, token, every) = (s.rpc.clone(), s.token.clone(), s.heartbeat_every);
    Heartbeat(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            let changed = async {
                match training.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                live = changed => {
                    if !live {
                        // The trainer is done with it: back to the interval alone.
                        training = None;
                        continue;
                    }
                }
            }
            let req = pb::HeartbeatRequest {
                session_token: token.clone(),
                activity: activity.clone(),
                training: training.as_ref().and_then(|rx| rx.borrow().clone()),
            };
            if let Err(e) = rpc.heartbeat(req).await {
                tracing::debug!("heartbeat failed: {e}");
            }
        }
    }))
}

/// The task a model download is for.
#[derive(Clone, Copy)]
pub(crate) struct TaskRef<'a> {
    pub task_id: &'a str,
    pub round: u64,
}

/// Streams the global model of `task`, checking it against the model the task names.
pub(crate) async fn download(
    s: &mut Session,
    task: TaskRef<'_>,
    spec: &ModelSpec,
    frozen: Option<(u64, &[String])>,
    with_model: &[TensorSpec],
) -> anyhow::Result<Payload> {
    // What the strategy sends after the model (SCAFFOLD's server variate) is never frozen.
    let mut expected = spec.specs();
    expected.extend_from_slice(with_model);
    let limit: u64 = expected.iter().map(|t| t.num_elements() as u64 * 4).sum();
    // Offering the frozen tensors' hash, the client may receive the trainable ones only.
    let (frozen_hash, trainable) = match frozen {
        Some((hash, names)) => (
            hash,
            expected
                .iter()
                .filter(|t| !names.contains(&t.name))
                .cloned()
                .collect(),
        ),
        None => (0, Vec::new()),
    };
    // What arrived before a broken stream: the retry resumes after its last good chunk.
    let mut partial: Option<Assembler> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let dl = Download {
            task,
            expected: &expected,
            trainable: &trainable,
            frozen_hash,
            limit,
        };
        match try_download(s, dl, &mut partial).await {
            Ok(set) => return Ok(set),
            Err(e)
                if attempt < TRANSFER_ATTEMPTS
                    && e.downcast_ref::<Status>().is_some_and(transient) =>
            {
                let kept = partial.as_ref().map_or(0, Assembler::received);
                warn!(
                    target: NET,
                    "round {}: model download failed ({e}); retrying ({attempt}/{TRANSFER_ATTEMPTS}){}",
                    task.round,
                    if kept > 0 {
                        format!(", resuming at byte {kept}")
                    } else {
                        String::new()
                    }
                );
                tokio::time::sleep(BACKOFF_START * attempt).await;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "downloading the global model for round {}",
                    task.round
                )));
            }
        }
    }
}

/// What one model download is for and must match.
#[derive(Clone, Copy)]
pub(crate) struct Download<'a> {
    pub task: TaskRef<'a>,
    pub expected: &'a [TensorSpec],
    pub trainable: &'a [TensorSpec],
    pub frozen_hash: u64,
    pub limit: u64,
}

/// One try at a download, continuing `partial` (chunks already received and checked) when
/// the coordinator serves the same payload; `partial` holds what arrived if the stream breaks.
pub(crate) async fn try_download(
    s: &mut Session,
    dl: Download<'_>,
    partial: &mut Option<Assembler>,
) -> anyhow::Result<Payload> {
    let resume_offset = partial.as_ref().map_or(0, Assembler::received);
    let mut frames = s
        .rpc
        .fetch_model(pb::FetchModelRequest {
            session_token: s.token.clone(),
            task_id: dl.task.task_id.to_string(),
            frozen_hash: dl.frozen_hash,
            resume_offset,
        })
        .await?
        .into_inner();
    let manifest = match frames.next().await {
        Some(Ok(pb::ModelFrame {
            frame: Some(model_frame::Frame::Manifest(m)),
        })) => m,
        Some(Ok(_)) => bail!("model stream did not start with a manifest"),
        Some(Err(st)) => return Err(st.into()),
        None => bail!("model stream was empty"),
    };
    let mut asm = match partial.take() {
        // The same payload (its whole checksum is in the manifest): carry on.
        Some(asm) if *asm.manifest() == manifest => asm,
        // Another payload: the next try starts from the beginning.
        Some(_) => {
            return Err(Status::aborted(
                "the coordinator's model changed while the download was resuming",
            )
            .into());
        }
        None => {
            let asm = Assembler::new(manifest, dl.limit)?;
            let trainable_only =
                dl.frozen_hash != 0 && check_specs(asm.specs(), dl.trainable).is_ok();
            if !trainable_only {
                check_specs(asm.specs(), dl.expected)
                    .context("the coordinator's model does not match the model the task names")?;
            }
            asm
        }
    };
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(st) => {
                *partial = Some(asm);
                return Err(st.into());
            }
        };
        match frame {
            pb::ModelFrame {
                frame: Some(model_frame::Frame::Chunk(c)),
            } => {
                asm.push(&c)?;
            }
            _ => bail!("unexpected frame in the model stream"),
        }
    }
    Ok(asm.finish()?)
}

/// An update the coordinator could not take because it was away or had restarted (its
/// session gone): kept, and sent again under the same task id once the client is back in
/// touch. The coordinator counts a task once, so a copy it already has is answered DUPLICATE.
#[derive(Debug)]
pub(crate) struct PendingUpload {
    pub task: pb::TrainTask,
    pub encoded: EncodedTensors,
    pub num_examples: u64,
    pub metrics: HashMap<String, f64>,
    /// Times the coordinator was reached again but had lost the session (it restarted); a
    /// coordinator that stays away is bounded by the client's --give-up-after instead.
    pub resent: u32,
}

/// The error that carries a [`PendingUpload`] out of a task.
#[derive(Debug, thiserror::Error)]
#[error("round {}: the update could not be delivered ({why}); it is sent again once the coordinator is back", .pending.task.round)]
pub(crate) struct UndeliveredUpdate {
    pub pending: Box<PendingUpload>,
    pub why: Status,
}

/// Sends `pending` again; on another failure worth retrying, hands it back in the error.
pub(crate) async fn resend(
    s: &mut Session,
    pending: Box<PendingUpload>,
) -> anyhow::Result<(bool, String)> {
    let p = &pending;
    match upload(s, &p.task, &p.encoded, p.num_examples, &p.metrics).await {
        Ok((counted, _, message)) => Ok((counted, message)),
        Err(e) => Err(undelivered(e, pending)),
    }
}

/// Wraps an upload failure that may mend (the coordinator away or restarted) so that the
/// update is kept; other failures pass through.
pub(crate) fn undelivered(e: anyhow::Error, pending: Box<PendingUpload>) -> anyhow::Error {
    match e.downcast::<Status>() {
        Ok(st) if st.code() == tonic::Code::Unauthenticated || transient(&st) => {
            UndeliveredUpdate { pending, why: st }.into()
        }
        Ok(st) => st.into(),
        Err(e) => e,
    }
}

/// Uploads `update` for `task`; retries transient failures with the same task id (the
/// coordinator counts a task once). Returns (counted, bytes sent, what the coordinator said).
pub(crate) async fn upload(
    s: &mut Session,
    task: &pb::TrainTask,
    encoded: &EncodedTensors,
    num_examples: u64,
    metrics: &HashMap<String, f64>,
) -> anyhow::Result<(bool, u64, String)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let header = pb::UpdateHeader {
            session_token: s.token.clone(),
            task_id: task.task_id.clone(),
            round: task.round,
            model_version: task.model_version,
            num_examples,
            manifest: Some(encoded.manifest.clone()),
            metrics: metrics.clone(),
        };
        let frames = std::iter::once(pb::UpdateFrame {
            frame: Some(update_frame::Frame::Header(header)),
        })
        .chain(encoded.chunks.iter().cloned().map(|c| pb::UpdateFrame {
            frame: Some(update_frame::Frame::Chunk(c)),
        }))
        .collect::<Vec<_>>();
        let frames = tokio_stream::iter(frames.into_iter().enumerate()).map(|(i, f)| {
            // The header and the first chunk are on their way (fault tests).
            if i == 2 {
                fedtune_common::crash_point::reached("upload");
            }
            f
        });
        match s.rpc.submit_update(frames).await {
            Ok(r) => {
                let r = r.into_inner();
                let counted =
                    r.outcome == Outcome::Accepted as i32 || r.outcome == Outcome::Duplicate as i32;
                return Ok((counted, encoded.total_bytes(), r.message));
            }
            Err(st) if attempt < TRANSFER_ATTEMPTS && transient(&st) => {
                warn!(
                    target: NET,
                    "round {}: upload failed ({}); retrying ({attempt}/{TRANSFER_ATTEMPTS})",
                    task.round,
                    st.message()
                );
                tokio::time::sleep(BACKOFF_START * attempt).await;
            }
            Err(st) if refused(&st) => {
                // The round goes on without this update; so does this client.
                warn!(
                    target: NET,
                    "round {}: coordinator refused the update: {}",
                    task.round,
                    st.message()
                );
                return Ok((
                    false,
                    encoded.total_bytes(),
                    format!("refused: {}", st.message()),
                ));
            }
            Err(st) => return Err(st.into()),
        }
    }
}

/// Tells the coordinator this client cannot complete `task_id`, and why: the task fails now
/// instead of at the round's deadline. Returns what the coordinator said.
pub(crate) async fn decline(
    s: &mut Session,
    task_id: &str,
    reason: &str,
) -> Result<String, Status> {
    let req = pb::DeclineRequest {
        session_token: s.token.clone(),
        task_id: task_id.to_string(),
        reason: reason.to_string(),
    };
    Ok(s.rpc.decline_task(req).await?.into_inner().message)
}
