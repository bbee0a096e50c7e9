//! A session with a parent coordinator for a program that is not a training client: a tiered
//! aggregator (`fedtune-coordinator serve --upstream`). It joins as an aggregator and uses the
//! client's own machinery — re-join after the parent restarted, backoff, heartbeats, resumed
//! downloads completed from the frozen cache, uploads retried under their task id — while what
//! it does with a task (run a round among its own clients) is the caller's business.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::TensorSet;
use fedtune_common::wire::EncodedTensors;
use fedtune_proto as pb;
use tonic::Code;
use tonic::transport::Endpoint;
use tracing::warn;

use crate::connection::{BACKOFF_START, Backoff, refused, transient};
use crate::frozen_cache::FrozenCache;
use crate::join::{JoinError, Joiner, join, reach};
use crate::session::{NEXT_TASK_TIMEOUT, Session, TRANSFER_ATTEMPTS};
use crate::tls::{ClientAuth, ClientSecurity};
use crate::transfer::{Heartbeat, TaskRef, decline, download, spawn_heartbeat, upload};

/// How to reach the parent coordinator.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// The parent's URL.
    pub coordinator: String,
    pub security: ClientSecurity,
    /// The name the parent knows this aggregator by (under mutual TLS, its certificate's).
    pub name: String,
    /// Give up when the parent stays unreachable this long.
    pub give_up_after: Duration,
}

/// The aggregator's session with its parent.
pub struct Upstream {
    opts: UpstreamOptions,
    endpoint: Endpoint,
    auth: ClientAuth,
    session: Option<Session>,
    backoff: Backoff,
    frozen: FrozenCache,
    /// The training examples behind this aggregator, announced at (re-)join.
    examples: u64,
}

/// What the parent said about an update.
#[derive(Debug)]
pub struct Delivered {
    /// Counted (accepted now, or a copy of one already counted).
    pub counted: bool,
    pub bytes: u64,
    pub message: String,
}

impl Upstream {
    pub fn new(opts: UpstreamOptions) -> anyhow::Result<Self> {
        let (endpoint, auth) = reach(&opts.coordinator, &opts.security)?;
        Ok(Self {
            backoff: Backoff::new(opts.give_up_after),
            opts,
            endpoint,
            auth,
            session: None,
            frozen: FrozenCache::default(),
            examples: 0,
        })
    }

    /// The training examples this aggregator's clients hold (the parent's log and status).
    pub fn set_examples(&mut self, examples: u64) {
        self.examples = examples;
    }

    async fn session(&mut self) -> anyhow::Result<&mut Session> {
        while self.session.is_none() {
            let joiner = Joiner {
                coordinator: &self.opts.coordinator,
                name: &self.opts.name,
                device: "aggregator".into(),
                aggregator: true,
            };
            match join(&self.endpoint, &self.auth, &joiner, self.examples).await {
                Ok(s) => {
                    self.backoff.reset();
                    self.session = Some(s);
                }
                Err(JoinError::Fatal(e)) => return Err(e),
                Err(JoinError::Retry(e)) => {
                    self.backoff
                        .wait(&format!("joining {}", self.opts.coordinator), &e)
                        .await?;
                }
            }
        }
        self.session
            .as_mut()
            .context("no session with the parent coordinator")
    }

    /// The parent's next task (long-poll), joining (again) as needed; unreachable for longer
    /// than `give_up_after` is an error.
    pub async fn next_task(&mut self) -> anyhow::Result<pb::Task> {
        loop {
            let s = self.session().await?;
            let mut req = tonic::Request::new(pb::NextTaskRequest {
                session_token: s.token.clone(),
            });
            req.set_timeout(NEXT_TASK_TIMEOUT);
            match s.rpc.next_task(req).await {
                Ok(t) => {
                    self.backoff.reset();
                    return Ok(t.into_inner());
                }
                Err(st) if st.code() == Code::Unauthenticated => {
                    warn!(
                        "the parent coordinator no longer knows this aggregator ({}); joining again",
                        st.message()
                    );
                    self.session = None;
                }
                Err(st) if transient(&st) => {
                    self.backoff.wait("asking the parent for work", &st).await?;
                }
                Err(st) => anyhow::bail!("the parent coordinator refused NextTask: {st}"),
            }
        }
    }

