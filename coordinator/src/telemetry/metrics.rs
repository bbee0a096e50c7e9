//! The coordinator's Prometheus metrics (the official `prometheus-client` crate): what the
//! round engine and the service count, under `fedtune_*` names in base units.
//!
//! Per round the figures come from the same [`RoundRecord`] that `metrics.jsonl` gets, so a
//! scrape and the file always agree. Gauges of evaluation hold the latest round's values.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::process::ProcessCollector;
use crate::round_record::RoundRecord;

/// Where the run is; exactly one of them is 1 in `fedtune_phase`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PhaseName {
    Waiting,
    Training,
    Aggregating,
    Evaluating,
    Finished,
    Stopping,
}

const PHASES: [PhaseName; 6] = [
    PhaseName::Waiting,
    PhaseName::Training,
    PhaseName::Aggregating,
    PhaseName::Evaluating,
    PhaseName::Finished,
    PhaseName::Stopping,
];

/// Why an RPC of a client was refused (a few fixed values: never a client id).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefusalReason {
    /// The update's round or attempt had closed.
    Late,
    /// Not this model's tensors, not finite, or otherwise not a valid update.
    Invalid,
    /// Broken in transit (checksums, order, truncation): the client retries.
    Corrupt,
    UnknownTask,
    NotYourTask,
    /// The task had already been marked failed, or an upload for it is in progress.
    TaskState,
    UnknownSession,
    /// `--max-clients`, or a stream or join limit.
    Limit,
    /// Not allowed in: no certificate or token, not on the allow-list, protocol mismatch.
    Unauthorized,
    SecureAggregation,
    Stopping,
    Internal,
}

const REASONS: [RefusalReason; 12] = [
    RefusalReason::Late,
    RefusalReason::Invalid,
    RefusalReason::Corrupt,
    RefusalReason::UnknownTask,
    RefusalReason::NotYourTask,
    RefusalReason::TaskState,
    RefusalReason::UnknownSession,
    RefusalReason::Limit,
    RefusalReason::Unauthorized,
    RefusalReason::SecureAggregation,
    RefusalReason::Stopping,
    RefusalReason::Internal,
];

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Direction {
    Down,
    Up,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Source {
    /// The global model on the coordinator's `--eval-data`.
    Server,
    /// The clients' validation figures of their local models (no `--eval-data`).
    Clients,
    /// Federated evaluation: clients measured the new global model.
    Federated,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum UpdateOutcome {
    Accepted,
    Duplicate,
}

/// Label values as Prometheus users write them (snake_case), spelled out rather than derived.
macro_rules! label_values {
    ($ty:ident { $($variant:ident => $name:literal),* $(,)? }) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                let name = match self {
                    $(Self::$variant => $name),*
                };
                EncodeLabelValue::encode(&name, encoder)
            }
        }
    };
}

impl PhaseName {
    /// The name status shows and `fedtune_phase{phase}` carries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Training => "training",
            Self::Aggregating => "aggregating",
            Self::Evaluating => "evaluating",
            Self::Finished => "finished",
            Self::Stopping => "stopping",
        }
    }
}

impl EncodeLabelValue for PhaseName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Where the run is now, read from the round engine's state at each scrape (so the metrics
/// and `status` say the same, and the engine keeps no second account of its phase).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub phase: PhaseName,
    pub round: u64,
    /// The open training attempt and the clients selected for it; `None` outside one (the
    /// gauges keep the last attempt's).
    pub training: Option<(u32, usize)>,
    pub live: usize,
}
label_values!(RefusalReason {
    Late => "late",
    Invalid => "invalid",
    Corrupt => "corrupt",
    UnknownTask => "unknown_task",
    NotYourTask => "not_your_task",
    TaskState => "task_state",
    UnknownSession => "unknown_session",
    Limit => "limit",
    Unauthorized => "unauthorized",
    SecureAggregation => "secure_aggregation",
    Stopping => "stopping",
    Internal => "internal",
});
label_values!(Direction { Down => "down", Up => "up" });
label_values!(Source {
    Server => "server",
    Clients => "clients",
    Federated => "federated",
});
label_values!(UpdateOutcome {
    Accepted => "accepted",
    Duplicate => "duplicate",
});

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: PhaseName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: UpdateOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: RefusalReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    strategy: String,
    model: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the coordinator exports, registered once; updating one is an atomic operation.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rounds_completed: Counter,
    round: Gauge,
    rounds: Gauge,
    attempt: Gauge,
    phase: Family<PhaseLabels, Gauge>,
    round_duration: Histogram,
    aggregation_duration: Histogram,
    clients_joined: Counter,
    clients_live: Gauge,
    clients_selected: Gauge,
    clients_reported: Gauge,
    clients_failed: Gauge,
    updates: Family<OutcomeLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    transfer: Family<DirectionLabels, Counter>,
    transfer_fp32: Family<DirectionLabels, Counter>,
    eval_loss: Family<SourceLabels, FloatGauge>,
    eval_accuracy: Family<SourceLabels, FloatGauge>,
    eval_f1: Family<SourceLabels, FloatGauge>,
    dp_epsilon: FloatGauge,
    /// Held while a round's figures are set and while a scrape is encoded, so that a scrape
    /// never shows half a round (the rounds counter of one round, the bytes of the next).
    consistent: Mutex<()>,
}

