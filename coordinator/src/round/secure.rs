//! Secure aggregation of one training attempt, as the engine drives it. Training is the first
//! step: a client that trained advertises its public keys, which counts as its report. Then
//! three more steps, each sent to the clients as a SecAggStep task and closed when every
//! client it was sent to has answered or `secagg_step_timeout` passes: sharing keys, the
//! masked updates, revealing shares. The unmasked sum is dequantised into the example-weighted
//! mean delta the strategy applies. Fewer than the threshold at any step fails the attempt
//! (the round policy retries or stops; the model stays as it was).

use fedtune_common::secagg::quantize::Quantizer;
use fedtune_common::secagg::shamir::Share;
use fedtune_common::secagg::{Advertise, Revealed, SealedShare};
use fedtune_common::wire_masked::masked_words;

use super::*;
use crate::config::SecAggSettings;
use crate::secure_agg::{SecAggRefusal, SecAggRound};

/// The open attempt's cryptographic state, kept apart from `state` because folding a masked
/// update is model-sized work.
pub(super) struct SecAggSlot {
    pub(super) serial: u64,
    pub(super) round: SecAggRound,
}

/// How the open attempt routes secure aggregation: who is which participant, with what
/// weight, and the step each one is sent now (until it answers).
pub(super) struct SecAggPhase {
    pub(super) participant: HashMap<String, u32>,
    pub(super) weight: HashMap<String, f64>,
    pub(super) context: Vec<u8>,
    pub(super) threshold: usize,
    pub(super) quantizer: Quantizer,
    /// Words in a masked update.
    pub(super) words: usize,
    pub(super) pending: HashMap<String, pb::SecAggStep>,
}

impl SecAggPhase {
    pub(super) fn client_of(&self, participant: u32) -> Option<&str> {
        self.participant
            .iter()
            .find(|(_, p)| **p == participant)
            .map(|(c, _)| c.as_str())
    }

    /// What a training task carries for `client_id`.
    pub(super) fn spec_for(&self, client_id: &str) -> Option<pb::SecAggSpec> {
        Some(pb::SecAggSpec {
            participant: *self.participant.get(client_id)?,
            context: self.context.clone().into(),
            threshold: self.threshold as u32,
            clip: self.quantizer.clip,
            bits: self.quantizer.bits,
            weight: self.weight.get(client_id).copied().unwrap_or(1.0),
        })
    }
}

fn public_keys(a: &Advertise) -> pb::SecAggPublicKeys {
    pb::SecAggPublicKeys {
        participant: a.id,
        enc_key: a.enc_key.to_vec().into(),
        mask_key: a.mask_key.to_vec().into(),
    }
}

fn sealed_pb(s: SealedShare) -> pb::SealedShare {
    pb::SealedShare {
        from: s.from,
        to: s.to,
        ciphertext: s.ciphertext.into(),
    }
}

/// A peer's public keys, or why they are not 32-byte keys.
pub(super) fn advertise_from(p: &pb::SecAggPublicKeys) -> Result<Advertise, String> {
    let key = |b: &[u8], what: &str| {
        <[u8; 32]>::try_from(b).map_err(|_| format!("{what} is {} bytes, not 32", b.len()))
    };
    Ok(Advertise {
        id: p.participant,
        enc_key: key(&p.enc_key, "the encryption key")?,
        mask_key: key(&p.mask_key, "the masking key")?,
    })
}

pub(super) fn sealed_from(s: pb::SealedShare) -> SealedShare {
    SealedShare {
        from: s.from,
        to: s.to,
        ciphertext: s.ciphertext.to_vec(),
    }
}

pub(super) fn revealed_from(r: &pb::RevealedShare) -> Result<Revealed, String> {
    let x = u8::try_from(r.x).map_err(|_| format!("share x = {} is not a byte", r.x))?;
    let share = Share { x, y: r.y.to_vec() };
    Ok(if r.survivor {
        Revealed::SelfSeed { of: r.of, share }
    } else {
        Revealed::MaskKey { of: r.of, share }
    })
}

