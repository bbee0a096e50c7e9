//! Federated evaluation on the client: an Evaluate task measured on local data and reported.

use std::collections::HashMap;

use anyhow::Context;
use fedtune_common::spec_wire;
use fedtune_common::train::TrainSettings;
use fedtune_proto as pb;
use tracing::{info, warn};

use crate::connection::{BACKOFF_START, refused, transient};
use crate::fine_tune::{self, Split};
use crate::frozen_cache::FrozenCache;
use crate::local_data::LocalData;
use crate::personal_model::PersonalStore;
use crate::session::{ClientOptions, Session, TRANSFER_ATTEMPTS, TrainMode};
use crate::task_config;
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
            let personal = match (personalization(&task, opts, local.data)?, local.data) {
                (Some(settings), Some(own)) => {
                    // Evaluated on a test set: the training examples are another file's.
                    let examples = match local.test {
                        Some(_) => Some(own.examples_for(&spec)?),
                        None => None,
                    };
                    Some((settings, own, examples))
                }
                _ => None,
            };
            tokio::task::block_in_place(|| {
                let split = Split {
                    examples: examples.as_ref(),
                    train_idx: &[],
                    val_idx: indices,
                };
                let (n, mut metrics) =
                    fine_tune::evaluate_global(&global, &spec, split, device, batch)?;
                if let Some(((settings, dropout), own, own_examples)) = &personal {
                    let train =
                        Split::of(own, own_examples.as_deref().unwrap_or(examples.as_ref()));
                    let eval = Split {
                        examples: examples.as_ref(),
                        train_idx: &[],
                        val_idx: indices,
                    };
                    let store = PersonalStore::new(opts.state_dir.clone());
                    let key = &task.personal_model;
                    let ditto = !key.is_empty();
                    let kept = ditto.then(|| store.kept(key, &global.specs())).flatten();
                    let anchored;
                    let settings = if ditto {
                        // Ditto: the personal model, pulled towards the global one.
                        anchored = TrainSettings {
                            proximal_anchor: Some(global.clone()),
                            ..settings.clone()
                        };
                        &anchored
                    } else {
                        settings
                    };
                    let start = kept.as_ref().unwrap_or(&global);
                    let (figures, personal) = fine_tune::personalize(
                        start, &spec, settings, *dropout, train, eval, device,
                    )?;
                    // A personal model that cannot be written only steers later rounds less
                    // well (they continue from what was kept before): the evaluation counts.
                    if ditto && let Err(e) = store.keep(key, &personal) {
                        warn!(
                            "{e:#}; this round's figures are still reported, the next \
                             round's personal model continues from the last one kept"
                        );
                    }
                    metrics.extend(figures);
                }
                anyhow::Ok((n, metrics))
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
    let acc = |k: &str| m(k).map_or("-".into(), |a| format!("{:.2}%", a * 100.0));
    let personal = match m("personal_accuracy") {
        Some(_) => format!(
            " | {} after {} local steps: acc {}",
            if task.personal_model.is_empty() {
                "fine-tuned"
            } else {
                "personal model (Ditto)"
            },
            task.personalize_steps,
            acc("personal_accuracy")
        ),
        None => String::new(),
    };
    info!(
        "{} ({}) round {} evaluation of model v{} | {} {what} examples | loss {} acc {} f1 {}{personal} | {}",
        opts.name,
        s.client_id,
        task.round,
        task.model_version,
        num_examples,
        m("loss").map_or("-".into(), |v| format!("{v:.4}")),
        acc("accuracy"),
        m("f1").map_or("-".into(), |v| format!("{v:.4}")),
        reply
    );
    Ok(())
}

/// The training settings of a task's personalisation (`personalize_steps` local steps on the
/// client's training split), checked like a training task's; `None` when the task asks for
/// none or this client has no training examples.
fn personalization(
    task: &pb::EvaluateTask,
    opts: &ClientOptions,
    own: Option<&LocalData>,
) -> anyhow::Result<Option<(TrainSettings, f64)>> {
    let (Some(cfg), Some(own)) = (task.personalize.as_ref(), own) else {
        return Ok(None);
    };
    if task.personalize_steps == 0 || own.train_idx.is_empty() {
        return Ok(None);
    }
    let seed = cfg.seed ^ opts.seed.rotate_left(17);
    let (mut settings, dropout) = task_config::settings_from(cfg, opts.caps, seed, &opts.name)
        .context("the coordinator's personalisation settings")?;
    let steps = task.personalize_steps as usize;
    let per_epoch = own.train_idx.len().div_ceil(settings.batch_size);
    settings.epochs = steps.div_ceil(per_epoch.max(1)) as u32;
    settings.max_steps = Some(steps);
    settings.early_stopping_patience = 0;
    Ok(Some((settings, dropout)))
}
