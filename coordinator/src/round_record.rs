//! What one round did: the object logged at INFO (as fields in JSON logs, as one aligned line in
//! text logs) and written to `metrics.jsonl`.

use fedtune_common::logging::LogFormat;
use serde::Serialize;
use tracing::info;

use crate::strategy::EvalSummary;
use crate::strategy::dp::PrivacyStatus;

#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    pub round: u64,
    pub rounds: u64,
    /// 1, or the attempt that succeeded when the round was retried.
    pub attempt: u32,
    pub model_version: u64,
    pub clients_selected: usize,
    pub clients_reported: usize,
    pub clients_failed: usize,
    /// The training clients behind the updates counted: `clients_reported`, unless tiered
    /// aggregators sent some (each counts the clients behind its pre-aggregated update).
    pub contributors: u64,
    /// Example-weighted mean of the clients' training loss (last local epoch).
    pub train_loss: Option<f64>,
    /// `server` (the global model on `--eval-data`) or `clients` (weighted mean of the clients'
    /// validation metrics, computed on their local model before upload).
    pub eval_source: &'static str,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_precision: Option<f64>,
    pub eval_recall: Option<f64>,
    pub eval_f1: Option<f64>,
    pub eval_examples: u64,
    /// Server-side evaluation only: F1 of each class, and the confusion matrix as rows
    /// (`[actual][predicted]`). In metrics.jsonl, not in the log line.
    pub eval_per_class_f1: Option<Vec<f64>>,
    pub eval_confusion: Option<Vec<Vec<u64>>>,
    /// Federated evaluation: clients that evaluated the new global model on their validation
    /// data, and the example-weighted means of their figures (0 / null when not run).
    pub fed_eval_clients: usize,
    pub fed_eval_examples: u64,
    pub fed_eval_loss: Option<f64>,
    pub fed_eval_accuracy: Option<f64>,
    pub fed_eval_precision: Option<f64>,
    pub fed_eval_recall: Option<f64>,
    pub fed_eval_f1: Option<f64>,
    /// Personalisation (`--personalize-steps`): the same federated figures after each
    /// evaluating client fine-tuned the new global model on its own training data.
    pub fed_eval_personal_loss: Option<f64>,
    pub fed_eval_personal_accuracy: Option<f64>,
    pub fed_eval_personal_f1: Option<f64>,
    /// Bytes sent to clients: the training broadcast plus, with federated evaluation, the
    /// evaluation broadcast.
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// What the same transfers carried as raw f32: equal to `bytes_down` / `bytes_up` unless
    /// they travel compressed (`compress_down`, `compress_up`).
    pub bytes_down_fp32: u64,
    pub bytes_up_fp32: u64,
    /// How the global model and the updates travel: fp32, fp16, bf16, int8 or topk:FRACTION.
    pub compress_down: String,
    pub compress_up: String,
    /// What the same updates would weigh as full models (compare with `bytes_up` under
    /// freezing or LoRA).
    pub bytes_up_full: u64,
    pub aggregate_ms: u64,
    pub eval_ms: u64,
    pub round_ms: u64,
    /// Each client selected for training, by the name it is known by (its certificate's or
    /// token's identity when the coordinator authenticates clients). In metrics.jsonl, not
    /// in the log line.
    pub clients: Vec<ClientOutcome>,
    /// With `--dp`: the privacy spent so far (ε at δ), the clipping bound and the noise.
    pub privacy: Option<PrivacyStatus>,
}

/// What one selected client did in a round's training phase.
#[derive(Debug, Clone, Serialize)]
pub struct ClientOutcome {
    pub client: String,
    /// `reported`, `failed`, or `missing` (nothing before the round closed).
    pub outcome: &'static str,
    pub reason: Option<String>,
    pub num_examples: Option<u64>,
    pub train_loss: Option<f64>,
    /// How far its local steps went (the sum of their learning rates; see FedNova).
    pub step_weight: Option<f64>,
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:5.2}%", v * 100.0))
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