impl Federation {
    /// Sets up secure aggregation for training attempt `serial` among `clients` (in selection
    /// order: participant i + 1 is `clients[i]`); the weights are filled in by
    /// [`Self::weigh_participants`] under the state lock.
    pub(super) fn begin_secagg(
        &self,
        settings: &SecAggSettings,
        serial: u64,
        round: u64,
        clients: &[String],
    ) -> SecAggPhase {
        let (k, threshold) = settings.graph(clients.len());
        if clients.len() < 3 {
            warn!(
                "round {round}: secure aggregation among {} clients hides little: with one, the sum is its update; with two, each can subtract its own",
                clients.len()
            );
        }
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let mut context = format!("fedtune/{}/r{round}/s{serial}/", self.run_id).into_bytes();
        context.extend_from_slice(&nonce);
        let words = self.update_specs.iter().map(|s| s.num_elements()).sum();
        let participant: HashMap<String, u32> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i as u32 + 1))
            .collect();
        *lock(&self.secagg) = Some(SecAggSlot {
            serial,
            round: SecAggRound::new(
                context.clone(),
                participant.values().copied(),
                threshold,
                k,
                words,
            ),
        });
        SecAggPhase {
            participant,
            weight: HashMap::new(),
            context,
            threshold,
            quantizer: settings.quantizer,
            words,
            pending: HashMap::new(),
        }
    }

    /// FedAvg's weights, from the example counts clients declared when they joined: each
    /// client scales its update by n_i / max n before quantising (so the clipping range
    /// holds), and the sum is divided by the survivors' total weight.
    pub(super) fn weigh_participants(phase: &mut SecAggPhase, clients: &Clients) {
        let n = |id: &str| clients.by_id(id).map_or(1, |c| c.num_examples.max(1));
        let max = phase.participant.keys().map(|c| n(c)).max().unwrap_or(1) as f64;
        phase.weight = phase
            .participant
            .keys()
            .map(|c| (c.clone(), n(c) as f64 / max))
            .collect();
    }

    /// The secure steps after training, for attempt `serial`: returns the combined delta, or
    /// why the attempt failed. Clients that did not finish are marked failed, and only the
    /// survivors' reports are kept.
    pub(super) async fn secure_aggregate(
        &self,
        serial: u64,
        round: u64,
    ) -> Result<Option<Vec<f32>>, String> {
        let result = self.secure_steps(serial, round).await;
        *lock(&self.secagg) = None;
        let survivors = result.as_ref().ok().map(|(_, s)| s.as_slice());
        self.settle_secagg(serial, round, survivors);
        result.map(|(mean, _)| Some(mean))
    }

    /// Runs `f` on attempt `serial`'s round state (gone: the attempt is over).
    fn on_round<T>(
        &self,
        serial: u64,
        f: impl FnOnce(&mut SecAggRound) -> Result<T, SecAggRefusal>,
    ) -> Result<T, String> {
        let mut slot = lock(&self.secagg);
        match slot.as_mut().filter(|s| s.serial == serial) {
            Some(s) => f(&mut s.round).map_err(|e| e.to_string()),
            None => Err("the round's secure aggregation state is gone".into()),
        }
    }

    /// The steps after training; the weighted mean delta and who is in it.
    async fn secure_steps(&self, serial: u64, round: u64) -> Result<(Vec<f32>, Vec<u32>), String> {
        let Some(settings) = self.cfg().secure_agg.clone() else {
            return Err("secure aggregation is not configured".into());
        };

        // Step 2: sharing keys with the neighbours.
        let neighbourhood = self.on_round(serial, |r| r.close_advertise(&mut rand::rng()))?;
        info!(
            "round {round}: secure aggregation: {} clients sent keys; sharing their secrets",
            neighbourhood.len()
        );
        self.send_steps(serial, round, |p| {
            neighbourhood.get(&p).map(|ns| {
                pb::sec_agg_step::Step::ShareKeys(pb::SecAggShareKeys {
                    neighbours: ns.iter().map(public_keys).collect(),
                })
            })
        });
        self.wait_for_step(serial, round, "sharing keys", settings.step_timeout)
            .await;

        // Step 3: the masked updates.
        let mut instructions = self.on_round(serial, SecAggRound::close_share_keys)?;
        self.send_steps(serial, round, |p| {
            instructions.remove(&p).map(|m| {
                pb::sec_agg_step::Step::Mask(pb::SecAggMask {
                    inbox: m.inbox.into_iter().map(sealed_pb).collect(),
                    active: m.active,
                })
            })
        });
        self.wait_for_step(serial, round, "masked updates", settings.step_timeout)
            .await;

        // Step 4: revealing the shares that unmask the sum.
        let (survivors, dropped) = self.on_round(serial, SecAggRound::close_masked)?;
        if !dropped.is_empty() {
            warn!(
                "round {round}: secure aggregation: {} clients shared keys but sent no masked update; their masks are removed with their neighbours' shares",
                dropped.len()
            );
        }
        self.send_steps(serial, round, |p| {
            survivors.contains(&p).then(|| {
                pb::sec_agg_step::Step::Unmask(pb::SecAggUnmask {
                    survivors: survivors.clone(),
                    dropped: dropped.clone(),
                })
            })
        });
        self.wait_for_step(serial, round, "revealing shares", settings.step_timeout)
            .await;

        // The sum, unmasked off the async threads; then the weighted mean.
        let taken = lock(&self.secagg).take().filter(|s| s.serial == serial);
        let Some(SecAggSlot { round: mut r, .. }) = taken else {
            return Err("the round's secure aggregation state is gone".into());
        };
        let sum = tokio::task::spawn_blocking(move || r.finish())
            .await
            .map_err(|e| format!("unmasking failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let total_weight: f64 = {
            let st = lock(&self.state);
            match &st.phase {
                Phase::Open(open) if open.serial == serial => open
                    .secagg
                    .as_ref()
                    .map(|s| {
                        survivors
                            .iter()
                            .filter_map(|p| s.client_of(*p))
                            .map(|c| s.weight.get(c).copied().unwrap_or(1.0))
                            .sum()
                    })
                    .unwrap_or(0.0),
                _ => 0.0,
            }
        };
        if total_weight <= 0.0 {
            return Err("no weight behind the securely aggregated sum".into());
        }
        let q = settings.quantizer;
        let n = survivors.len();
        info!(
            "round {round}: secure aggregation: the sum of {n} masked updates unmasked ({} values, quantisation error at most {:.2e} per value of the mean)",
            sum.len(),
            n as f64 * q.step() / total_weight
        );
        let mean = sum
            .iter()
            .map(|&s| (q.dequantize_sum(s, n) / total_weight) as f32)
            .collect();
        Ok((mean, survivors))
    }

    /// Sends each participant of the open attempt the step `step_for` gives it (none: it has
    /// no part in this step).
    fn send_steps(
        &self,
        serial: u64,
        round: u64,
        mut step_for: impl FnMut(u32) -> Option<pb::sec_agg_step::Step>,
    ) {
        let mut st = lock(&self.state);
        let Phase::Open(open) = &mut st.phase else {
            return;
        };
        if open.serial != serial {
            return;
        }
        let tasks: HashMap<String, String> = open
            .tasks
            .iter()
            .map(|(c, t)| (c.clone(), t.task_id.clone()))
            .collect();
        let Some(s) = open.secagg.as_mut() else {
            return;
        };
        s.pending.clear();
        let participants: Vec<(String, u32)> =
            s.participant.iter().map(|(c, p)| (c.clone(), *p)).collect();
        for (client, p) in participants {
            if let (Some(step), Some(task_id)) = (step_for(p), tasks.get(&client)) {
                s.pending.insert(
                    client,
                    pb::SecAggStep {
                        task_id: task_id.clone(),
                        round,
                        step: Some(step),
                    },
                );
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Until every participant sent this step has answered, or `timeout`.
    async fn wait_for_step(&self, serial: u64, round: u64, what: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (notified, progress) = (self.changed.notified(), self.progress.notified());
            tokio::pin!(notified, progress);
            notified.as_mut().enable();
            progress.as_mut().enable();
            let waiting: Vec<String> = {
                let st = lock(&self.state);
                match &st.phase {
                    Phase::Open(open) if open.serial == serial => open
                        .secagg
                        .as_ref()
                        .map(|s| {
                            s.pending
                                .keys()
                                .map(|id| {
                                    st.clients.by_id(id).map_or(id.clone(), |c| c.name.clone())
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    _ => return,
                }
            };
            if waiting.is_empty() {
                return;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = &mut progress => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(
                        "round {round}: secure aggregation step `{what}` timed out after {}; going on without {}",
                        humantime::format_duration(timeout),
                        waiting.join(", ")
                    );
                    return;
                }
            }
        }
    }

    /// After the secure steps: a client not in the sum (every client, when the attempt
    /// failed: `survivors` is `None`) did not contribute; the reports kept are the survivors'.
    fn settle_secagg(&self, serial: u64, round: u64, survivors: Option<&[u32]>) {
        let succeeded = survivors.is_some();
        let mut st = lock(&self.state);
        let Phase::Open(open) = &mut st.phase else {
            return;
        };
        if open.serial != serial {
            return;
        }
        let Some(s) = open.secagg.as_mut() else {
            return;
        };
        s.pending.clear();
        let in_sum = |client: &str| {
            succeeded
                && s.participant
                    .get(client)
                    .is_some_and(|p| survivors.is_some_and(|v| v.contains(p)))
        };
        for (client, task) in open.tasks.iter_mut() {
            if !in_sum(client) && task.status == TaskStatus::Reported {
                task.status = TaskStatus::Failed(if succeeded {
                    "dropped out of secure aggregation before its masked update".to_string()
                } else {
                    format!("secure aggregation of round {round} failed")
                });
            }
        }
        open.reports.retain(|r| in_sum(&r.client_id));
    }

    /// Folds a masked update into the sum, exactly once. Blocking: call it from a blocking
    /// thread.
    pub fn commit_masked(
        &self,
        ticket: UploadTicket,
        payload: &Payload,
    ) -> Result<SubmitOutcome, Refusal> {
        let Some((participant, _)) = ticket.masked else {
            return Err(Refusal::Internal {
                task_id: ticket.task_id,
                reason: "a plain update reached the masked path".into(),
            });
        };
        let folded = {
            let mut slot = lock(&self.secagg);
            match slot.as_mut().filter(|s| s.serial == ticket.serial) {
                Some(s) => s.round.masked(participant, masked_words(&payload.bytes)),
                None => {
                    return Err(Refusal::AttemptClosed {
                        task_id: ticket.task_id,
                        round: ticket.round,
                    });
                }
            }
        };
        match folded {
            Ok(()) => {}
            Err(SecAggRefusal::Twice(_)) => {
                return Ok(SubmitOutcome::Duplicate {
                    round: ticket.round,
                });
            }
            Err(e) => {
                self.fail_task(ticket.serial, &ticket.client_id, &e.to_string());
                return Err(Refusal::SecAgg {
                    task_id: ticket.task_id,
                    reason: e.to_string(),
                });
            }
        }
        let clipped = ticket.metrics.get("secagg_clipped").copied().unwrap_or(0.0);
        {
            let mut st = lock(&self.state);
            let st = &mut *st;
            if let Phase::Open(open) = &mut st.phase
                && open.serial == ticket.serial
            {
                if let Some(s) = open.secagg.as_mut() {
                    s.pending.remove(&ticket.client_id);
                }
                if let Some(r) = open
                    .reports
                    .iter_mut()
                    .find(|r| r.client_id == ticket.client_id)
                {
                    r.metrics = ticket.metrics.clone();
                }
            }
            st.counted.insert(ticket.task_id.clone(), ticket.round);
        }
        if clipped > 0.0 {
            warn!(
                "round {}: {} clipped {clipped} values of its update to the quantiser's range before masking (the sum is biased where it did); raise --secagg-clip",
                ticket.round, ticket.client_name
            );
        }
        self.changed.notify_waiters();
        Ok(SubmitOutcome::Accepted)
    }

    /// Marks `client_id`'s task in attempt `serial` failed (a protocol violation).
    pub(super) fn fail_task(&self, serial: u64, client_id: &str, reason: &str) {
        let mut st = lock(&self.state);
        if let Phase::Open(open) = &mut st.phase
            && open.serial == serial
        {
            if let Some(t) = open.tasks.get_mut(client_id) {
                t.status = TaskStatus::Failed(reason.to_string());
            }
            if let Some(s) = open.secagg.as_mut() {
                s.pending.remove(client_id);
            }
        }
        drop(st);
        warn!("secure aggregation: {reason}");
        self.changed.notify_waiters();
    }
}
