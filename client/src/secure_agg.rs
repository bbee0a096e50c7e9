//! The client's part of secure aggregation (SecAgg+) for one training task: the trained update
//! is weighted, clipped and quantised into 32-bit words; the client advertises two public keys,
//! seals shares of its secrets for its neighbours, uploads the update only masked, and at the
//! end reveals the shares that let the coordinator remove the masks from the sum — never both
//! shares of one neighbour. The coordinator drives the steps (SecAggStep tasks); a task of any
//! other kind means the round went on without this client, and is handed back to the caller.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use fedtune_common::secagg::participant::Participant;
use fedtune_common::secagg::quantize::Quantizer;
use fedtune_common::secagg::shamir::Share;
use fedtune_common::secagg::{Advertise, Revealed, SealedShare};
use fedtune_common::tensors::TensorSet;
use fedtune_common::wire::MAX_CHUNK_BYTES;
use fedtune_common::wire_masked::encode_masked;
use fedtune_proto::{self as pb, sec_agg_message::Message, sec_agg_step::Step, task::Kind};
use tonic::Code;
use tracing::{info, warn};

use crate::connection::{BACKOFF_START, refused, transient};
use crate::session::{NEXT_TASK_TIMEOUT, Session, TRANSFER_ATTEMPTS};
use crate::transfer::upload;

/// A test tool: end the process abruptly after a step, as a crash would (`--die-after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DieAfter {
    /// After sealing and sending the shares, before the masked update.
    SharedKeys,
    /// After the masked update was accepted, before revealing shares.
    Masked,
}

/// How a secure contribution ended.
pub(crate) enum Contribution {
    /// The masked update was accepted and the shares revealed.
    Done {
        masked_accepted: bool,
        message: String,
    },
    /// The coordinator moved on (the round closed or failed without this client): the task
    /// it sent instead, for the caller to handle.
    Superseded(Box<pb::Task>),
}

/// The update flattened in the coordinator's order (`order`: the trainable tensors of the
/// model it sent), scaled by `weight` and quantised; returns the words and how many values
/// were clipped.
fn quantise(
    delta: &TensorSet,
    order: &[String],
    weight: f64,
    q: &Quantizer,
) -> anyhow::Result<(Vec<u32>, usize)> {
    let mut words = Vec::with_capacity(
        order
            .iter()
            .filter_map(|n| delta.get(n))
            .map(|t| t.data.len())
            .sum(),
    );
    let mut clipped = 0;
    let mut rng = rand::rng();
    let mut scaled = Vec::new();
    for name in order {
        let t = delta
            .get(name)
            .with_context(|| format!("the update has no tensor `{name}`"))?;
        scaled.clear();
        scaled.extend(t.data.iter().map(|v| (f64::from(*v) * weight) as f32));
        clipped += q.quantize(&scaled, &mut words, &mut rng);
    }
    Ok((words, clipped))
}

async fn send(s: &mut Session, task: &pb::TrainTask, message: Message) -> anyhow::Result<String> {
    let msg = pb::SecAggMessage {
        session_token: s.token.clone(),
        task_id: task.task_id.clone(),
        message: Some(message),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match s.rpc.submit_sec_agg(msg.clone()).await {
            Ok(r) => return Ok(r.into_inner().message),
            Err(st) if attempt < TRANSFER_ATTEMPTS && transient(&st) => {
                tokio::time::sleep(BACKOFF_START * attempt).await;
            }
            Err(st) => return Err(st.into()),
        }
    }
}

fn advertise_of(p: &pb::SecAggPublicKeys) -> anyhow::Result<Advertise> {
    let key =
        |b: &[u8]| <[u8; 32]>::try_from(b).context("a neighbour's public key is not 32 bytes");
    Ok(Advertise {
        id: p.participant,
        enc_key: key(&p.enc_key)?,
        mask_key: key(&p.mask_key)?,
    })
}

