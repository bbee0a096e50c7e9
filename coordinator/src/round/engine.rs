//! The round engine: runs the rounds, opens and closes phases, combines, evaluates,
//! checkpoints and logs. The only code that moves the federation from one phase to the next.

use super::phases::Closed;
use super::*;

impl Federation {
    /// Runs the rounds from `start` to the end, or until `stop` says why to stop, and returns
    /// what was written. At the end clients are told the run is over, and why; when stopped,
    /// to wait for the coordinator to come back.
    pub async fn run(
        self: Arc<Self>,
        start: Start,
        strategy: Box<dyn Strategy>,
        run_dir: RunDir,
        server_eval: Option<Arc<ServerEval>>,
        stop: impl Future<Output = String>,
    ) -> anyhow::Result<RunSummary> {
        let result = self
            .clone()
            .run_segment(start, strategy, run_dir, server_eval, stop)
            .await;
        if matches!(&result, Ok(RunSummary { stopped: true, .. })) {
            return result;
        }
        let reason = match &result {
            Ok(RunSummary {
                ended_early: Some(why),
                ..
            }) => why.clone(),
            Ok(_) => format!("all {} rounds done", self.cfg().rounds),
            Err(e) => format!("the coordinator stopped the run: {e:#}"),
        };
        self.finish(reason).await;
        result
    }

    /// Tells the clients the federation is over, and why, and waits a little for them to hear
    /// it.
    pub async fn finish(&self, reason: String) {
        lock(&self.state).enter(Phase::Finished { reason });
        self.changed.notify_waiters();
        self.wait_for_goodbyes().await;
    }

    /// [`Federation::run`] without the end: the rounds from `start` up to the settings'
    /// `rounds`, after which the clients wait for more work (a `tune` trial's rung).
    pub async fn run_segment(
        self: Arc<Self>,
        start: Start,
        strategy: Box<dyn Strategy>,
        run_dir: RunDir,
        server_eval: Option<Arc<ServerEval>>,
        stop: impl Future<Output = String>,
    ) -> anyhow::Result<RunSummary> {
        info!("strategy: {}", strategy.describe());
        let (global_path, metrics_path) = (run_dir.global_path(), run_dir.metrics_path());
        tokio::select! {
            r = self.clone().run_rounds(start, strategy, run_dir, server_eval) => r,
            why = stop => {
                // The rounds end at their next await. A checkpoint is written without one, so
                // the output folder holds the last completed round whole; the open round is
                // abandoned and runs again when the coordinator is started again.
                let reason = format!(
                    "the coordinator was stopped ({why}); it continues this run when started again"
                );
                lock(&self.state).enter(Phase::Stopping { reason });
                self.changed.notify_waiters();
                Ok(RunSummary {
                    records: Vec::new(),
                    ended_early: Some(format!("stopped by {why}")),
                    stopped: true,
                    global_path,
                    metrics_path,
                })
            }
        }
    }

