//! A training attempt carried across a coordinator restart: journaling it when it opens,
//! opening it again from its journal (`crate::journal`) with the updates already counted, and
//! giving each task back to its client when that client joins again.

use fedtune_common::checkpoint;

use super::phases::task_id;
use super::*;

/// Where a task of a reopened attempt is held until its client joins again (client ids are
/// `c<N>`, so a placeholder never is one).
pub(super) fn placeholder(name: &str) -> String {
    format!("~{name}")
}

/// The client name a placeholder holds a task for; `None` for a client id.
pub(super) fn held_for(key: &str) -> Option<&str> {
    key.strip_prefix('~')
}

impl Federation {
    /// The journaled attempt of `round` on `global`, if the coordinator died inside it.
    pub(super) fn journaled(
        &self,
        round: u64,
        global: &TensorSet,
    ) -> anyhow::Result<Option<Journaled>> {
        match &self.journal {
            // By content, whatever the tensors' order (a resumed model is read back sorted).
            Some(journal) => journal.load(round, &checkpoint::checksum(global)),
            None => {
                // Secure aggregation: an earlier plain run's journal is of no use.
                Journal::new(&self.cfg().out).clear()?;
                Ok(None)
            }
        }
    }

    /// Starts the journal of a plain training attempt, before any of its tasks is issued.
    pub(super) fn begin_journal(
        &self,
        kind: PhaseKind,
        round: u64,
        attempt: u32,
        global: &TensorSet,
        candidates: usize,
        clients: &[String],
    ) -> anyhow::Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let tasks = {
            let st = lock(&self.state);
            clients
                .iter()
                .map(|id| JournalTask {
                    task_id: task_id(kind, round, attempt, id),
                    client: st.clients.by_id(id).map_or(id.clone(), |c| c.name.clone()),
                })
                .collect()
        };
        let header = AttemptHeader {
            round,
            attempt,
            model_checksum: checkpoint::checksum(global),
            candidates,
            tasks,
        };
        journal.begin(&header).with_context(|| {
            format!(
                "round {round}: cannot start the round's journal (is the output folder writable?)"
            )
        })
    }

    /// Folds the journaled updates into `aggregator`; returns the ones counted. A damaged
    /// update file is left out with a warning: its client sends or trains it again.
    pub(super) fn replay(
        &self,
        journaled: &mut Journaled,
        aggregator: &mut dyn Aggregator,
    ) -> anyhow::Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let round = journaled.header.round;
        let mut kept = Vec::with_capacity(journaled.accepted.len());
        for a in std::mem::take(&mut journaled.accepted) {
            match journal.read_update(&a, &self.update_specs) {
                Ok(update) => {
                    aggregator
                        .accept(
                            &a.client,
                            &update,
                            UpdateWeight::of(a.num_examples, &a.metrics),
                        )
                        .map_err(|e| anyhow::anyhow!("round {round}: {e}"))?;
                    kept.push(a);
                }
                Err(e) => warn!(
                    "round {round}: the journaled update of task `{}` from {} is unusable ({e:#}): not counted; the task goes back to its client",
                    a.task_id, a.client
                ),
            }
        }
        journaled.accepted = kept;
        journal.resume(journaled)?;
        Ok(())
    }

    /// Opens a journaled training attempt again: counted tasks stay counted, the others are
    /// held for their clients (by name) until they join again; a closed attempt's missing
    /// tasks stay failed, so it closes at once. Returns its serial number.
    pub(super) fn reopen_phase(
        &self,
        kind: PhaseKind,
        journaled: &Journaled,
        model_version: u64,
        broadcast: Arc<Broadcast>,
        aggregator: Box<dyn Aggregator>,
    ) -> u64 {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (round, attempt) = (journaled.header.round, journaled.header.attempt);
        *lock(&self.aggregate) = Some(RoundAggregate {
            serial,
            aggregator,
            error: None,
        });
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut tasks = HashMap::new();
        let mut reports = Vec::new();
        for t in &journaled.header.tasks {
            // A client that already joined this coordinator takes its task now.
            let key = match st.clients.live_id_of(&t.client, LIVENESS_TIMEOUT) {
                Some(id) if !tasks.contains_key(&id) => id,
                _ => placeholder(&t.client),
            };
            let accepted = journaled.accepted.iter().find(|a| a.task_id == t.task_id);
            let status = match (accepted, &journaled.closed) {
                (Some(a), _) => {
                    reports.push(ClientReport {
                        client_id: key.clone(),
                        num_examples: a.num_examples,
                        metrics: a.metrics.clone(),
                    });
                    st.counted.insert(t.task_id.clone(), round);
                    TaskStatus::Reported
                }
                (None, Some(closed)) => TaskStatus::Failed(
                    closed
                        .get(&t.task_id)
                        .cloned()
                        .unwrap_or_else(|| "no update before the round closed".to_string()),
                ),
                (None, None) => TaskStatus::Assigned,
            };
            st.issued.insert(
                t.task_id.clone(),
                Issued {
                    serial,
                    kind,
                    round,
                    client_id: key.clone(),
                },
            );
            tasks.insert(
                key,
                TaskState {
                    task_id: t.task_id.clone(),
                    status,
                },
            );
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
            reports,
            stats: Arc::new(RoundStats::default()),
            secagg: None,
            opened: Instant::now(),
            deadline: None,
        })));
        drop(guard);
        let (n, counted) = (journaled.header.tasks.len(), journaled.accepted.len());
        match &journaled.closed {
            Some(_) => info!(
                "round {round}/{}: continuing after the restart from its journal: the round had closed with {counted} of {n} updates; aggregating them",
                self.cfg().rounds
            ),
            None => info!(
                "round {round}/{}{}: continuing after the restart from its journal: {counted} of {n} updates already counted; waiting for the other {} selected clients to join again",
                self.cfg().rounds,
                if attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                },
                n - counted
            ),
        }
        self.changed.notify_waiters();
        serial
    }

    /// A client joined: a task of the open attempt meant for its name is its again, so that a
    /// re-sent update is recognised and an unfinished task is handed back. That is a task of
    /// an attempt opened again after a coordinator restart, or the unstarted task of an
    /// earlier session under the same name (the client restarted; without it the round would
    /// wait for the dead session to time out).
    /// Returns what to log, once the join itself is logged.
    pub(super) fn give_back_task(st: &mut State, client_id: &str, name: &str) -> Option<String> {
        let State {
            phase,
            clients,
            issued,
            ..
        } = st;
        let Phase::Open(open) = phase else {
            return None;
        };
        if open.tasks.contains_key(client_id) {
            return None;
        }
        let waiting = placeholder(name);
        let key = if open.tasks.contains_key(&waiting) {
            waiting
        } else {
            let (id, _) = open.tasks.iter().find(|(id, t)| {
                t.status == TaskStatus::Assigned
                    && clients.by_id(id).is_some_and(|c| c.name == name)
            })?;
            id.clone()
        };
        let task = open.tasks.remove(&key)?;
        for r in open.reports.iter_mut().filter(|r| r.client_id == key) {
            r.client_id = client_id.to_string();
        }
        if let Some(issued) = issued.get_mut(&task.task_id) {
            issued.client_id = client_id.to_string();
        }
        let said = format!(
            "{name} joined again: task `{}` of round {} is its again ({})",
            task.task_id,
            open.round,
            match &task.status {
                TaskStatus::Reported => "already counted".to_string(),
                TaskStatus::Failed(why) => format!("failed: {why}"),
                _ => "still to do".to_string(),
            }
        );
        open.tasks.insert(client_id.to_string(), task);
        Some(said)
    }
}
