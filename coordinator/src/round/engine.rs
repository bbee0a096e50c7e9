//! The round engine: runs the rounds, opens and closes phases, combines, evaluates,
//! checkpoints and logs. The only code that moves the federation from one phase to the next.

use super::*;

impl Federation {
    /// Runs the rounds from `start` to the end and returns what was written. On every exit,
    /// clients are told the run is over, and why.
    pub async fn run(
        self: Arc<Self>,
        start: Start,
        strategy: Box<dyn Strategy>,
        run_dir: RunDir,
        server_eval: Option<Arc<ServerEval>>,
    ) -> anyhow::Result<RunSummary> {
        info!("strategy: {}", strategy.describe());
        let result = self
            .clone()
            .run_rounds(start, strategy, run_dir, server_eval)
            .await;
        let reason = match &result {
            Ok(_) => format!("all {} rounds done", self.cfg.rounds),
            Err(e) => format!("the coordinator stopped the run: {e:#}"),
        };
        lock(&self.state).phase = Phase::Finished { reason };
        self.changed.notify_waiters();
        self.wait_for_goodbyes().await;
        result
    }

    async fn run_rounds(
        self: Arc<Self>,
        start: Start,
        mut strategy: Box<dyn Strategy>,
        mut run_dir: RunDir,
        server_eval: Option<Arc<ServerEval>>,
    ) -> anyhow::Result<RunSummary> {
        let mut global = start.global;
        let mut records = Vec::new();
        // The broadcast of the current global model, when evaluation or a failed attempt
        // already encoded it.
        let mut encoded: Option<Arc<Broadcast>> = None;
        for round in start.round..=self.cfg.rounds {
            // Version v is the model after v aggregations: round r trains on version r - 1.
            let model_version = round - 1;
            let started = Instant::now();
            let mut attempt = 0;
            let (fit, combined, aggregate_ms) = loop {
                attempt += 1;
                self.wait_for_clients(round).await?;
                let broadcast = match encoded.take() {
                    Some(b) => b,
                    None => Arc::new(tokio::task::block_in_place(|| {
                        Broadcast::encode(&global, model_version, &self.cfg.frozen)
                    })?),
                };
                let plan = strategy.configure_fit(round, attempt, &self.candidates(false));
                let serial = self.open_phase(
                    PhaseKind::Fit {
                        proximal_mu: plan.proximal_mu,
                    },
                    round,
                    attempt,
                    model_version,
                    broadcast.clone(),
                    &plan.clients,
                    Some(strategy.aggregator(round)),
                );
                self.wait_for_reports(serial, round, true).await;
                let fit = self.close_phase(serial, round);

                // Combine (heavy: off the async threads).
                let agg_started = Instant::now();
                let aggregate = lock(&self.aggregate).take().filter(|a| a.serial == serial);
                let combined = tokio::task::spawn_blocking(move || match aggregate {
                    Some(RoundAggregate { error: Some(e), .. }) => Err(e),
                    Some(a) => a.aggregator.finish(),
                    None => Ok(None),
                })
                .await?;
                let aggregate_ms = agg_started.elapsed().as_millis() as u64;
                let failure = match (&combined, self.round_failure(&plan, &fit)) {
                    (_, Some(why)) => Some(why),
                    (Err(e), None) => Some(e.to_string()),
                    (Ok(_), None) => None,
                };
                match failure {
                    None => break (fit, combined.ok().flatten(), aggregate_ms),
                    Some(why) => {
                        let policy = &self.cfg.policy;
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
                        bail!(
                            "round {round} failed: {why}; stopping ({what}). The output folder holds the model after round {model_version}; run again with --resume to continue from there"
                        );
                    }
                }
            };

            // The server step.
            if let Some(combined) = combined {
                let (s, g) = tokio::task::spawn_blocking(move || {
                    strategy.apply(&mut global, &combined);
                    (strategy, global)
                })
                .await?;
                (strategy, global) = (s, g);
            }

            // Federated evaluation of the new model.
            let eval_clients = strategy.configure_evaluate(round, &self.candidates(true));
            let mut fed_eval = None;
            let mut eval_bytes_down = 0;
            if !eval_clients.is_empty() {
                let broadcast = Arc::new(tokio::task::block_in_place(|| {
                    Broadcast::encode(&global, round, &self.cfg.frozen)
                })?);
                // Clients train on this same model next round: encode it once.
                encoded = Some(broadcast.clone());
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
                eval_bytes_down = closed.stats.bytes_down.load(Ordering::Relaxed);
                let reports: Vec<EvalReport> = closed
                    .reports
                    .into_iter()
                    .map(|r| EvalReport {
                        num_examples: r.num_examples,
                        metrics: r.metrics,
                    })
                    .collect();
                fed_eval = Some(strategy.aggregate_evaluate(&reports));
            }

            // Server-side evaluation.
            let eval_started = Instant::now();
            let mut record = RoundRecord {
                round,
                rounds: self.cfg.rounds,
                attempt,
                model_version: model_version + 1,
                clients_selected: fit.selected,
                clients_reported: fit.reports.len(),
                clients_failed: fit.selected - fit.reports.len(),
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
                bytes_down: fit.stats.bytes_down.load(Ordering::Relaxed) + eval_bytes_down,
                bytes_up: fit.stats.bytes_up.load(Ordering::Relaxed),
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
            run_dir.checkpoint(&global, &self.cfg.model, &record, state.as_ref())?;
            record.log(
                self.cfg.log_format,
                self.cfg.security == crate::config::Security::Insecure,
            );
            records.push(record);
        }
        Ok(RunSummary {
            records,
            global_path: run_dir.global_path(),
            metrics_path: run_dir.metrics_path(),
        })
    }

    /// Why a closed training attempt cannot be aggregated, if it cannot.
    fn round_failure(&self, plan: &FitPlan, fit: &Closed) -> Option<String> {
        let min = self.cfg.strategy.min_fit_clients;
        let got = fit.reports.len();
        if got < min {
            return Some(format!(
                "{got} of {} selected clients sent an update, fewer than min_fit_clients = {min}",
                plan.clients.len()
            ));
        }
        let failed = fit.selected - got;
        if failed > 0 && !self.cfg.policy.accept_failures {
            return Some(format!(
                "{failed} of {} selected clients failed and accept_failures is false",
                plan.clients.len()
            ));
        }
        None
    }

    /// The live clients, with how often each was selected for training (or evaluation).
    fn candidates(&self, evaluation: bool) -> Vec<Candidate> {
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

    /// Waits until enough clients are live, logging the wait; gives up after
    /// `available_timeout` with an error that says what to do.
    async fn wait_for_clients(&self, round: u64) -> anyhow::Result<()> {
        let needed = self.needed_clients();
        let timeout = self.cfg.policy.available_timeout;
        let give_up = Instant::now() + timeout;
        let mut last_log = Instant::now() - WAIT_LOG_EVERY;
        {
            let mut st = lock(&self.state);
            if !matches!(st.phase, Phase::Open(_)) {
                st.phase = Phase::Waiting { round };
            }
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let names: Vec<String> = {
                let st = lock(&self.state);
                st.clients
                    .live(LIVENESS_TIMEOUT)
                    .iter()
                    .map(|c| c.name.clone())
                    .collect()
            };
            let live = names.len();
            if live >= needed {
                return Ok(());
            }
            if Instant::now() >= give_up {
                bail!(
                    "only {live} of the {needed} clients needed for round {round} were live after waiting {}; start more clients, lower --min-available-clients / --min-fit-clients, or wait longer with --available-timeout",
                    humantime::format_duration(timeout)
                );
            }
            if last_log.elapsed() >= WAIT_LOG_EVERY {
                info!(
                    "waiting for clients before round {round}: {live}/{needed} live{}; waiting for {} more (gives up in {}s)",
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", names.join(", "))
                    },
                    needed - live,
                    give_up.saturating_duration_since(Instant::now()).as_secs()
                );
                last_log = Instant::now();
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Issues tasks to `clients` and opens a phase. Returns its serial number.
    #[allow(clippy::too_many_arguments)]
    fn open_phase(
        &self,
        kind: PhaseKind,
        round: u64,
        attempt: u32,
        model_version: u64,
        broadcast: Arc<Broadcast>,
        clients: &[String],
        aggregator: Option<Box<dyn Aggregator>>,
    ) -> u64 {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let bytes = broadcast.full_bytes();
        if let Some(aggregator) = aggregator {
            // Installed before `state` is locked (lock order: `aggregate` is never taken while
            // `state` is held). Nothing is folded into it before the phase below opens.
            *lock(&self.aggregate) = Some(RoundAggregate {
                serial,
                aggregator,
                error: None,
            });
        }
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut tasks = HashMap::new();
        let mut names = Vec::new();
        for id in clients {
            let task_id = match (kind, attempt) {
                (PhaseKind::Evaluate, _) => format!("e{round}-{id}"),
                (_, 1) => format!("r{round}-{id}"),
                _ => format!("r{round}.{attempt}-{id}"),
            };
            if let Some(c) = st.clients.by_id_mut(id) {
                match kind {
                    PhaseKind::Evaluate => c.times_evaluated += 1,
                    PhaseKind::Fit { .. } => c.times_trained += 1,
                }
                names.push(c.name.clone());
            }
            st.issued.insert(
                task_id.clone(),
                Issued {
                    serial,
                    kind,
                    round,
                    client_id: id.clone(),
                },
            );
            tasks.insert(
                id.clone(),
                TaskState {
                    task_id,
                    status: TaskStatus::Assigned,
                },
            );
        }
        st.current_round = round;
        st.phase = Phase::Open(OpenPhase {
            serial,
            kind,
            round,
            attempt,
            model_version,
            broadcast,
            tasks,
            reports: Vec::new(),
            stats: Arc::new(RoundStats::default()),
        });
        let live = st.clients.live(LIVENESS_TIMEOUT).len();
        drop(guard);
        match kind {
            PhaseKind::Fit { .. } => info!(
                "round {round}/{}{} started: {} of {live} live clients selected ({}), model v{model_version}, broadcast {}",
                self.cfg.rounds,
                if attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                },
                clients.len(),
                names.join(", "),
                human_bytes(bytes)
            ),
            PhaseKind::Evaluate => info!(
                "round {round}/{}: federated evaluation of model v{model_version} by {} of {live} live clients ({})",
                self.cfg.rounds,
                clients.len(),
                names.join(", ")
            ),
        }
        self.changed.notify_waiters();
        serial
    }

    /// Until every selected client reported or failed, the round deadline, or (training, with
    /// `grace_period`) the grace period after `min_fit_clients` reported. Clients silent for
    /// longer than [`LIVENESS_TIMEOUT`] (no heartbeat, no call) are marked failed.
    async fn wait_for_reports(&self, serial: u64, round: u64, training: bool) {
        let policy = &self.cfg.policy;
        let mut deadline = tokio::time::Instant::now() + policy.round_timeout;
        let mut grace_started = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&self.state);
                let st = &mut *st;
                let Phase::Open(open) = &mut st.phase else {
                    return;
                };
                if open.serial != serial {
                    return;
                }
                for (id, task) in open.tasks.iter_mut() {
                    if task.status == TaskStatus::Assigned
                        && let Some(c) = st.clients.by_id(id)
                        && c.last_seen.elapsed() > LIVENESS_TIMEOUT
                    {
                        let reason = format!(
                            "no word from {} for {}s",
                            c.name,
                            LIVENESS_TIMEOUT.as_secs()
                        );
                        warn!("{reason}: counted as failed for round {round}");
                        task.status = TaskStatus::Failed(reason);
                    }
                }
                if open
                    .tasks
                    .values()
                    .all(|t| matches!(t.status, TaskStatus::Reported | TaskStatus::Failed(_)))
                {
                    return;
                }
                if training
                    && !grace_started
                    && let Some(grace) = policy.grace_period
                    && open.reports.len() >= self.cfg.strategy.min_fit_clients
                {
                    grace_started = true;
                    let until = tokio::time::Instant::now() + grace;
                    if until < deadline {
                        deadline = until;
                        info!(
                            "round {round}: {} updates in (min_fit_clients = {}); waiting up to {} for the other {}",
                            open.reports.len(),
                            self.cfg.strategy.min_fit_clients,
                            humantime::format_duration(grace),
                            open.tasks.len() - open.reports.len()
                        );
                    }
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let what = if !training { "evaluation" } else if grace_started { "grace period" } else { "deadline" };
                    warn!("round {round} {what} reached: closing with the results received");
                    return;
                }
            }
        }
    }