impl Metrics {
    /// The registry with every metric at zero; `strategy` and `model` label `fedtune_build_info`.
    pub fn new(strategy: &str, model: &str, rounds: u64) -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let m = Self {
            registry: Registry::default(),
            rounds_completed: Counter::default(),
            round: Gauge::default(),
            rounds: Gauge::default(),
            attempt: Gauge::default(),
            phase: Family::default(),
            // 50 ms .. 410 s.
            round_duration: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            // 1 ms .. 33 s.
            aggregation_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            clients_joined: Counter::default(),
            clients_live: Gauge::default(),
            clients_selected: Gauge::default(),
            clients_reported: Gauge::default(),
            clients_failed: Gauge::default(),
            updates: Family::default(),
            refused: Family::default(),
            transfer: Family::default(),
            transfer_fp32: Family::default(),
            eval_loss: Family::default(),
            eval_accuracy: Family::default(),
            eval_f1: Family::default(),
            dp_epsilon: FloatGauge::default(),
            consistent: Mutex::new(()),
        };
        let r = root.sub_registry_with_prefix("fedtune");
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                strategy: strategy.into(),
                model: model.into(),
            })
            .set(1);
        r.register(
            "build_info",
            "Always 1; the labels say which fedtune, strategy and model this run uses",
            build,
        );
        r.register(
            "rounds_completed",
            "Rounds aggregated and checkpointed (a resumed run counts from where it resumed)",
            m.rounds_completed.clone(),
        );
        r.register(
            "round",
            "The round in progress (or the last one, once finished)",
            m.round.clone(),
        );
        r.register("rounds", "Rounds the run is to complete", m.rounds.clone());
        r.register(
            "round_attempt",
            "Attempt of the round in progress (above 1 after a failed attempt was retried)",
            m.attempt.clone(),
        );
        r.register(
            "phase",
            "1 for the phase the run is in: waiting, training, aggregating, evaluating, finished, stopping",
            m.phase.clone(),
        );
        r.register_with_unit(
            "round_duration",
            "Wall time of each completed round, retries included",
            Unit::Seconds,
            m.round_duration.clone(),
        );
        r.register_with_unit(
            "aggregation_duration",
            "Time to combine a round's updates (after the last one arrived)",
            Unit::Seconds,
            m.aggregation_duration.clone(),
        );
        r.register(
            "clients_joined",
            "Client sessions joined (a client that restarts joins again)",
            m.clients_joined.clone(),
        );
        r.register(
            "clients_live",
            "Clients heard from within the liveness timeout",
            m.clients_live.clone(),
        );
        r.register(
            "clients_selected",
            "Clients selected to train in the round in progress",
            m.clients_selected.clone(),
        );
        r.register(
            "clients_reported",
            "Clients whose update counted in the last completed round",
            m.clients_reported.clone(),
        );
        r.register(
            "clients_failed",
            "Selected clients that failed or sent nothing in the last completed round",
            m.clients_failed.clone(),
        );
        r.register(
            "updates",
            "Training updates taken: accepted (counted) or duplicate (already counted, ignored)",
            m.updates.clone(),
        );
        r.register(
            "refused",
            "Client requests refused, by reason (late, invalid, corrupt, unauthorized, ...)",
            m.refused.clone(),
        );
        r.register_with_unit(
            "transfer",
            "Model bytes sent to clients (down) and update bytes received (up)",
            Unit::Bytes,
            m.transfer.clone(),
        );
        r.register_with_unit(
            "transfer_fp32",
            "What the same transfers carried as raw f32 (equal to transfer unless --compress-down or --compress-up is on)",
            Unit::Bytes,
            m.transfer_fp32.clone(),
        );
        r.register(
            "eval_loss",
            "Loss of the latest evaluation: server (--eval-data), clients (their local models) or federated",
            m.eval_loss.clone(),
        );
        r.register(
            "eval_accuracy_ratio",
            "Accuracy (0..1) of the latest evaluation, by source",
            m.eval_accuracy.clone(),
        );
        r.register(
            "eval_f1_ratio",
            "Macro F1 (0..1) of the latest evaluation, by source",
            m.eval_f1.clone(),
        );
        r.register(
            "dp_epsilon",
            "Differential privacy spent so far (ε at the run's δ); 0 without --dp",
            m.dp_epsilon.clone(),
        );
        m.rounds.set(rounds as i64);
        m.set_now(Now {
            phase: PhaseName::Waiting,
            round: 1,
            training: None,
            live: 0,
        });
        m.zero_every_series();
        Self {
            registry: root,
            ..m
        }
    }

    /// Every labelled series from the start, so that a scrape describes each metric and a
    /// rate over a counter has its zero: counters at 0, evaluation gauges NaN (not measured
    /// yet; a source the run never has stays NaN).
    fn zero_every_series(&self) {
        for outcome in [UpdateOutcome::Accepted, UpdateOutcome::Duplicate] {
            self.updates
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(0);
        }
        for reason in REASONS {
            self.refused
                .get_or_create(&ReasonLabels { reason })
                .inc_by(0);
        }
        for direction in [Direction::Down, Direction::Up] {
            for family in [&self.transfer, &self.transfer_fp32] {
                family
                    .get_or_create(&DirectionLabels { direction })
                    .inc_by(0);
            }
        }
        for source in [Source::Server, Source::Clients, Source::Federated] {
            let labels = SourceLabels { source };
            for family in [&self.eval_loss, &self.eval_accuracy, &self.eval_f1] {
                family.get_or_create(&labels).set(f64::NAN);
            }
        }
    }

    /// The text exposition of every metric (OpenMetrics).
    pub fn encode(&self) -> String {
        let _consistent = self.consistent.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The gauges of where the run is, from the engine's state.
    pub fn set_now(&self, now: Now) {
        for p in PHASES {
            self.phase
                .get_or_create(&PhaseLabels { phase: p })
                .set((p == now.phase) as i64);
        }
        self.round.set(now.round as i64);
        if let Some((attempt, selected)) = now.training {
            self.attempt.set(i64::from(attempt));
            self.clients_selected.set(selected as i64);
        }
        self.clients_live.set(now.live as i64);
    }

    pub fn rounds_completed(&self) -> u64 {
        self.rounds_completed.get()
    }

    pub fn joined(&self) {
        self.clients_joined.inc();
    }

    pub fn update_taken(&self, duplicate: bool) {
        let outcome = if duplicate {
            UpdateOutcome::Duplicate
        } else {
            UpdateOutcome::Accepted
        };
        self.updates.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A completed round, from the record `metrics.jsonl` gets.
    pub fn round_completed(&self, r: &RoundRecord) {
        let _consistent = self.consistent.lock().unwrap_or_else(|p| p.into_inner());
        self.rounds_completed.inc();
        self.round_duration.observe(r.round_ms as f64 / 1000.0);
        self.aggregation_duration
            .observe(r.aggregate_ms as f64 / 1000.0);
        self.clients_reported.set(r.clients_reported as i64);
        self.clients_failed.set(r.clients_failed as i64);
        self.transfer
            .get_or_create(&DirectionLabels {
                direction: Direction::Down,
            })
            .inc_by(r.bytes_down);
        self.transfer
            .get_or_create(&DirectionLabels {
                direction: Direction::Up,
            })
            .inc_by(r.bytes_up);
        self.transfer_fp32
            .get_or_create(&DirectionLabels {
                direction: Direction::Down,
            })
            .inc_by(r.bytes_down_fp32);
        self.transfer_fp32
            .get_or_create(&DirectionLabels {
                direction: Direction::Up,
            })
            .inc_by(r.bytes_up_fp32);
        let source = if r.eval_source == "server" {
            Source::Server
        } else {
            Source::Clients
        };
        self.set_eval(source, r.eval_loss, r.eval_accuracy, r.eval_f1);
        if r.fed_eval_clients > 0 {
            self.set_eval(
                Source::Federated,
                r.fed_eval_loss,
                r.fed_eval_accuracy,
                r.fed_eval_f1,
            );
        }
        if let Some(p) = &r.privacy {
            self.dp_epsilon.set(p.epsilon);
        }
    }

    fn set_eval(&self, source: Source, loss: Option<f64>, acc: Option<f64>, f1: Option<f64>) {
        let labels = SourceLabels { source };
        for (family, value) in [
            (&self.eval_loss, loss),
            (&self.eval_accuracy, acc),
            (&self.eval_f1, f1),
        ] {
            if let Some(v) = value {
                family.get_or_create(&labels).set(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn exactly_one_phase_is_set() {
        let m = Metrics::new("fedavg", "mlp", 3);
        m.set_now(Now {
            phase: PhaseName::Evaluating,
            round: 2,
            training: None,
            live: 4,
        });
        let text = m.encode();
        assert_eq!(
            value(&text, "fedtune_phase{phase=\"evaluating\"}"),
            Some(1.0)
        );
        assert_eq!(value(&text, "fedtune_phase{phase=\"training\"}"), Some(0.0));
        assert_eq!(value(&text, "fedtune_rounds"), Some(3.0));
    }

    #[test]
    fn refusals_are_counted_by_reason_with_counter_names_ending_in_total() {
        let m = Metrics::new("fedavg", "mlp", 3);
        m.refused(RefusalReason::Late);
        m.refused(RefusalReason::Late);
        m.refused(RefusalReason::Invalid);
        let text = m.encode();
        assert_eq!(
            value(&text, "fedtune_refused_total{reason=\"late\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "fedtune_refused_total{reason=\"invalid\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn the_process_is_described_under_the_standard_names() {
        let text = Metrics::new("fedavg", "mlp", 1).encode();
        let rss = value(&text, "process_resident_memory_bytes").unwrap();
        assert!(rss > 1e6, "{rss}");
        assert!(value(&text, "process_open_fds").unwrap() >= 3.0);
        assert!(
            value(&text, "process_cpu_seconds_total").is_some(),
            "{text}"
        );
    }
}
