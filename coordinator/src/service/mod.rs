//! The gRPC service: thin. It asks the [`Gate`] who is calling, turns RPCs into calls on the
//! round engine ([`Federation`]) and the engine's refusals into gRPC statuses; it never does
//! arithmetic on tensors.

use std::pin::Pin;
use std::sync::Arc;

use fedtune_common::tensors::check_specs;
use fedtune_common::wire::{Assembler, WireError};
use fedtune_common::wire_masked::masked_assembler;
use fedtune_proto::federation_server::Federation as FederationRpc;
use fedtune_proto::{self as pb, model_frame, update_frame};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

mod admin;
mod refusal;

pub use admin::AdminService;
use refusal::{refused, reply, update_reply};

use crate::auth::{Denial, Gate, Identity, peer_identity};
use crate::limits::Admission;
use crate::round::{Federation, Refusal, UpdateClaim};
use crate::telemetry::RefusalReason;
use crate::upload::{Guarded, StageFailure, Staging};
use fedtune_common::codec::Codec;

pub struct FederationService {
    engine: Arc<Federation>,
    gate: Arc<Gate>,
    admission: Arc<Admission>,
}

impl FederationService {
    pub fn new(engine: Arc<Federation>, gate: Arc<Gate>, admission: Arc<Admission>) -> Self {
        Self {
            engine,
            gate,
            admission,
        }
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::ModelFrame, Status>> + Send>>;

#[tonic::async_trait]
impl FederationRpc for FederationService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        self.admission
            .join_attempt(request.remote_addr())
            .map_err(self.counted(RefusalReason::Limit))?;
        let who = self
            .gate
            .admit(&request)
            .map_err(self.counted(RefusalReason::Unauthorized))?;
        let mut join = request.into_inner();
        if let Some(who) = &who {
            // Under mutual TLS the certificate names the client, whatever it calls itself.
            join.name = who.name.clone();
        }
        let reply = self.engine.join(&join).map_err(|r| self.refuse(r))?;
        self.gate.bind(&reply.session_token, who);
        Ok(Response::new(reply))
    }

    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.check(&request, &request.get_ref().session_token)?;
        Ok(Response::new(
            self.engine
                .next_task(&request.get_ref().session_token)
                .await
                .map_err(|r| self.refuse(r))?,
        ))
    }

    type FetchModelStream = FrameStream;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        self.check(&request, &request.get_ref().session_token)?;
        let peer = peer_name(&request);
        let req = request.into_inner();
        let slot = self
            .admission
            .stream(
                &req.session_token,
                &format!("{peer}, task `{}`", req.task_id),
            )
            .map_err(self.counted(RefusalReason::Limit))?;
        let crate::round::Download {
            encoded: broadcast,
            stats,
            progress,
        } = self
            .engine
            .model_for(&req.session_token, &req.task_id, req.frozen_hash)
            .map_err(|r| self.refuse(r))?;
        let manifest = pb::ModelFrame {
            frame: Some(model_frame::Frame::Manifest(broadcast.manifest.clone())),
        };
        // Chunks are `Bytes` slices of the one encoded broadcast: cloning them copies nothing.
        // A resumed download starts at a chunk boundary the client already holds up to.
        let first = if req.resume_offset == 0 {
            0
        } else {
            broadcast
                .chunks
                .iter()
                .position(|c| c.offset == req.resume_offset)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "cannot resume the download of task `{}` at byte {}: not a chunk boundary of this model ({} bytes in chunks of {}); download it from the start",
                        req.task_id,
                        req.resume_offset,
                        broadcast.manifest.total_bytes,
                        broadcast.manifest.chunk_size
                    ))
                })?
        };
        // fp16 and bf16 carry each f32 in half its bytes.
        let widen = match Codec::from_proto(broadcast.manifest.compression.as_ref()) {
            Ok(Codec::F16 | Codec::Bf16) => 2,
            _ => 1,
        };
        let half = broadcast.chunks.len() / 2;
        let chunks = (first..broadcast.chunks.len()).map(move |i| {
            // The stream holds its slot until it is dropped (sent, or the client went away).
            let _slot = &slot;
            if i == half {
                fedtune_common::crash_point::reached("download");
            }
            let chunk = broadcast.chunks[i].clone();
            let wire = chunk.data.len() as u64;
            stats.count_down(wire, wire * widen);
            progress.reached(chunk.offset + chunk.data.len() as u64);
            Ok(pb::ModelFrame {
                frame: Some(model_frame::Frame::Chunk(chunk)),
            })
        });
        let stream = tokio_stream::iter(std::iter::once(Ok(manifest)).chain(chunks));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateFrame>>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let started = std::time::Instant::now();
        // Told after the header, which names the session: a client whose token was deleted
        // is refused and its session ended.
        let caller = self.gate.identify(&request);
        let peer = peer_name(&request);
        let mut frames = request.into_inner();
        let header = match frames.next().await {
            Some(Ok(pb::UpdateFrame {
                frame: Some(update_frame::Frame::Header(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "an update stream must start with its header",
                ));
            }
            Some(Err(e)) => return Err(e),
            None => return Err(Status::invalid_argument("empty update stream")),
        };
        self.revoke_if_token_deleted(caller, &header.session_token)
            .and_then(|caller| self.admit_caller(caller, &header.session_token))
            .map_err(self.counted(RefusalReason::Unauthorized))?;
        let _slot = self
            .admission
            .stream(
                &header.session_token,
                &format!("{peer}, task `{}`", header.task_id),
            )
            .map_err(self.counted(RefusalReason::Limit))?;
        let task_id = header.task_id.clone();
        let manifest = header.manifest.ok_or_else(|| {
            Status::invalid_argument(format!("update for task `{task_id}` has no manifest"))
        })?;
        let claim = UpdateClaim {
            token: header.session_token,
            task_id: task_id.clone(),
            model_version: header.model_version,
            num_examples: header.num_examples,
            metrics: header.metrics,
            total_bytes: manifest.total_bytes,
        };
        let metrics = self.engine.metrics.clone();
        let ticket = match self
            .engine
            .begin_upload(claim)
            .map_err(|r| self.refuse(r))?
        {
            Ok(ticket) => ticket,
            Err(outcome) => return Ok(Response::new(update_reply(&metrics, outcome, &task_id))),
        };

        // From here on, an RPC dropped before the upload is committed or refused (its
        // connection closed while it waited) gives the task back to its client.
        let mut ticket = Guarded::new(self.engine.clone(), ticket);
        // At most UPLOAD_SLOTS uploads are received at once: masked ones are assembled in
        // memory, plain ones keep a few chunks in flight to their journal file.
        let _slot = self
            .engine
            .upload_slots
            .acquire()
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let invalid = |e: &dyn std::fmt::Display| Some(e.to_string());
        let masked = ticket.masked_words();
        // A plain update is checked as it arrives and staged to its journal file (nothing
        // model-sized in memory); a masked one (no journal) is assembled in memory.
        let assembler = match masked {
            // Secure aggregation: one tensor of masked u32 words of the round's length.
            Some(words) => masked_assembler(manifest, words),
            None if self.engine.stages_uploads() => Assembler::verifier(manifest),
            None => Assembler::new(manifest, self.engine.model_bytes()),
        };
        let mut assembler = match assembler {
            Ok(a) => a,
            Err(e) => {
                self.engine.abort_upload(ticket.take(), invalid(&e));
                return Err(Status::invalid_argument(format!(
                    "update for task `{task_id}` refused: {e}"
                )));
            }
        };
        let announced = self.engine.upload_codec();
        let refusal = match masked {
            Some(_) => None,
            None => check_specs(assembler.specs(), self.engine.update_specs())
                .err()
                .map(|e| e.to_string())
                .or_else(|| {
                    (assembler.codec() != announced).then(|| {
                        format!(
                            "encoded as {}, but this run's tasks ask for {announced} (the coordinator's --compress-up); a client that ignores the task's `upload` encoding is older than this coordinator",
                            assembler.codec()
                        )
                    })
                }),
        };
        if let Some(e) = refusal {
            self.engine.abort_upload(ticket.take(), invalid(&e));
            return Err(Status::invalid_argument(format!(
                "update for task `{task_id}` refused: {e}"
            )));
        }
        let staging = match masked {
            Some(_) => None,
            None => match self.engine.stage_upload(
                assembler.specs(),
                // The manifest's checksum covers the file's bytes only when they are
                // the wire's (not decoded).
                (assembler.codec() == Codec::F32).then(|| assembler.manifest().checksum),
            ) {
                Ok(file) => file.map(|f| Staging::start(f, assembler.specs())),
                Err(e) => {
                    return Err(refused(
                        &metrics,
                        self.engine.staging_failed(ticket.take(), &e),
                    ));
                }
            },
        };
        let abandon = |staging: Option<Staging>| async move {
            if let Some(s) = staging {
                s.abandon().await;
            }
        };
        let mut writer_stopped = false;
        while let Some(frame) = frames.next().await {
            let chunk = match frame {
                Ok(pb::UpdateFrame {
                    frame: Some(update_frame::Frame::Chunk(c)),
                }) => c,
                Ok(_) => {
                    abandon(staging).await;
                    self.engine.abort_upload(
                        ticket.take(),
                        invalid(&"a second header in one update stream"),
                    );
                    return Err(Status::invalid_argument(format!(
                        "update for task `{task_id}`: a second header in one stream"
                    )));
                }
                Err(e) => {
                    // A broken stream: the client may retry the same task.
                    abandon(staging).await;
                    self.engine.abort_upload(ticket.take(), None);
                    return Err(e);
                }
            };
            ticket.count_bytes_up(chunk.data.len() as u64);
            // The chunk's values as f32 (decoded when the update is compressed).
            let values = match assembler.push(&chunk) {
                Ok(values) => values,
                Err(e) => {
                    abandon(staging).await;
                    return Err(self.wire_failure(ticket.take(), &task_id, e));
                }
            };
            ticket.count_decoded(values.len() as u64);
            if chunk.offset == 0 {
                fedtune_common::crash_point::reached("upload");
            }
            if let Some(s) = &staging
                && !s.push(values).await
            {
                // The writer stopped: finishing says why.
                writer_stopped = true;
                break;
            }
        }
        let received = started.elapsed();
        let engine = self.engine.clone();
        let Some(staging) = staging else {
            // Assembled in memory: masked, or no journal to stage to.
            let payload = match assembler.finish() {
                Ok(p) => p,
                Err(e) => return Err(self.wire_failure(ticket.take(), &task_id, e)),
            };
            let outcome = tokio::task::spawn_blocking(move || {
                let refuse = |r: Refusal| refused(&metrics, r);
                if masked.is_some() {
                    // Masked words look uniformly random: nothing to check but their count.
                    return engine
                        .commit_masked(ticket.take(), &payload)
                        .map(|o| update_reply(&metrics, o, &task_id))
                        .map_err(refuse);
                }
                if let Err(e) = payload.check_finite() {
                    engine.abort_upload(ticket.take(), Some(e.to_string()));
                    return Err(Status::invalid_argument(format!(
                        "update for task `{task_id}` refused: {e}"
                    )));
                }
                engine
                    .commit_upload(ticket.take(), &payload, None)
                    .map(|o| update_reply(&metrics, o, &task_id))
                    .map_err(refuse)
            })
            .await
            .map_err(|e| Status::internal(format!("aggregation task failed: {e}")))??;
            return Ok(Response::new(outcome));
        };
        if !writer_stopped && let Err(e) = assembler.verify_end() {
            staging.abandon().await;
            return Err(self.wire_failure(ticket.take(), &task_id, e));
        }
        let staged = match staging.finish().await {
            Ok(staged) => staged,
            Err(StageFailure::NonFinite(e)) => {
                self.engine.abort_upload(ticket.take(), invalid(&e));
                return Err(Status::invalid_argument(format!(
                    "update for task `{task_id}` refused: {e}"
                )));
            }
            Err(StageFailure::Io(e)) => {
                return Err(refused(
                    &metrics,
                    self.engine.staging_failed(ticket.take(), &e),
                ));
            }
        };
        let staged_at = std::time::Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            let file = staged.file_name().to_string();
            let outcome = engine.commit_upload(ticket.take(), &staged, Some(file));
            tracing::debug!(
                "update `{task_id}`: {} bytes received and staged in {received:?} (+{:?} to sync), folded in {:?}",
                assembler.received(),
                staged_at.duration_since(started + received),
                staged_at.elapsed()
            );
            outcome
                .map(|o| update_reply(&metrics, o, &task_id))
                .map_err(|r| refused(&metrics, r))
        })
        .await
        .map_err(|e| Status::internal(format!("aggregation task failed: {e}")))??;
        Ok(Response::new(outcome))
    }

    async fn submit_evaluation(
        &self,
        request: Request<pb::EvaluationReport>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let r = request.get_ref();
        self.check(&request, &r.session_token)?;
        let outcome = self
            .engine
            .evaluation_report(&r.session_token, r)
            .map_err(|e| self.refuse(e))?;
        Ok(Response::new(reply(outcome, &r.task_id)))
    }

    async fn submit_sec_agg(
        &self,
        request: Request<pb::SecAggMessage>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        self.check(&request, &request.get_ref().session_token)?;
        let msg = request.into_inner();
        let task_id = msg.task_id.clone();
        let outcome = self
            .engine
            .secagg_message(msg)
            .map_err(|r| self.refuse(r))?;
        Ok(Response::new(reply(outcome, &task_id)))
    }

    async fn decline_task(
        &self,
        request: Request<pb::DeclineRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let r = request.get_ref();
        self.check(&request, &r.session_token)?;
        self.engine
            .decline_task(&r.session_token, &r.task_id, &r.reason)
            .map_err(|e| self.refuse(e))?;
        Ok(Response::new(pb::SubmitReply {
            outcome: pb::submit_reply::Outcome::Accepted as i32,
            message: format!("task `{}` counted as failed", r.task_id),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        self.check(&request, &request.get_ref().session_token)?;
        let req = request.get_ref();
        self.engine
            .heartbeat(&req.session_token, req.training.as_ref())
            .map_err(|r| self.refuse(r))?;
        Ok(Response::new(pb::HeartbeatReply {}))
    }
}

/// The caller as logs name it: its certificate's name and its address.
fn peer_name<T>(request: &Request<T>) -> String {
    let addr = request
        .remote_addr()
        .map_or("an unknown address".to_string(), |a| a.to_string());
    match peer_identity(request) {
        Ok(Some(id)) => format!("client `{}` at {addr}", id.name),
        _ => addr,
    }
}

impl FederationService {
    fn refuse(&self, r: Refusal) -> Status {
        refused(&self.engine.metrics, r)
    }

    /// Counts a refusal the gate or the limits made, then passes their status on.
    fn counted(&self, reason: RefusalReason) -> impl Fn(Status) -> Status + '_ {
        move |status| {
            self.engine.metrics.refused(reason);
            status
        }
    }

    /// The gate's check of a call made with `token`; a client taken off the allow-list, or
    /// whose client token was deleted, also loses its session, so the open round stops
    /// waiting for it.
    fn check<T>(&self, request: &Request<T>, token: &str) -> Result<(), Status> {
        self.revoke_if_token_deleted(self.gate.identify(request), token)
            .and_then(|caller| self.admit_caller(caller, token))
            .map_err(self.counted(RefusalReason::Unauthorized))
    }

    /// `identified` (the gate's answer to who calls with session `token`); when the caller
    /// could not be identified because its client token was deleted, its session ends too.
    fn revoke_if_token_deleted(
        &self,
        identified: Result<Option<Identity>, Status>,
        token: &str,
    ) -> Result<Option<Identity>, Status> {
        identified.inspect_err(|status| {
            if self.gate.token_revoked(token) {
                self.engine.revoke(token, status.message());
            }
        })
    }

    fn admit_caller(&self, caller: Option<Identity>, token: &str) -> Result<(), Status> {
        match self.gate.check_caller(caller, token) {
            Ok(()) => Ok(()),
            Err(Denial::NoLongerAllowed(status)) => {
                self.engine.revoke(token, status.message());
                Err(status)
            }
            Err(Denial::Refused(status)) => Err(status),
        }
    }

    /// Corruption in transit (checksums, order, truncation) lets the client retry; a payload
    /// that does not describe this model fails the task.
    fn wire_failure(
        &self,
        ticket: crate::round::UploadTicket,
        task_id: &str,
        e: WireError,
    ) -> Status {
        let msg = format!("update for task `{task_id}` refused: {e}");
        match e {
            WireError::ChunkChecksum { .. }
            | WireError::PayloadChecksum
            | WireError::OutOfOrder { .. }
            | WireError::Truncated { .. } => {
                self.engine.abort_upload(ticket, None);
                self.engine.metrics.refused(RefusalReason::Corrupt);
                Status::data_loss(msg)
            }
            _ => {
                self.engine.abort_upload(ticket, Some(e.to_string()));
                Status::invalid_argument(msg)
            }
        }
    }
}
