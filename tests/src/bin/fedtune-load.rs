//! A load generator: many clients in one process, each a tokio task with its own connection,
//! speaking the real protocol to a coordinator (join, long-poll NextTask, download the model,
//! send a small fixed delta like `--train none`, answer evaluations), until the coordinator
//! says the run is finished. Prints one JSON line: how many tasks each client got (nobody
//! starves: the least and the most, and how many got none), errors, and the time taken.
//!
//!   fedtune-load --coordinator http://127.0.0.1:50051 --clients 1000
//!
//! `deploy/bench-load.sh` runs it against a coordinator and measures the coordinator.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fedtune_common::tensors::{NamedTensor, TensorSet};
use fedtune_common::wire::{Assembler, EncodedTensors, MAX_CHUNK_BYTES};
use fedtune_proto::federation_client::FederationClient;
use fedtune_proto::{self as pb, PROTOCOL_VERSION, model_frame, task::Kind, update_frame};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// The coordinator, e.g. http://127.0.0.1:50051 (plaintext: the coordinator runs --insecure).
    #[arg(long)]
    coordinator: String,
    /// Clients to simulate, each with its own connection.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Examples each client claims.
    #[arg(long, default_value_t = 10)]
    examples: u64,
    /// Joins started per second (a fleet does not join in one instant).
    #[arg(long, default_value_t = 2000)]
    joins_per_second: u64,
}

#[derive(Default)]
struct Counts {
    errors: AtomicU64,
    retries: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let counts = Arc::new(Counts::default());
    let mut handles = Vec::with_capacity(args.clients);
    let gap = Duration::from_secs_f64(1.0 / args.joins_per_second.max(1) as f64);
    for i in 0..args.clients {
        let (url, counts) = (args.coordinator.clone(), counts.clone());
        let name = format!("load-{:05}", i + 1);
        handles.push(tokio::spawn(async move {
            match client(&url, &name, args.examples, &counts).await {
                Ok(tasks) => tasks,
                Err(e) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("{name}: {e:#}");
                    0
                }
            }
        }));
        tokio::time::sleep(gap).await;
    }
    let mut tasks = Vec::with_capacity(args.clients);
    for h in handles {
        tasks.push(h.await.unwrap_or(0));
    }
    tasks.sort_unstable();
    let summary = serde_json::json!({
        "clients": args.clients,
        "tasks_min": tasks.first().copied().unwrap_or(0),
        "tasks_median": tasks.get(tasks.len() / 2).copied().unwrap_or(0),
        "tasks_max": tasks.last().copied().unwrap_or(0),
        "clients_without_a_task": tasks.iter().filter(|&&t| t == 0).count(),
        "errors": counts.errors.load(Ordering::Relaxed),
        "retries": counts.retries.load(Ordering::Relaxed),
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{summary}");
    Ok(())
}

/// One client's run; returns the training tasks it completed.
async fn client(url: &str, name: &str, examples: u64, counts: &Counts) -> anyhow::Result<u64> {
    let channel = connect(url, counts).await?;
    let mut rpc = FederationClient::new(channel);
    let token = rpc
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            name: name.into(),
            device: "load".into(),
            num_examples: examples,
            ..Default::default()
        })
        .await
        .context("join")?
        .into_inner()
        .session_token;
    let mut trained = 0;
    loop {
        let task = rpc
            .next_task(pb::NextTaskRequest {
                session_token: token.clone(),
            })
            .await
            .context("next task")?
            .into_inner();
        match task.kind.context("an empty task")? {
            Kind::Train(t) => {
                let global = fetch(&mut rpc, &token, &t.task_id).await?;
                let delta = fixed_delta(&global)?;
                let enc = EncodedTensors::encode(&delta, t.model_version, MAX_CHUNK_BYTES)?;
                let header = pb::UpdateHeader {
                    session_token: token.clone(),
                    task_id: t.task_id.clone(),
                    round: t.round,
                    model_version: t.model_version,
                    num_examples: examples,
                    manifest: Some(enc.manifest.clone()),
                    metrics: [("train_loss".to_string(), 1.0)].into(),
                };
                let frames: Vec<pb::UpdateFrame> = std::iter::once(pb::UpdateFrame {
                    frame: Some(update_frame::Frame::Header(header)),
                })
                .chain(enc.chunks.iter().cloned().map(|c| pb::UpdateFrame {
                    frame: Some(update_frame::Frame::Chunk(c)),
                }))
                .collect();
                rpc.submit_update(tokio_stream::iter(frames))
                    .await
                    .with_context(|| format!("upload of task `{}`", t.task_id))?;
                trained += 1;
            }
            Kind::Evaluate(t) => {
                rpc.submit_evaluation(pb::EvaluationReport {
                    session_token: token.clone(),
                    task_id: t.task_id,
                    round: t.round,
                    num_examples: examples,
                    metrics: [("loss".to_string(), 1.0), ("accuracy".to_string(), 0.5)].into(),
                })
                .await
                .context("evaluation")?;
            }
            Kind::Wait(_) => {}
            Kind::Finished(_) => return Ok(trained),
            Kind::Secagg(_) => anyhow::bail!("the load generator does not do secure aggregation"),
        }
    }
}

async fn connect(url: &str, counts: &Counts) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_secs(30));
    let mut wait = Duration::from_millis(50);
    for _ in 0..10 {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(_) => {
                counts.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
    Ok(endpoint.connect().await?)
}

async fn fetch(
    rpc: &mut FederationClient<Channel>,
    token: &str,
    task_id: &str,
) -> anyhow::Result<TensorSet> {
    let mut frames = rpc
        .fetch_model(pb::FetchModelRequest {
            session_token: token.into(),
            task_id: task_id.into(),
            frozen_hash: 0,
            resume_offset: 0,
        })
        .await
        .context("download")?
        .into_inner();
    let Some(Ok(pb::ModelFrame {
        frame: Some(model_frame::Frame::Manifest(m)),
    })) = frames.next().await
    else {
        anyhow::bail!("the model stream did not start with a manifest");
    };
    let mut asm = Assembler::new(m, u64::MAX)?;
    while let Some(f) = frames.next().await {
        match f?.frame {
            Some(model_frame::Frame::Chunk(c)) => {
                asm.push(&c)?;
            }
            _ => anyhow::bail!("not a chunk in the model stream"),
        }
    }
    Ok(asm.finish()?.into_tensor_set()?)
}

/// A small delta of the model's shape, the same every time (like `--train none`).
fn fixed_delta(global: &TensorSet) -> anyhow::Result<TensorSet> {
    Ok(TensorSet::new(
        global
            .tensors()
            .iter()
            .map(|t| NamedTensor::new(t.name.clone(), t.shape.clone(), vec![1e-3; t.data.len()]))
            .collect::<Result<Vec<_>, _>>()?,
    )?)
}