    /// Stops accepting results for phase `serial`; returns what it gathered.
    fn close_phase(&self, serial: u64, round: u64) -> Closed {
        let mut st = lock(&self.state);
        let phase = std::mem::replace(&mut st.phase, Phase::Closing { round });
        let names: HashMap<String, String> = match &phase {
            Phase::Open(open) => open
                .tasks
                .keys()
                .map(|id| {
                    let name = st.clients.by_id(id).map_or(id.clone(), |c| c.name.clone());
                    (id.clone(), name)
                })
                .collect(),
            _ => HashMap::new(),
        };
        drop(st);
        self.changed.notify_waiters();
        match phase {
            Phase::Open(open) if open.serial == serial => {
                let what = match open.kind {
                    PhaseKind::Fit { .. } => "update",
                    PhaseKind::Evaluate => "evaluation",
                };
                let mut outcomes = Vec::with_capacity(open.tasks.len());
                for (id, t) in &open.tasks {
                    let name = names.get(id).map_or(id.as_str(), String::as_str);
                    let report = open.reports.iter().find(|r| &r.client_id == id);
                    let (outcome, reason) = match &t.status {
                        TaskStatus::Assigned | TaskStatus::Uploading => {
                            warn!("no {what} from {name} before round {round} closed");
                            (
                                "missing",
                                Some(format!("no {what} before the round closed")),
                            )
                        }
                        TaskStatus::Failed(reason) => {
                            warn!("{name} failed in round {round}: {reason}");
                            ("failed", Some(reason.clone()))
                        }
                        TaskStatus::Reported => ("reported", None),
                    };
                    outcomes.push(ClientOutcome {
                        client: name.to_string(),
                        outcome,
                        reason,
                        num_examples: report.map(|r| r.num_examples),
                        train_loss: report.and_then(|r| r.metrics.get("train_loss").copied()),
                    });
                }
                outcomes.sort_by(|a, b| a.client.cmp(&b.client));
                Closed {
                    selected: open.tasks.len(),
                    reports: open.reports,
                    stats: open.stats,
                    outcomes,
                }
            }
            _ => Closed {
                selected: 0,
                reports: Vec::new(),
                stats: Arc::new(RoundStats::default()),
                outcomes: Vec::new(),
            },
        }
    }

    async fn wait_for_goodbyes(&self) {
        let deadline = Instant::now() + FINISH_GRACE;
        while Instant::now() < deadline {
            let waiting = {
                let st = lock(&self.state);
                st.clients
                    .live(LIVENESS_TIMEOUT)
                    .iter()
                    .filter(|c| !c.told_finished)
                    .count()
            };
            if waiting == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a closed phase gathered.
struct Closed {
    selected: usize,
    reports: Vec<ClientReport>,
    stats: Arc<RoundStats>,
    /// Each selected client's part, by name.
    outcomes: Vec<ClientOutcome>,
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