/// Runs the secure steps for `task` with the trained `delta` (`num_examples`, `metrics`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn contribute(
    s: &mut Session,
    task: &pb::TrainTask,
    spec: &pb::SecAggSpec,
    order: &[String],
    delta: TensorSet,
    num_examples: u64,
    mut metrics: HashMap<String, f64>,
    die_after: Option<DieAfter>,
) -> anyhow::Result<Contribution> {
    let q = Quantizer::new(spec.clip, spec.bits)
        .map_err(|e| anyhow::anyhow!("the task's secure-aggregation settings: {e}"))?;
    if !(spec.weight.is_finite() && spec.weight > 0.0 && spec.weight <= 1.0) {
        bail!(
            "the task's secure-aggregation weight {} is not in (0, 1]",
            spec.weight
        );
    }
    let threshold = spec.threshold as usize;
    let (words, clipped) = quantise(&delta, order, spec.weight, &q)?;
    drop(delta);
    metrics.insert("secagg_clipped".into(), clipped as f64);
    if clipped > 0 {
        warn!(
            "round {}: {clipped} of {} update values clipped to ±{} before quantisation (the coordinator's --secagg-clip)",
            task.round,
            words.len(),
            q.clip
        );
    }
    let mut rng = rand::rng();
    let (mut me, ad) = Participant::new(spec.participant, &spec.context, &mut rng);
    send(
        s,
        task,
        Message::Advertise(pb::SecAggPublicKeys {
            participant: ad.id,
            enc_key: ad.enc_key.to_vec().into(),
            mask_key: ad.mask_key.to_vec().into(),
        }),
    )
    .await
    .context("sending secure-aggregation keys")?;

    let (mut shared, mut masked) = (false, None::<(bool, String)>);
    loop {
        let mut req = tonic::Request::new(pb::NextTaskRequest {
            session_token: s.token.clone(),
        });
        req.set_timeout(NEXT_TASK_TIMEOUT);
        let next = match s.rpc.next_task(req).await {
            Ok(t) => t.into_inner(),
            Err(st) if st.code() != Code::Unauthenticated && transient(&st) => {
                tokio::time::sleep(BACKOFF_START).await;
                continue;
            }
            Err(st) => return Err(st.into()),
        };
        let step = match next.kind {
            Some(Kind::Secagg(step)) if step.task_id == task.task_id => step,
            Some(Kind::Wait(w)) => {
                tokio::time::sleep(Duration::from_millis(u64::from(w.retry_after_ms))).await;
                continue;
            }
            _ => return Ok(Contribution::Superseded(Box::new(next))),
        };
        match step.step {
            Some(Step::ShareKeys(n)) if !shared => {
                let neighbours = n
                    .neighbours
                    .iter()
                    .map(advertise_of)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let (sealed, commitment) = me
                    .share_keys(&neighbours, threshold, &mut rng)
                    .map_err(|e| anyhow::anyhow!("sharing secure-aggregation keys: {e}"))?;
                send(
                    s,
                    task,
                    Message::Shares(pb::SecAggShares {
                        sealed: sealed
                            .into_iter()
                            .map(|x| pb::SealedShare {
                                from: x.from,
                                to: x.to,
                                ciphertext: x.ciphertext.into(),
                            })
                            .collect(),
                        commitment: commitment.to_vec().into(),
                    }),
                )
                .await
                .context("sending sealed shares")?;
                shared = true;
                if die_after == Some(DieAfter::SharedKeys) {
                    warn!("--die-after shared-keys: ending the process now");
                    std::process::abort();
                }
            }
            Some(Step::Mask(m)) if masked.is_none() => {
                let inbox: Vec<SealedShare> = m
                    .inbox
                    .into_iter()
                    .map(|x| SealedShare {
                        from: x.from,
                        to: x.to,
                        ciphertext: x.ciphertext.to_vec(),
                    })
                    .collect();
                for e in me.receive(&inbox) {
                    // Its secrets cannot be revealed by this client; the others' suffice if
                    // enough remain.
                    warn!("round {}: {e}", task.round);
                }
                let mut out = words.clone();
                me.mask(&mut out, &m.active)
                    .map_err(|e| anyhow::anyhow!("masking the update: {e}"))?;
                let encoded = encode_masked(&out, task.model_version, MAX_CHUNK_BYTES)?;
                drop(out);
                let (accepted, _, message) =
                    upload(s, task, &encoded, num_examples, &metrics).await?;
                masked = Some((accepted, message));
                if die_after == Some(DieAfter::Masked) && accepted {
                    warn!("--die-after masked: ending the process now");
                    std::process::abort();
                }
            }
            Some(Step::Unmask(u)) => {
                let revealed = me
                    .unmask(&u.survivors, &u.dropped, threshold)
                    .map_err(|e| anyhow::anyhow!("revealing shares: {e}"))?;
                let shares = revealed
                    .into_iter()
                    .map(|r| {
                        let (of, survivor, Share { x, y }) = match r {
                            Revealed::SelfSeed { of, share } => (of, true, share),
                            Revealed::MaskKey { of, share } => (of, false, share),
                        };
                        pb::RevealedShare {
                            of,
                            survivor,
                            x: u32::from(x),
                            y: y.into(),
                        }
                    })
                    .collect();
                match send(s, task, Message::Reveal(pb::SecAggReveal { shares })).await {
                    Ok(_) => {}
                    Err(e) if e.downcast_ref::<tonic::Status>().is_some_and(refused) => {
                        warn!("round {}: shares refused: {e}", task.round);
                    }
                    Err(e) => return Err(e.context("revealing shares")),
                }
                let (masked_accepted, message) =
                    masked.unwrap_or((false, "no masked update was asked for".into()));
                info!(
                    "round {}: secure aggregation done ({} survivors, {} dropped)",
                    task.round,
                    u.survivors.len(),
                    u.dropped.len()
                );
                return Ok(Contribution::Done {
                    masked_accepted,
                    message,
                });
            }
            // A step already answered, sent again while the answer was on its way.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