    /// Heartbeats to the parent with `activity` until the guard is dropped, so that a round
    /// among this aggregator's clients is not taken for a dead client.
    pub async fn heartbeat(&mut self, activity: String) -> anyhow::Result<Heartbeat> {
        let s = self.session().await?;
        Ok(spawn_heartbeat(s, activity, None))
    }

    /// The whole global model of a task, completed from the frozen tensors held since the
    /// last task (so only the trainable ones travel once they are held).
    pub async fn fetch_model(
        &mut self,
        task_id: &str,
        round: u64,
        spec: &ModelSpec,
        frozen: &[String],
    ) -> anyhow::Result<TensorSet> {
        let offer = self.frozen.offer(frozen).map(|(h, _)| h);
        let s = self.session().await?;
        let task = TaskRef { task_id, round };
        let payload = download(s, task, spec, offer.map(|h| (h, frozen)), &[]).await?;
        self.frozen
            .complete(payload.into_tensor_set()?, spec, frozen)
    }

    /// The frozen tensor names held from the last download (an evaluation task carries none).
    pub fn frozen_held(&self) -> Vec<String> {
        self.frozen.names()
    }

    /// Uploads one pre-aggregated update for `task`, retried under its task id. A session
    /// lost meanwhile is joined again and the update sent once more: the parent counts a task
    /// once.
    pub async fn upload(
        &mut self,
        task: &pb::TrainTask,
        encoded: &EncodedTensors,
        num_examples: u64,
        metrics: &HashMap<String, f64>,
    ) -> anyhow::Result<Delivered> {
        for _ in 0..TRANSFER_ATTEMPTS {
            let s = self.session().await?;
            match upload(s, task, encoded, num_examples, metrics).await {
                Ok((counted, bytes, message)) => {
                    return Ok(Delivered {
                        counted,
                        bytes,
                        message,
                    });
                }
                Err(e) => match e.downcast_ref::<tonic::Status>() {
                    Some(st) if st.code() == Code::Unauthenticated => self.session = None,
                    Some(st) if transient(st) => {
                        self.backoff.wait("sending the update", st).await?;
                    }
                    _ => return Err(e),
                },
            }
        }
        anyhow::bail!(
            "round {}: the parent coordinator did not take the update after {TRANSFER_ATTEMPTS} tries",
            task.round
        )
    }

    /// Tells the parent this aggregator cannot complete `task_id` (its own round failed), so
    /// the parent need not wait for its deadline. A parent without DeclineTask (UNIMPLEMENTED)
    /// counts the task failed at its deadline instead; that is not an error.
    pub async fn decline(&mut self, task_id: &str, reason: &str) -> anyhow::Result<String> {
        let s = self.session().await?;
        match decline(s, task_id, reason).await {
            Ok(said) => Ok(said),
            Err(st) if st.code() == Code::Unimplemented => Ok(
                "the parent cannot be told (an older coordinator): it counts the task failed at its deadline".into(),
            ),
            Err(st) if refused(&st) || transient(&st) => Ok(format!("not taken: {}", st.message())),
            Err(st) => Err(st.into()),
        }
    }

    /// Reports an evaluation's figures (already combined over this aggregator's clients).
    pub async fn submit_evaluation(
        &mut self,
        task: &pb::EvaluateTask,
        num_examples: u64,
        metrics: HashMap<String, f64>,
    ) -> anyhow::Result<String> {
        let s = self.session().await?;
        let report = pb::EvaluationReport {
            session_token: s.token.clone(),
            task_id: task.task_id.clone(),
            round: task.round,
            num_examples,
            metrics,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match s.rpc.submit_evaluation(report.clone()).await {
                Ok(r) => return Ok(r.into_inner().message),
                Err(st) if attempt < TRANSFER_ATTEMPTS && transient(&st) => {
                    tokio::time::sleep(BACKOFF_START * attempt).await;
                }
                Err(st) if refused(&st) => return Ok(format!("refused: {}", st.message())),
                Err(st) => return Err(st.into()),
            }
        }
    }
}
