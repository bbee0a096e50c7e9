//! What clients ask of the federation, through the service: join, heartbeat, the next task,
//! the model and evaluation reports (uploads: `uploads.rs`). These only read the open phase and
//! record what clients did; the engine (`engine.rs`) decides when phases open and close.

use prost::Message as _;

use super::*;

impl Federation {
    pub fn join(&self, req: &pb::JoinRequest) -> Result<pb::JoinReply, Refusal> {
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Refusal::ProtocolMismatch {
                client: req.protocol_version,
                server: PROTOCOL_VERSION,
            });
        }
        if req.aggregator
            && let Some(why) = self.why_no_aggregators()
        {
            warn!("refused aggregator `{}`: {why}", req.name);
            return Err(Refusal::NoAggregators(format!(
                "{} cannot join as a tiered aggregator: {why}",
                req.name
            )));
        }
        let mut st = lock(&self.state);
        let live = st.clients.live_count(LIVENESS_TIMEOUT);
        let max = self.cfg().limits.max_clients;
        if live >= max {
            warn!(
                "refused client `{}`: {live} live clients, at most {max} (--max-clients)",
                req.name
            );
            return Err(Refusal::Full { live, max });
        }
        let (id, token) = st.clients.join(&req.name, &req.device, req.num_examples);
        let name = st.clients.by_id(&id).map_or(id.clone(), |c| c.name.clone());
        let given_back = Self::give_back_task(&mut st, &id, &name);
        drop(st);
        info!(
            "client joined: {} ({}) on {} with {} examples",
            req.name, id, req.device, req.num_examples
        );
        if let Some(said) = given_back {
            info!("{said}");
        }
        self.metrics.joined();
        self.progress.notify_waiters();
        Ok(pb::JoinReply {
            protocol_version: PROTOCOL_VERSION,
            client_id: id,
            session_token: token,
            run_id: self.run_id.clone(),
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
        })
    }

    /// Why this run cannot take pre-aggregated updates from tiered aggregators, if it cannot:
    /// a mean of means equals the mean of all updates only for rules that combine linearly,
    /// and only where each update is not meant to be seen (masked, clipped) on its own.
    fn why_no_aggregators(&self) -> Option<String> {
        let strategy = self.cfg().strategy_name();
        if let Some(why) = self.cfg().strategy.kind.why_not_a_sum() {
            return Some(format!(
                "this coordinator's strategy `{strategy}`: {why}, which a pre-aggregated update hides; run the aggregators' clients against this coordinator directly, or use a linear strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad)"
            ));
        }
        if self.cfg().secure_agg.is_some() {
            return Some("this coordinator runs secure aggregation, which masks each client's update; an aggregator would have to see its clients' updates in the clear".into());
        }
        if let Some(dp) = &self.cfg().privacy
            && dp.mode == crate::strategy::dp::DpMode::Central
        {
            return Some("this coordinator runs central differential privacy, whose accounting clips and samples each client's update; a pre-aggregated update would change what is protected (local DP, --dp local, works with aggregators)".into());
        }
        if let fedtune_common::codec::Codec::TopK(_) = self.cfg().compression.up {
            return Some(format!(
                "updates travel as `{}`, whose error feedback is per client; use fp16, bf16 or int8 with aggregators",
                self.cfg().compression.up
            ));
        }
        None
    }

    /// The operator removed the client of `token` (allow-list): its session ends, and its
    /// task in the open round fails now, so the round goes on without waiting for it.
    pub fn revoke(&self, token: &str, reason: &str) {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let Some(id) = st.clients.revoke(token) else {
            return;
        };
        let name = st.clients.by_id(&id).map_or(id.clone(), |c| c.name.clone());
        warn!("ended the session of {name}: {reason}");
        if let Phase::Open(open) = &mut st.phase
            && let Some(task) = open.tasks.get_mut(&id)
            && task.status == TaskStatus::Assigned
        {
            task.status = TaskStatus::Failed(reason.to_string());
        }
        self.progress.notify_waiters();
    }

    /// The client is alive; while it trains, it says how far (shown by `status`).
    pub fn heartbeat(
        &self,
        token: &str,
        training: Option<&pb::TrainingProgress>,
    ) -> Result<(), Refusal> {
        let mut st = lock(&self.state);
        let client = st.clients.touch(token).ok_or(Refusal::UnknownSession)?;
        if let Some(t) = training {
            client.training = Some(TrainingProgress {
                task_id: t.task_id.clone(),
                epoch: t.epoch,
                epochs: t.epochs,
                loss: t.loss.filter(|l| l.is_finite()),
            });
        }
        Ok(())
    }

    /// Long-poll: returns a task as soon as there is one for this client, or Wait after
    /// [`LONG_POLL`].
    pub async fn next_task(&self, token: &str) -> Result<pb::Task, Refusal> {
        use pb::task::Kind;
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let reason = {
                let mut st = lock(&self.state);
                let needed = self.needed_clients();
                let st = &mut *st;
                let client = st.clients.touch(token).ok_or(Refusal::UnknownSession)?;
                let client_id = client.id.clone();
                match &st.phase {
                    Phase::Finished { reason } => {
                        client.told_finished = true;
                        return Ok(pb::Task {
                            kind: Some(Kind::Finished(pb::Finished {
                                reason: reason.clone(),
                            })),
                        });
                    }
                    Phase::Open(open) => match open.tasks.get(&client_id) {
                        Some(t) if t.status == TaskStatus::Assigned => {
                            return Ok(pb::Task {
                                kind: Some(self.task_message(open, &client_id, &t.task_id)),
                            });
                        }
                        Some(_)
                            if let Some(step) =
                                open.secagg.as_ref().and_then(|s| s.pending.get(&client_id)) =>
                        {
                            open.stats.count_bytes_down(step.encoded_len() as u64);
                            return Ok(pb::Task {
                                kind: Some(Kind::Secagg(step.clone())),
                            });
                        }
                        Some(_) => format!(
                            "round {} in progress; waiting for the other clients",
                            open.round
                        ),
                        None => format!(
                            "round {} in progress without you (not selected this time)",
                            open.round
                        ),
                    },
                    Phase::Closing { round } => format!("aggregating round {round}"),
                    Phase::Stopping { reason } => reason.clone(),
                    Phase::Waiting { round } => {
                        let live = st.clients.live_count(LIVENESS_TIMEOUT);
                        format!("waiting for clients before round {round}: {live}/{needed} live")
                    }
                }
            };
            tokio::select! {
                _ = &mut notified => continue,
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(pb::Task { kind: Some(Kind::Wait(pb::Wait { retry_after_ms: 100, reason })) });
                }
            }
        }
    }

    fn task_message(&self, open: &OpenPhase, client_id: &str, task_id: &str) -> pb::task::Kind {
        use pb::task::Kind;
        match open.kind {
            PhaseKind::Fit {
                proximal_mu,
                local_dp,
                ..
            } => Kind::Train(pb::TrainTask {
                secagg: open.secagg.as_ref().and_then(|s| s.spec_for(client_id)),
                round: open.round,
                task_id: task_id.to_string(),
                model_version: open.model_version,
                model: Some(self.model_spec_pb()),
                // A tiered aggregator hands on its parent's recipe.
                config: Some(match lock(&self.relayed).as_deref() {
                    Some(relayed) => relayed.clone(),
                    None => self.train_config(open, proximal_mu, local_dp),
                }),
                upload: self.cfg().compression.up.to_proto(),
            }),
            PhaseKind::Evaluate => Kind::Evaluate(pb::EvaluateTask {
                round: open.round,
                task_id: task_id.to_string(),
                model_version: open.model_version,
                model: Some(self.model_spec_pb()),
                batch_size: EVAL_BATCH,
                ..self.personalization(open)
            }),
        }
    }

    /// What an evaluation task asks beyond evaluating: personalisation, this coordinator's
    /// own or (a tiered aggregator) its parent's.
    fn personalization(&self, open: &OpenPhase) -> pb::EvaluateTask {
        if let Some(p) = lock(&self.relayed_personalize).as_ref() {
            return pb::EvaluateTask {
                personalize_steps: p.steps,
                personalize: Some(p.config.clone()),
                personal_model: p.personal_model.clone(),
                ..Default::default()
            };
        }
        let cfg = self.cfg();
        let steps = cfg.personalize_steps;
        pb::EvaluateTask {
            personalize_steps: steps,
            // Local fine-tuning without noise or control variate; Ditto's pull towards the
            // global model is a proximal term.
            personalize: (steps > 0).then(|| pb::TrainConfig {
                control_variate: String::new(),
                ..self.train_config(open, cfg.ditto_lambda, None)
            }),
            personal_model: if steps > 0 && cfg.ditto_lambda > 0.0 {
                self.run_key()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    /// This coordinator's local recipe for a training task of `open`.
    fn train_config(
        &self,
        open: &OpenPhase,
        proximal_mu: f64,
        local_dp: Option<LocalDp>,
    ) -> pb::TrainConfig {
        // One read of the settings: a task never mixes two runs' values.
        let cfg = self.cfg();
        pb::TrainConfig {
            local_epochs: cfg.local_epochs,
            batch_size: cfg.batch_size,
            // Server-side decay of the clients' learning rate across rounds.
            lr: cfg.lr * cfg.lr_round_decay.powi(open.round as i32 - 1),
            optimizer: cfg.optimizer.kind.to_string(),
            momentum: cfg.optimizer.momentum,
            nesterov: cfg.optimizer.nesterov,
            weight_decay: cfg.optimizer.weight_decay,
            lr_schedule: cfg.lr_schedule.to_string(),
            warmup_steps: cfg.warmup_steps,
            clip_norm: cfg.clip_norm,
            dropout: cfg.dropout,
            frozen: cfg.frozen.clone(),
            augment: Some(pb::Augmentation {
                crop_padding: cfg.augment.crop_padding as u32,
                flip: cfg.augment.flip,
                noise_std: f64::from(cfg.augment.noise_std),
            }),
            early_stopping_patience: cfg.early_stopping_patience,
            seed: cfg
                .seed
                .wrapping_add(open.round)
                .wrapping_add(u64::from(open.attempt - 1) << 32),
            proximal_mu,
            dp_clip_norm: local_dp.map_or(0.0, |d| d.clip),
            dp_noise_stddev: local_dp.map_or(0.0, |d| d.noise_stddev),
            control_variate: if cfg.strategy.kind == crate::strategy::StrategyKind::Scaffold {
                self.run_key()
            } else {
                String::new()
            },
        }
    }

    /// Finds the task `task_id` of the client holding `token`; checks it is this client's.
    pub(super) fn task_of(
        st: &mut State,
        token: &str,
        task_id: &str,
    ) -> Result<(Issued, String), Refusal> {
        let client = st.clients.touch(token).ok_or(Refusal::UnknownSession)?;
        let (client_id, client_name) = (client.id.clone(), client.name.clone());
        let issued = match st.issued.get(task_id) {
            Some(issued) => issued.clone(),
            None if st.opening => return Err(Refusal::Opening(task_id.to_string())),
            None => return Err(Refusal::UnknownTask(task_id.to_string())),
        };
        if issued.client_id == client_id {
            return Ok((issued, client_name));
        }
        // A task of an attempt opened again after a restart, which closed before its client
        // joined again: still that client's (by name), so a re-sent update is recognised.
        if issued.client_id == super::reopen::placeholder(&client_name)
            && let Some(i) = st.issued.get_mut(task_id)
        {
            i.client_id = client_id.clone();
            return Ok((i.clone(), client_name));
        }
        Err(Refusal::NotYourTask {
            task_id: task_id.to_string(),
        })
    }

    /// The open phase `issued` belongs to, or why it is over.
    /// The open phase with `serial` (a task's round `round`), or why it is over.
    pub(super) fn open_for<'a>(
        phase: &'a mut Phase,
        current_round: u64,
        (serial, round): (u64, u64),
        task_id: &str,
    ) -> Result<&'a mut OpenPhase, Refusal> {
        match phase {
            Phase::Open(open) if open.serial == serial => Ok(open),
            // Not late: the attempt runs again when the coordinator is back.
            Phase::Stopping { .. } => Err(Refusal::Stopping),
            _ if round == current_round => Err(Refusal::AttemptClosed {
                task_id: task_id.to_string(),
                round,
            }),
            _ => Err(Refusal::RoundClosed {
                task_id: task_id.to_string(),
                task_round: round,
                current: current_round,
            }),
        }
    }

    /// The broadcast a client must download for `task_id` (without the frozen tensors when it
    /// holds them, by `frozen_hash`), and the round's byte counters.
    pub fn model_for(
        &self,
        token: &str,
        task_id: &str,
        frozen_hash: u64,
    ) -> Result<Download, Refusal> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let (issued, _) = Self::task_of(st, token, task_id)?;
        let open = Self::open_for(&mut st.phase, st.current_round, issued.key(), task_id)?;
        let encoded = open.broadcast.for_client(frozen_hash);
        let progress = Transfer::new(task_id, encoded.manifest.total_bytes);
        let stats = open.stats.clone();
        if let Some(c) = st.clients.by_id_mut(&issued.client_id) {
            c.download = Some(progress.clone());
        }
        Ok(Download {
            encoded,
            stats,
            progress,
        })
    }

    /// Records a client's evaluation of the global model.
    /// The client holding `task_id` cannot complete it (`reason`, a peer's words: cut to 500
    /// characters, control characters dropped): the task fails now, so the round need not
    /// wait for its deadline.
    pub fn decline_task(
        &self,
        token: &str,
        task_id: &str,
        reason: &str,
    ) -> Result<SubmitOutcome, Refusal> {
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(500)
            .collect();
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let (issued, client_name) = Self::task_of(st, token, task_id)?;
        if st.counted.contains_key(task_id) {
            return Err(Refusal::WrongKind {
                task_id: task_id.to_string(),
                is: "counted already",
                hint: "a counted task cannot be declined",
            });
        }
        let open = Self::open_for(&mut st.phase, st.current_round, issued.key(), task_id)?;
        let Some(task) = open.tasks.get_mut(&issued.client_id) else {
            return Err(Refusal::UnknownTask(task_id.to_string()));
        };
        match &task.status {
            TaskStatus::Assigned => {}
            TaskStatus::Uploading => return Err(Refusal::UploadInProgress(task_id.to_string())),
            TaskStatus::Failed(reason) => {
                return Err(Refusal::TaskFailed {
                    task_id: task_id.to_string(),
                    reason: reason.clone(),
                });
            }
            TaskStatus::Reported => {
                return Err(Refusal::WrongKind {
                    task_id: task_id.to_string(),
                    is: "reported already",
                    hint: "a reported task cannot be declined",
                });
            }
        }
        warn!("{client_name} declined task `{task_id}`: {reason}");
        task.status = TaskStatus::Failed(format!("declined: {reason}"));
        drop(guard);
        self.progress.notify_waiters();
        Ok(SubmitOutcome::Accepted)
    }

    pub fn evaluation_report(
        &self,
        token: &str,
        report: &pb::EvaluationReport,
    ) -> Result<SubmitOutcome, Refusal> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let task_id = report.task_id.clone();
        let (issued, client_name) = Self::task_of(st, token, &task_id)?;
        if issued.kind != PhaseKind::Evaluate {
            return Err(Refusal::WrongKind {
                task_id,
                is: issued.kind.noun(),
                hint: "send its result with SubmitUpdate",
            });
        }
        if let Some(&round) = st.counted.get(&task_id) {
            return Ok(SubmitOutcome::Duplicate { round });
        }
        let open = match Self::open_for(&mut st.phase, st.current_round, issued.key(), &task_id) {
            Ok(open) => open,
            Err(refusal) => {
                warn!("late evaluation from {client_name}: {refusal}");
                return Err(refusal);
            }
        };
        let Some(task) = open.tasks.get_mut(&issued.client_id) else {
            return Err(Refusal::UnknownTask(task_id));
        };
        if let Some((k, v)) = report.metrics.iter().find(|(_, v)| !v.is_finite()) {
            let reason = format!("metric `{k}` is not finite ({v})");
            task.status = TaskStatus::Failed(reason.clone());
            return Err(Refusal::InvalidUpdate { task_id, reason });
        }
        match &task.status {
            TaskStatus::Failed(reason) => {
                return Err(Refusal::TaskFailed {
                    task_id,
                    reason: reason.clone(),
                });
            }
            TaskStatus::Reported => {
                return Ok(SubmitOutcome::Duplicate {
                    round: issued.round,
                });
            }
            TaskStatus::Assigned | TaskStatus::Uploading => task.status = TaskStatus::Reported,
        }
        open.reports.push(ClientReport {
            client_id: issued.client_id.clone(),
            num_examples: report.num_examples,
            metrics: report.metrics.clone(),
        });
        st.counted.insert(task_id, issued.round);
        drop(guard);
        self.progress.notify_waiters();
        Ok(SubmitOutcome::Accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (State, String) {
        let mut st = State::new();
        let (_, token) = st.clients.join("a", "cpu", 10);
        (st, token)
    }

    #[test]
    fn an_unknown_task_before_the_first_phase_is_asked_to_retry() {
        let (mut st, token) = state();
        let refusal = Federation::task_of(&mut st, &token, "r1-c1").err();
        assert!(
            matches!(&refusal, Some(Refusal::Opening(id)) if id == "r1-c1"),
            "{refusal:?}"
        );
        assert_eq!(
            tonic::Status::from(refusal.unwrap_or(Refusal::Stopping)).code(),
            tonic::Code::Unavailable,
            "clients keep their update on UNAVAILABLE"
        );
    }

    #[test]
    fn an_unknown_task_once_a_phase_is_open_is_refused_for_good() {
        let (mut st, token) = state();
        st.enter(Phase::Waiting { round: 1 });
        let refusal = Federation::task_of(&mut st, &token, "r1-c1").err();
        assert!(
            matches!(&refusal, Some(Refusal::UnknownTask(id)) if id == "r1-c1"),
            "{refusal:?}"
        );
    }
}
