//! Federated evaluation on the client: an Evaluate task measured on local data and reported.

use std::collections::HashMap;

use anyhow::Context;
use fedtune_common::spec_wire;
use fedtune_proto as pb;
use tracing::info;

use crate::connection::{BACKOFF_START, refused, transient};
use crate::fine_tune::{self, Split};
use crate::frozen_cache::FrozenCache;
use crate::local_data::LocalData;
use crate::session::{ClientOptions, Session, TRANSFER_ATTEMPTS, TrainMode};
use crate::transfer::{TaskRef, download, spawn_heartbeat};

/// What federated evaluation measures: the local test set when there is one, else the
/// validation split of the training data.
#[derive(Clone, Copy)]
pub(crate) struct EvalData<'a> {
    pub(crate) data: Option<&'a LocalData>,
    pub(crate) test: Option<&'a LocalData>,
}

impl<'a> EvalData<'a> {
    /// The data and the indices to evaluate on, and what they are called in the log.
    fn pick(self) -> Option<(&'a LocalData, &'a [usize], &'static str)> {
        match (self.test, self.data) {
            (Some(test), _) => Some((test, &test.train_idx, "test")),
            (None, Some(data)) if !data.val_idx.is_empty() => {
                Some((data, &data.val_idx, "validation"))
            }
            _ => None,
        }
    }
}

/// One Evaluate task: download the global model, evaluate it on the local test set or
/// validation split, report the figures.
pub(crate) async fn evaluate_round(
    s: &mut Session,
    task: pb::EvaluateTask,
    opts: &ClientOptions,
    local: EvalData<'_>,
    cache: &mut FrozenCache,
) -> anyhow::Result<()> {
    let spec_pb = task
        .model
        .clone()
        .context("evaluate task without a model")?;
    let spec = spec_wire::from_pb(&spec_pb)
        .context("coordinator asked for a model this client cannot build")?;
    let _heartbeat = spawn_heartbeat(s, format!("evaluating round {}", task.round), None);
    let evaluable = opts.train == TrainMode::Full && !spec.kind.is_synthetic();
    let mut what = "validation";
    let (num_examples, metrics) = match local.pick().filter(|_| evaluable) {
        None => {
            // Nothing to evaluate on (no validation split, or `--train none`): say so with a
            // zero-weight report rather than leaving the round waiting.
            (0, HashMap::new())
        }
        Some((data, indices, name)) => {
            what = name;
            let examples = data.examples_for(&spec)?;
            let frozen = cache.names();
            let payload = download(
                s,
                TaskRef {
                    task_id: &task.task_id,
                    round: task.round,
                },
                &spec,
                cache.offer(&frozen),
                &[],
            )
            .await?;
            let global = cache.complete(payload.into_tensor_set()?, &spec, &frozen)?;
            let (device, batch) = (opts.device, task.batch_size.max(1) as usize);
            tokio::task::block_in_place(|| {
                let split = Split {
                    examples: examples.as_ref(),
                    train_idx: &[],
                    val_idx: indices,
                };
                fine_tune::evaluate_global(&global, &spec, split, device, batch)
            })?
        }
    };
    let report = pb::EvaluationReport {
        session_token: s.token.clone(),
        task_id: task.task_id.clone(),
        round: task.round,
        num_examples,
        metrics: metrics.clone(),
    };
    let mut attempt = 0;
    let reply = loop {
        attempt += 1;
        match s.rpc.submit_evaluation(report.clone()).await {
            Ok(r) => break r.into_inner().message,
            Err(st) if attempt < TRANSFER_ATTEMPTS && transient(&st) => {
                tokio::time::sleep(BACKOFF_START * attempt).await;
            }
            Err(st) if refused(&st) => {
                break format!("refused: {}", st.message());
            }
            Err(st) => return Err(st.into()),
        }
    };
    let m = |k: &str| metrics.get(k).copied();
    info!(
        "{} ({}) round {} evaluation of model v{} | {} {what} examples | loss {} acc {} f1 {} | {}",
        opts.name,
        s.client_id,
        task.round,
        task.model_version,
        num_examples,
        m("loss").map_or("-".into(), |v| format!("{v:.4}")),
        m("accuracy").map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
        m("f1").map_or("-".into(), |v| format!("{v:.4}")),
        reply
    );
    Ok(())
}
