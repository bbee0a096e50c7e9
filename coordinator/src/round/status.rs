//! `fedtune-coordinator status`: one snapshot of the run (round, phase, time in it, the
//! deadline) and of every client's latest session with what it is doing, read under the state
//! lock from what the engine already keeps.

use crate::clients::ClientInfo;
use crate::telemetry::Now;

use super::*;

impl State {
    /// Where the run is: the phase as status and the metrics name it, the round, and the open
    /// training attempt with its selected clients.
    pub(super) fn now(&self) -> Now {
        let (phase, round, training) = match &self.phase {
            Phase::Waiting { round } => (PhaseName::Waiting, *round, None),
            Phase::Open(open) => match open.kind {
                PhaseKind::Evaluate => (PhaseName::Evaluating, open.round, None),
                PhaseKind::Fit { .. } => (
                    PhaseName::Training,
                    open.round,
                    Some((open.attempt, open.tasks.len())),
                ),
            },
            Phase::Closing { round } => (PhaseName::Aggregating, *round, None),
            Phase::Finished { .. } => (PhaseName::Finished, self.current_round, None),
            Phase::Stopping { .. } => (PhaseName::Stopping, self.current_round, None),
        };
        Now {
            phase,
            round,
            training,
            live: self.clients.live_count(LIVENESS_TIMEOUT),
        }
    }
}

impl Federation {
    pub fn status(&self) -> pb::RunStatus {
        let st = lock(&self.state);
        let now = Instant::now();
        let where_ = st.now();
        let (reason, open) = match &st.phase {
            Phase::Finished { reason } | Phase::Stopping { reason } => (reason.clone(), None),
            Phase::Open(open) => (String::new(), Some(&**open)),
            _ => (String::new(), None),
        };
        pb::RunStatus {
            run_id: self.run_id.clone(),
            round: where_.round,
            rounds: self.cfg().rounds,
            attempt: open.map_or(0, |o| o.attempt),
            phase: where_.phase.as_str().into(),
            seconds_in_phase: now.duration_since(st.phase_since).as_secs_f64(),
            seconds_to_deadline: open
                .and_then(|o| o.deadline)
                .map(|d| d.saturating_duration_since(now).as_secs_f64()),
            min_clients: self.needed_clients() as u32,
            rounds_completed: self.metrics.rounds_completed(),
            reason,
            clients: st
                .clients
                .latest_sessions(LIVENESS_TIMEOUT)
                .into_iter()
                .map(|(c, live)| client_status(c, live, open, now))
                .collect(),
        }
    }
}

/// What client `c` is doing: its task in the open phase, how far its transfers got, and what
/// its heartbeats said about training.
fn client_status(
    c: &ClientInfo,
    live: bool,
    open: Option<&OpenPhase>,
    now: Instant,
) -> pb::ClientStatus {
    let mut s = pb::ClientStatus {
        id: c.id.clone(),
        name: c.name.clone(),
        device: c.device.clone(),
        num_examples: c.num_examples,
        seconds_since_heard: now.duration_since(c.last_seen).as_secs_f64(),
        state: if live { "waiting" } else { "gone" }.into(),
        ..Default::default()
    };
    let Some((open, task)) = open.and_then(|o| Some((o, o.tasks.get(&c.id)?))) else {
        return s;
    };
    s.task_id = task.task_id.clone();
    let evaluating = open.kind == PhaseKind::Evaluate;
    s.state = match &task.status {
        TaskStatus::Reported => "reported".into(),
        TaskStatus::Failed(why) => {
            s.reason = why.clone();
            "failed".into()
        }
        TaskStatus::Uploading => {
            s.progress = of_task(&c.upload, &task.task_id).map(|t| t.fraction());
            "uploading".into()
        }
        TaskStatus::Assigned => match (of_task(&c.download, &task.task_id), &c.training) {
            (_, Some(t)) if t.task_id == task.task_id && !evaluating => {
                (s.epoch, s.epochs, s.loss) = (t.epoch, t.epochs, t.loss);
                "training".into()
            }
            (Some(d), _) if d.fraction() < 1.0 => {
                s.progress = Some(d.fraction());
                "downloading".into()
            }
            (Some(_), _) if evaluating => "evaluating".into(),
            (Some(_), _) => "training".into(),
            (None, _) if !live => "gone".into(),
            (None, _) => "selected".into(),
        },
    };
    s
}

/// The transfer `t` if it belongs to task `task_id` (not to an earlier one).
fn of_task<'a>(t: &'a Option<Arc<Transfer>>, task_id: &str) -> Option<&'a Arc<Transfer>> {
    t.as_ref().filter(|t| t.task_id == task_id)
}