    async fn run_rounds(
        self: Arc<Self>,
        start: Start,
        mut strategy: Box<dyn Strategy>,
        mut run_dir: RunDir,
        server_eval: Option<Arc<ServerEval>>,
    ) -> anyhow::Result<RunSummary> {
        // Shared with the round's broadcast (its chunks are views of it): one copy.
        let mut global = Arc::new(start.global);
        let mut records = Vec::new();
        // The broadcast of the current global model, when evaluation or a failed attempt
        // already encoded it.
        let mut encoded: Option<Arc<Broadcast>> = None;
        let mut ended_early = None;
        // The coordinator died inside this round: its journal carries it on.
        let mut reopen = self.journaled(start.round, &global)?;
        let sends_more_than_model = strategy.sends_with_model();
        'rounds: for round in start.round..=self.cfg().rounds {
            // Version v is the model after v aggregations: round r trains on version r - 1.
            let model_version = round - 1;
            let started = Instant::now();
            let mut attempt = 0;
            let (fit, combined, aggregate_ms) = loop {
                attempt += 1;
                let mut journaled = reopen.take();
                let candidates = match &journaled {
                    Some(j) => {
                        attempt = j.header.attempt;
                        Vec::new()
                    }
                    None => {
                        self.wait_for_clients(round).await?;
                        self.candidates(false)
                    }
                };
                // One count for both calls, so that the expected count m = q·N of DP and
                // the draw see the same N.
                let available = journaled
                    .as_ref()
                    .map_or(candidates.len(), |j| j.header.candidates);
                match strategy.begin_round(round, available) {
                    Ok(()) => {}
                    Err(EndRun::BudgetSpent(why)) => {
                        info!("{why}");
                        ended_early = Some(why);
                        break 'rounds;
                    }
                    Err(EndRun::Error(why)) => bail!("{why}"),
                }
                let broadcast = match encoded.take() {
                    Some(b) => b,
                    None => Arc::new(tokio::task::block_in_place(|| {
                        self.training_broadcast(strategy.as_ref(), &global, model_version)
                    })?),
                };
                let mut plan = strategy.configure_fit(round, attempt, &candidates);
                let kind = PhaseKind::Fit {
                    proximal_mu: plan.proximal_mu,
                    local_dp: plan.local_dp,
                    secure: self.cfg().secure_agg.is_some(),
                };
                let serial = match journaled.as_mut() {
                    Some(j) => {
                        // The same draw as before the restart (DP's accounting assumed it).
                        plan.clients = j.header.tasks.iter().map(|t| t.client.clone()).collect();
                        let mut aggregator = strategy.aggregator(round);
                        tokio::task::block_in_place(|| self.replay(j, aggregator.as_mut()))?;
                        self.reopen_phase(kind, j, model_version, broadcast.clone(), aggregator)
                    }
                    None => {
                        if self.cfg().secure_agg.is_none() {
                            tokio::task::block_in_place(|| {
                                self.begin_journal(
                                    kind,
                                    round,
                                    attempt,
                                    &global,
                                    candidates.len(),
                                    &plan.clients,
                                )
                            })?;
                        }
                        self.open_phase(
                            kind,
                            round,
                            attempt,
                            model_version,
                            broadcast.clone(),
                            &plan.clients,
                            // Secure aggregation: the strategy sees the unmasked sum only.
                            self.cfg()
                                .secure_agg
                                .is_none()
                                .then(|| strategy.aggregator(round)),
                        )
                    }
                };
                self.wait_for_reports(serial, round, true).await;
                let agg_started = Instant::now();
                let secure = match self.cfg().secure_agg {
                    Some(_) => Some(self.secure_aggregate(serial, round).await),
                    None => None,
                };
                let fit = self.close_phase(serial, round);
                fedtune_common::crash_point::reached("aggregate");

                // Combine (heavy: off the async threads).
                let combined: Result<Option<Vec<f32>>, String> = match secure {
                    Some(result) => result,
                    None => self.finish_aggregate(serial).await?,
                };
                let aggregate_ms = agg_started.elapsed().as_millis() as u64;
                let failure = match (&combined, self.round_failure(&plan, &fit)) {
                    (Err(e), _) if self.cfg().secure_agg.is_some() => Some(e.clone()),
                    (_, Some(why)) => Some(why),
                    (Err(e), None) => Some(e.clone()),
                    (Ok(_), None) => None,
                };
                match failure {
                    None => break (fit, combined.ok().flatten(), aggregate_ms),
                    Some(why) => {
                        let policy = &self.cfg().policy;
                        if policy.on_round_failure == OnRoundFailure::Retry
                            && attempt <= policy.round_retries
                        {
                            warn!(
                                "round {round} failed (attempt {attempt}): {why}; retrying with freshly selected clients (retry {attempt} of {})",
                                policy.round_retries
                            );
                            encoded = Some(broadcast);
                            continue;
                        }
                        let what = if policy.on_round_failure == OnRoundFailure::Retry {
                            format!("after {} retries", policy.round_retries)
                        } else {
                            "on_round_failure = stop".to_string()
                        };
                        // The round runs again from the start when the coordinator is started
                        // again: its closed journal would fail it the same way.
                        self.clear_journal();
                        bail!(
                            "round {round} failed: {why}; stopping ({what}). The output folder holds the model after round {model_version}; run the same command again to continue from there"
                        );
                    }
                }
            };

            // The server step.
            if let Some(combined) = combined {
                let (s, g) = tokio::task::spawn_blocking(move || {
                    // The round's broadcast is gone by now, so this is the only owner and
                    // the model is updated in place (a download still streaming the old
                    // version would make this a copy).
                    strategy.apply(Arc::make_mut(&mut global), &combined);
                    (strategy, global)
                })
                .await?;
                (strategy, global) = (s, g);
            }

            // Federated evaluation of the new model.
            let eval_clients = strategy.configure_evaluate(round, &self.candidates(true));
            let mut fed_eval = None;
            let mut eval_bytes_down = (0, 0);
            if !eval_clients.is_empty() {
                let broadcast = Arc::new(tokio::task::block_in_place(|| {
                    Broadcast::share(
                        &global,
                        round,
                        &self.cfg().frozen,
                        self.cfg().compression.down,
                    )
                })?);
                // Clients train on this same model next round: encode it once (unless their
                // download carries more than the model).
                if !sends_more_than_model {
                    encoded = Some(broadcast.clone());
                }
                let serial = self.open_phase(
                    PhaseKind::Evaluate,
                    round,
                    1,
                    round,
                    broadcast,
                    &eval_clients,
                    None,
                );
                self.wait_for_reports(serial, round, false).await;
                let closed = self.close_phase(serial, round);
                eval_bytes_down = (
                    closed.stats.bytes_down.load(Ordering::Relaxed),
                    closed.stats.fp32_down.load(Ordering::Relaxed),
                );
                let reports: Vec<EvalReport> = closed
                    .reports
                    .into_iter()
                    .map(ClientReport::into_eval)
                    .collect();
                fed_eval = Some(strategy.aggregate_evaluate(&reports));
            }

            // Server-side evaluation.
            let eval_started = Instant::now();
            let mut record = RoundRecord {
                round,
                rounds: self.cfg().rounds,
                attempt,
                model_version: model_version + 1,
                clients_selected: fit.selected,
                clients_reported: fit.reports.len(),
                clients_failed: fit.selected - fit.reports.len(),
                contributors: fit.reports.iter().map(ClientReport::contributors).sum(),
                train_loss: weighted_mean(&fit.reports, "train_loss", |r| r.num_examples as f64),
                eval_source: "clients",
                eval_loss: None,
                eval_accuracy: None,
                eval_precision: None,
                eval_recall: None,
                eval_f1: None,
                eval_examples: 0,
                eval_per_class_f1: None,
                eval_confusion: None,
                fed_eval_clients: 0,
                fed_eval_examples: 0,
                fed_eval_loss: None,
                fed_eval_accuracy: None,
                fed_eval_precision: None,
                fed_eval_recall: None,
                fed_eval_f1: None,
                fed_eval_personal_loss: None,
                fed_eval_personal_accuracy: None,
                fed_eval_personal_f1: None,
                bytes_down: fit.stats.bytes_down.load(Ordering::Relaxed) + eval_bytes_down.0,
                bytes_up: fit.stats.bytes_up.load(Ordering::Relaxed),
                bytes_down_fp32: fit.stats.fp32_down.load(Ordering::Relaxed) + eval_bytes_down.1,
                bytes_up_fp32: fit.stats.fp32_up.load(Ordering::Relaxed),
                compress_down: self.cfg().compression.down.to_string(),
                compress_up: self.cfg().compression.up.to_string(),
                bytes_up_full: self
                    .specs
                    .iter()
                    .map(|t| t.num_elements() as u64 * 4)
                    .sum::<u64>()
                    * fit.reports.len() as u64,
                aggregate_ms,
                eval_ms: 0,
                round_ms: 0,
                clients: fit.outcomes.clone(),
                privacy: strategy.privacy(),
            };
            if let Some(f) = fed_eval {
                record.set_fed_eval(&f);
            }
            match &server_eval {
                Some(eval) => {
                    let (eval, g) = (eval.clone(), global.clone());
                    let e = tokio::task::spawn_blocking(move || eval.evaluate(&g))
                        .await?
                        .context("server-side evaluation failed")?;
                    let m = e.metrics();
                    record.eval_source = "server";
                    record.eval_loss = Some(e.loss).filter(|v| v.is_finite());
                    record.eval_accuracy = Some(m.accuracy);
                    record.eval_precision = Some(m.precision);
                    record.eval_recall = Some(m.recall);
                    record.eval_f1 = Some(m.f1);
                    record.eval_examples = m.examples;
                    record.eval_per_class_f1 = Some(e.confusion.per_class_f1());
                    record.eval_confusion = Some(e.confusion.rows());
                }
                None => {
                    let by_val =
                        |r: &ClientReport| r.metrics.get("val_examples").copied().unwrap_or(0.0);
                    record.eval_loss = weighted_mean(&fit.reports, "val_loss", by_val);
                    record.eval_accuracy = weighted_mean(&fit.reports, "val_accuracy", by_val);
                    record.eval_precision = weighted_mean(&fit.reports, "val_precision", by_val);
                    record.eval_recall = weighted_mean(&fit.reports, "val_recall", by_val);
                    record.eval_f1 = weighted_mean(&fit.reports, "val_f1", by_val);
                    record.eval_examples = fit.reports.iter().map(by_val).sum::<f64>() as u64;
                }
            }
            record.eval_ms = eval_started.elapsed().as_millis() as u64;
            record.round_ms = started.elapsed().as_millis() as u64;

            // Checkpoint, then tell the world.
            let state = strategy
                .state()
                .context("cannot collect the strategy's server state")?;
            run_dir.checkpoint(&global, &self.cfg().model, &record, state.as_ref())?;
            // The checkpoint holds the round now.
            self.clear_journal();
            record.log(
                self.cfg().log_format,
                self.cfg().security == crate::config::Security::Insecure,
            );
            self.metrics.round_completed(&record);
            records.push(record);
        }
        Ok(RunSummary {
            records,
            ended_early,
            stopped: false,
            global_path: run_dir.global_path(),
            metrics_path: run_dir.metrics_path(),
        })
    }

    /// What a training task downloads: the global model, and what the strategy sends with it
    /// (SCAFFOLD's server variate).
    fn training_broadcast(
        &self,
        strategy: &dyn Strategy,
        global: &Arc<TensorSet>,
        version: u64,
    ) -> anyhow::Result<Broadcast> {
        let (frozen, codec) = (&self.cfg().frozen, self.cfg().compression.down);
        match strategy.sent_with_model()? {
            None => Broadcast::share(global, version, frozen, codec),
            Some(extra) => {
                let mut tensors = global.tensors().to_vec();
                tensors.extend(extra.into_tensors());
                Broadcast::share(&Arc::new(TensorSet::new(tensors)?), version, frozen, codec)
            }
        }
    }

    /// Takes phase `serial`'s aggregator (waiting for an update being folded in) and combines
    /// it off the async threads: the combined delta, `None` when nothing was accepted, or why
    /// it could not be combined.
    pub(super) async fn finish_aggregate(
        &self,
        serial: u64,
    ) -> anyhow::Result<Result<Option<Vec<f32>>, String>> {
        let aggregate = lock(&self.aggregate).take().filter(|a| a.serial == serial);
        Ok(tokio::task::spawn_blocking(move || match aggregate {
            Some(RoundAggregate { error: Some(e), .. }) => Err(e),
            Some(a) => a.aggregator.finish(),
            None => Ok(None),
        })
        .await?
        .map_err(|e| e.to_string()))
    }

    pub(super) fn clear_journal(&self) {
        if let Some(j) = &self.journal
            && let Err(e) = j.clear()
        {
            warn!("{e:#}");
        }
    }

    /// Why a closed training attempt cannot be aggregated, if it cannot.
    pub(super) fn round_failure(&self, plan: &FitPlan, fit: &Closed) -> Option<String> {
        if plan.count_whatever_arrives {
            return None;
        }
        let min = self.cfg().strategy.min_fit_clients;
        let got = fit.reports.len();
        if got < min {
            return Some(format!(
                "{got} of {} selected clients sent an update, fewer than min_fit_clients = {min}",
                plan.clients.len()
            ));
        }
        let failed = fit.selected - got;
        if failed > 0 && !self.cfg().policy.accept_failures {
            return Some(format!(
                "{failed} of {} selected clients failed and accept_failures is false",
                plan.clients.len()
            ));
        }
        None
    }

    /// The live clients, with how often each was selected for training (or evaluation).
    pub(super) fn candidates(&self, evaluation: bool) -> Vec<Candidate> {
        let st = lock(&self.state);
        st.clients
            .live(LIVENESS_TIMEOUT)
            .iter()
            .map(|c| Candidate {
                id: c.id.clone(),
                times_selected: if evaluation {
                    c.times_evaluated
                } else {
                    c.times_trained
                },
            })
            .collect()
    }
}

fn weighted_mean(
    reports: &[ClientReport],
    key: &str,
    weight: impl Fn(&ClientReport) -> f64,
) -> Option<f64> {
    let (mut sum, mut total) = (0.0, 0.0);
    for r in reports {
        if let Some(v) = r.metrics.get(key) {
            let w = weight(r);
            sum += w * v;
            total += w;
        }
    }
    (total > 0.0).then(|| sum / total)
}