impl RoundRecord {
    /// Logs the round at INFO: one aligned line in text logs, fields in JSON logs. A run
    /// without TLS says so in every round.
    pub fn log(&self, format: LogFormat, plaintext: bool) {
        let r = self;
        if format == LogFormat::Text {
            let warning = if plaintext {
                " | PLAINTEXT (--insecure)"
            } else {
                ""
            };
            info!("{}{warning}", r.text_line());
            return;
        }
        info!(
            round = r.round,
            rounds = r.rounds,
            attempt = r.attempt,
            model_version = r.model_version,
            clients_selected = r.clients_selected,
            clients_reported = r.clients_reported,
            clients_failed = r.clients_failed,
            contributors = r.contributors,
            train_loss = r.train_loss,
            eval_source = r.eval_source,
            eval_loss = r.eval_loss,
            eval_accuracy = r.eval_accuracy,
            eval_precision = r.eval_precision,
            eval_recall = r.eval_recall,
            eval_f1 = r.eval_f1,
            eval_examples = r.eval_examples,
            fed_eval_clients = r.fed_eval_clients,
            fed_eval_examples = r.fed_eval_examples,
            fed_eval_loss = r.fed_eval_loss,
            fed_eval_accuracy = r.fed_eval_accuracy,
            fed_eval_precision = r.fed_eval_precision,
            fed_eval_recall = r.fed_eval_recall,
            fed_eval_f1 = r.fed_eval_f1,
            fed_eval_personal_loss = r.fed_eval_personal_loss,
            fed_eval_personal_accuracy = r.fed_eval_personal_accuracy,
            fed_eval_personal_f1 = r.fed_eval_personal_f1,
            bytes_down = r.bytes_down,
            bytes_up = r.bytes_up,
            bytes_down_fp32 = r.bytes_down_fp32,
            bytes_up_fp32 = r.bytes_up_fp32,
            compress_down = r.compress_down,
            compress_up = r.compress_up,
            aggregate_ms = r.aggregate_ms,
            eval_ms = r.eval_ms,
            round_ms = r.round_ms,
            epsilon = r.privacy.as_ref().map(|p| p.epsilon),
            delta = r.privacy.as_ref().map(|p| p.delta),
            dp_clip = r.privacy.as_ref().map(|p| p.clip),
            plaintext,
            "round {}/{} complete",
            r.round,
            r.rounds
        );
    }

    pub fn set_fed_eval(&mut self, e: &EvalSummary) {
        self.fed_eval_clients = e.clients;
        self.fed_eval_examples = e.examples;
        self.fed_eval_loss = e.loss;
        self.fed_eval_accuracy = e.accuracy;
        self.fed_eval_precision = e.precision;
        self.fed_eval_recall = e.recall;
        self.fed_eval_f1 = e.f1;
        self.fed_eval_personal_loss = e.personal_loss;
        self.fed_eval_personal_accuracy = e.personal_accuracy;
        self.fed_eval_personal_f1 = e.personal_f1;
    }

    /// One aligned line for text logs.
    pub fn text_line(&self) -> String {
        let width = self.rounds.to_string().len();
        let personal = if self.fed_eval_personal_accuracy.is_some() {
            format!(
                " | personalised loss {:>6} acc {:>7} f1 {:>6}",
                num(self.fed_eval_personal_loss, 4),
                pct(self.fed_eval_personal_accuracy),
                num(self.fed_eval_personal_f1, 4)
            )
        } else {
            String::new()
        };
        let fed = if self.fed_eval_clients > 0 {
            format!(
                " | fed-eval[{} clients] loss {:>6} acc {:>7} f1 {:>6}{personal}",
                self.fed_eval_clients,
                num(self.fed_eval_loss, 4),
                pct(self.fed_eval_accuracy),
                num(self.fed_eval_f1, 4)
            )
        } else {
            String::new()
        };
        let privacy = self.privacy.as_ref().map_or(String::new(), |p| {
            let clip = match p.next_clip {
                Some(next) => format!("clip {:.4} -> {next:.4}", p.clip),
                None => format!("clip {:.4}", p.clip),
            };
            format!(" | ε {:.3} (δ {:.0e}, {clip})", p.epsilon, p.delta)
        });
        // Under freezing or LoRA, what full fine-tuning would have sent.
        let full = if self.bytes_up_full > self.bytes_up_fp32.max(self.bytes_up) {
            format!(" (full model {})", human_bytes(self.bytes_up_full))
        } else {
            String::new()
        };
        // Compressed: the codec and the wire bytes against the same values in raw f32.
        let codec = |name: &str, wire: u64, fp32: u64| {
            if name == "fp32" || name.is_empty() {
                String::new()
            } else {
                format!(" {name} ({:.2}× fp32)", wire as f64 / fp32.max(1) as f64)
            }
        };
        // Tiered: how many training clients the aggregators' updates stand for.
        let behind = if self.contributors != self.clients_reported as u64 {
            format!(" ({} clients behind them)", self.contributors)
        } else {
            String::new()
        };
        let down = codec(&self.compress_down, self.bytes_down, self.bytes_down_fp32);
        let up = codec(&self.compress_up, self.bytes_up, self.bytes_up_fp32);
        format!(
            "round {:>w$}/{}{} | clients {}/{} ok{behind}, {} failed | train loss {:>6} | eval[{}] loss {:>6} acc {:>7} f1 {:>6}{fed}{privacy} | down {:>9}{down} up {:>9}{up}{full} | agg {:>4} ms | round {:>6.2} s",
            self.round,
            self.rounds,
            if self.attempt > 1 {
                format!(" (attempt {})", self.attempt)
            } else {
                String::new()
            },
            self.clients_reported,
            self.clients_selected,
            self.clients_failed,
            num(self.train_loss, 4),
            self.eval_source,
            num(self.eval_loss, 4),
            pct(self.eval_accuracy),
            num(self.eval_f1, 4),
            human_bytes(self.bytes_down),
            human_bytes(self.bytes_up),
            self.aggregate_ms,
            self.round_ms as f64 / 1000.0,
            w = width,
        )
    }
}
