//! Phases of a round: waiting for clients, opening a phase (issuing its tasks), waiting for the
//! selected clients' reports, closing it, and the goodbyes at the end of a run. The engine
//! (`engine.rs`) decides when; these do the work of each step.

use super::reopen::held_for;
use super::*;

impl Federation {
    /// Waits until enough clients are live, logging the wait; gives up after
    /// `available_timeout` with an error that says what to do.
    pub(super) async fn wait_for_clients(&self, round: u64) -> anyhow::Result<()> {
        let needed = self.needed_clients();
        let timeout = self.cfg().policy.available_timeout;
        let give_up = Instant::now() + timeout;
        let mut last_log = Instant::now() - WAIT_LOG_EVERY;
        {
            let mut st = lock(&self.state);
            if !matches!(st.phase, Phase::Open(_)) {
                st.enter(Phase::Waiting { round });
            }
        }
        fedtune_common::crash_point::reached("waiting");
        loop {
            let (notified, progress) = (self.changed.notified(), self.progress.notified());
            tokio::pin!(notified, progress);
            notified.as_mut().enable();
            progress.as_mut().enable();
            let live = lock(&self.state).clients.live_count(LIVENESS_TIMEOUT);
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
                // The names of the first few: a fleet's would fill the screen.
                const NAMED: usize = 10;
                let names: Vec<String> = {
                    let st = lock(&self.state);
                    st.clients
                        .live(LIVENESS_TIMEOUT)
                        .iter()
                        .take(NAMED)
                        .map(|c| c.name.clone())
                        .collect()
                };
                info!(
                    "waiting for clients before round {round}: {live}/{needed} live{}; waiting for {} more (gives up in {}s)",
                    match live {
                        0 => String::new(),
                        n if n <= NAMED => format!(" ({})", names.join(", ")),
                        n => format!(" ({}, and {} more)", names.join(", "), n - NAMED),
                    },
                    needed.saturating_sub(live),
                    give_up.saturating_duration_since(Instant::now()).as_secs()
                );
                last_log = Instant::now();
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = &mut progress => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Issues tasks to `clients` and opens a phase. Returns its serial number.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open_phase(
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
        // Installed before `state` is locked (lock order: `secagg` before `state`).
        let mut secagg = match (kind, &self.cfg().secure_agg) {
            (PhaseKind::Fit { secure: true, .. }, Some(settings)) => Some(Box::new(
                self.begin_secagg(settings, serial, round, clients),
            )),
            _ => None,
        };
        if let Some(aggregator) = aggregator {
            // Installed before `state` is locked (lock order: `aggregate` is never taken while
            // `state` is held). Nothing is folded into it before the phase below opens.
            *lock(&self.aggregate) = Some(RoundAggregate {
                serial,
                aggregator,
                error: None,
            });
        }
        let prefix = self
            .task_prefix
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut tasks = HashMap::new();
        let mut names = Vec::new();
        for id in clients {
            let task_id = format!("{prefix}{}", task_id(kind, round, attempt, id));
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
        if let Some(s) = secagg.as_mut() {
            Self::weigh_participants(s, &st.clients);
        }
        st.current_round = round;
        st.enter(Phase::Open(Box::new(OpenPhase {
            serial,
            kind,
            round,
            attempt,
            model_version,
            broadcast,
            tasks,
            reports: Vec::new(),
            stats: Arc::new(RoundStats::default()),
            secagg,
            opened: Instant::now(),
            deadline: None,
        })));
        let live = st.clients.live_count(LIVENESS_TIMEOUT);
        drop(guard);
        match kind {
            PhaseKind::Fit { secure, .. } => info!(
                "round {round}{}{} started: {} of {live} live clients selected ({}), model v{model_version}, broadcast {}{}",
                self.of_rounds(),
                if attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                },
                clients.len(),
                names.join(", "),
                human_bytes(bytes),
                match (secure, &self.cfg().secure_agg) {
                    (true, Some(s)) => {
                        let (k, t) = s.graph(clients.len());
                        format!(", secure aggregation with {k} neighbours each, threshold {t}")
                    }
                    _ => String::new(),
                }
            ),
            PhaseKind::Evaluate => info!(
                "round {round}{}: federated evaluation of model v{model_version} by {} of {live} live clients ({})",
                self.of_rounds(),
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
    pub(super) async fn wait_for_reports(&self, serial: u64, round: u64, training: bool) {
        let policy = &self.cfg().policy;
        let mut deadline = tokio::time::Instant::now() + policy.round_timeout;
        let mut grace_started = false;
        loop {
            let (notified, progress) = (self.changed.notified(), self.progress.notified());
            tokio::pin!(notified, progress);
            notified.as_mut().enable();
            progress.as_mut().enable();
            {
                let mut st = lock(&self.state);
                let st = &mut *st;
                let Phase::Open(open) = &mut st.phase else {
                    return;
                };
                if open.serial != serial {
                    return;
                }
                open.deadline = Some(deadline.into_std());
                for (id, task) in open.tasks.iter_mut() {
                    if task.status != TaskStatus::Assigned {
                        continue;
                    }
                    let silent = match st.clients.by_id(id) {
                        Some(c) => (c.last_seen.elapsed() > LIVENESS_TIMEOUT)
                            .then(|| format!("no word from {}", c.name)),
                        // A task of an attempt opened again whose client has not come back.
                        None => (open.opened.elapsed() > LIVENESS_TIMEOUT).then(|| {
                            format!(
                                "{} did not join again after the coordinator restarted",
                                held_for(id).unwrap_or(id)
                            )
                        }),
                    };
                    if let Some(why) = silent {
                        let reason = format!("{why} for {}s", LIVENESS_TIMEOUT.as_secs());
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
                    && open.reports.len() >= self.cfg().strategy.min_fit_clients
                {
                    grace_started = true;
                    let until = tokio::time::Instant::now() + grace;
                    if until < deadline {
                        deadline = until;
                        info!(
                            "round {round}: {} updates in (min_fit_clients = {}); waiting up to {} for the other {}",
                            open.reports.len(),
                            self.cfg().strategy.min_fit_clients,
                            humantime::format_duration(grace),
                            open.tasks.len() - open.reports.len()
                        );
                    }
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = &mut progress => {}
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
    pub(super) fn close_phase(&self, serial: u64, round: u64) -> Closed {
        let mut st = lock(&self.state);
        let phase = st.enter(Phase::Closing { round });
        let names: HashMap<String, String> = match &phase {
            Phase::Open(open) => open
                .tasks
                .keys()
                .map(|id| {
                    let name = match st.clients.by_id(id) {
                        Some(c) => c.name.clone(),
                        None => held_for(id).unwrap_or(id).to_string(),
                    };
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
                        step_weight: report
                            .and_then(|r| r.metrics.get(UpdateWeight::STEP_METRIC).copied()),
                    });
                }
                outcomes.sort_by(|a, b| a.client.cmp(&b.client));
                if matches!(open.kind, PhaseKind::Fit { secure: false, .. })
                    && let Some(journal) = &self.journal
                {
                    let unreported: HashMap<String, String> = open
                        .tasks
                        .values()
                        .filter_map(|t| match &t.status {
                            TaskStatus::Reported => None,
                            TaskStatus::Failed(reason) => Some((t.task_id.clone(), reason.clone())),
                            _ => Some((
                                t.task_id.clone(),
                                format!("no {what} before the round closed"),
                            )),
                        })
                        .collect();
                    if let Err(e) = journal.close(&unreported) {
                        // Only costs a wait at a restart: the attempt is opened again.
                        warn!("round {round}: {e:#}");
                    }
                }
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

    /// `/N` after a round number; nothing for a tiered aggregator, whose parent decides.
    fn of_rounds(&self) -> String {
        match self.cfg().rounds {
            0 => String::new(),
            n => format!("/{n}"),
        }
    }

    pub(super) async fn wait_for_goodbyes(&self) {
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

/// A task's id: `r<round>-<client>` for training (`r<round>.<attempt>-<client>` after a
/// retry), `e<round>-<client>` for evaluation.
pub(super) fn task_id(kind: PhaseKind, round: u64, attempt: u32, client_id: &str) -> String {
    match (kind, attempt) {
        (PhaseKind::Evaluate, _) => format!("e{round}-{client_id}"),
        (_, 1) => format!("r{round}-{client_id}"),
        _ => format!("r{round}.{attempt}-{client_id}"),
    }
}

/// What a closed phase gathered.
pub(super) struct Closed {
    pub(super) selected: usize,
    pub(super) reports: Vec<ClientReport>,
    pub(super) stats: Arc<RoundStats>,
    /// Each selected client's part, by name.
    pub(super) outcomes: Vec<ClientOutcome>,
}
