//! A raw protocol client for tests: every RPC by hand, so that tests can provoke each refusal
//! and script exactly what a client sends.

use fedtune_common::tensors::{NamedTensor, TensorSet};
use fedtune_common::wire::{Assembler, EncodedTensors, MAX_CHUNK_BYTES};
use fedtune_proto::federation_client::FederationClient;
use fedtune_proto::{self as pb, PROTOCOL_VERSION, model_frame, task::Kind, update_frame};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

pub struct RawClient {
    pub rpc: FederationClient<Channel>,
    pub token: String,
}

impl RawClient {
    pub async fn join(url: &str, name: &str, examples: u64) -> Self {
        let mut rpc = FederationClient::connect(url.to_string()).await.unwrap();
        let reply = rpc
            .join(pb::JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                name: name.into(),
                device: "test".into(),
                num_examples: examples,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        Self {
            rpc,
            token: reply.session_token,
        }
    }

    /// Joins as [`RawClient::join`] once the coordinator at `url` answers (it may be starting
    /// or restarting), trying for up to 60 s.
    pub async fn join_when_up(url: &str, name: &str, examples: u64) -> Self {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Ok(mut rpc) = FederationClient::connect(url.to_string()).await {
                let join = rpc
                    .join(pb::JoinRequest {
                        protocol_version: PROTOCOL_VERSION,
                        name: name.into(),
                        device: "test".into(),
                        num_examples: examples,
                        ..Default::default()
                    })
                    .await;
                if let Ok(reply) = join {
                    return Self {
                        rpc,
                        token: reply.into_inner().session_token,
                    };
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no coordinator at {url} within 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn next(&mut self) -> Kind {
        loop {
            let task = self
                .rpc
                .next_task(pb::NextTaskRequest {
                    session_token: self.token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            match task.kind.unwrap() {
                Kind::Wait(_) => continue,
                other => return other,
            }
        }
    }

    pub async fn next_train(&mut self) -> pb::TrainTask {
        match self.next().await {
            Kind::Train(t) => t,
            _ => panic!("expected a train task"),
        }
    }

    /// Downloads the model of `task_id`; returns it and the number of chunks it came in.
    pub async fn fetch_counting(&mut self, task_id: &str) -> (TensorSet, usize) {
        let mut frames = self
            .rpc
            .fetch_model(pb::FetchModelRequest {
                session_token: self.token.clone(),
                task_id: task_id.into(),
                frozen_hash: 0,
                resume_offset: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let Some(Ok(pb::ModelFrame {
            frame: Some(model_frame::Frame::Manifest(m)),
        })) = frames.next().await
        else {
            panic!("no manifest")
        };
        let mut asm = Assembler::new(m, u64::MAX).unwrap();
        let mut chunks = 0;
        while let Some(f) = frames.next().await {
            let Some(model_frame::Frame::Chunk(c)) = f.unwrap().frame else {
                panic!("not a chunk")
            };
            assert!(c.data.len() <= MAX_CHUNK_BYTES);
            asm.push(&c).unwrap();
            chunks += 1;
        }
        (asm.finish().unwrap().into_tensor_set().unwrap(), chunks)
    }

    pub async fn fetch(&mut self, task_id: &str) -> TensorSet {
        self.fetch_counting(task_id).await.0
    }

    /// Reports an evaluation of `task`.
    pub async fn submit_eval(
        &mut self,
        task: &pb::EvaluateTask,
        examples: u64,
        metrics: &[(&str, f64)],
    ) -> Result<pb::SubmitReply, tonic::Status> {
        self.rpc
            .submit_evaluation(pb::EvaluationReport {
                session_token: self.token.clone(),
                task_id: task.task_id.clone(),
                round: task.round,
                num_examples: examples,
                metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Uploads an already encoded payload (e.g. a masked update) for `task`.
    pub async fn submit_encoded(
        &mut self,
        task: &pb::TrainTask,
        enc: &EncodedTensors,
        examples: u64,
    ) -> Result<pb::SubmitReply, tonic::Status> {
        self.upload(task, enc, examples, Default::default()).await
    }

    pub async fn submit(
        &mut self,
        task: &pb::TrainTask,
        delta: &TensorSet,
        examples: u64,
        corrupt_chunk: Option<usize>,
    ) -> Result<pb::SubmitReply, tonic::Status> {
        let mut enc = EncodedTensors::encode(delta, task.model_version, MAX_CHUNK_BYTES).unwrap();
        if let Some(c) = corrupt_chunk.and_then(|i| enc.chunks.get_mut(i)) {
            let mut data = c.data.to_vec();
            data[3] ^= 0x40;
            c.data = data.into();
        }
        let metrics = [("train_loss".to_string(), 1.0)].into();
        self.upload(task, &enc, examples, metrics).await
    }

    async fn upload(
        &mut self,
        task: &pb::TrainTask,
        enc: &EncodedTensors,
        examples: u64,
        metrics: std::collections::HashMap<String, f64>,
    ) -> Result<pb::SubmitReply, tonic::Status> {
        let header = pb::UpdateHeader {
            session_token: self.token.clone(),
            task_id: task.task_id.clone(),
            round: task.round,
            model_version: task.model_version,
            num_examples: examples,
            manifest: Some(enc.manifest.clone()),
            metrics,
        };
        let frames = std::iter::once(pb::UpdateFrame {
            frame: Some(update_frame::Frame::Header(header)),
        })
        .chain(enc.chunks.iter().cloned().map(|c| pb::UpdateFrame {
            frame: Some(update_frame::Frame::Chunk(c)),
        }))
        .collect::<Vec<_>>();
        self.rpc
            .submit_update(tokio_stream::iter(frames))
            .await
            .map(|r| r.into_inner())
    }
}

pub fn pattern(global: &TensorSet, f: impl Fn(usize) -> f32) -> TensorSet {
    TensorSet::new(
        global
            .tensors()
            .iter()
            .map(|t| NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data: (0..t.data.len()).map(&f).collect(),
            })
            .collect(),
    )
    .unwrap()
}
