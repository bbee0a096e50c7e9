//! Local training progress: a progress bar on a terminal, one log line per epoch otherwise;
//! and the same progress passed to the heartbeats, so the coordinator's status shows it.

use std::time::Instant;

use fedtune_common::logging::TRAIN;
use fedtune_common::train::Progress;
use indicatif::{ProgressBar, ProgressStyle};

pub enum ProgressView {
    Bar(ProgressBar),
    Log {
        name: String,
        round: u64,
        epoch_started: Instant,
        loss_sum: f64,
        steps: usize,
    },
}

impl ProgressView {
    pub fn new(bar: bool, name: &str, round: u64) -> Self {
        if bar {
            let pb = ProgressBar::new(0);
            pb.set_style(
                ProgressStyle::with_template(
                    "round {prefix} {msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            pb.set_prefix(round.to_string());
            Self::Bar(pb)
        } else {
            Self::Log {
                name: name.to_string(),
                round,
                epoch_started: Instant::now(),
                loss_sum: 0.0,
                steps: 0,
            }
        }
    }

    pub fn update(&mut self, p: &Progress) {
        if let Some(line) = p.epoch_line() {
            match self {
                Self::Bar(pb) => pb.println(line),
                Self::Log { name, round, .. } => {
                    tracing::info!(target: TRAIN, "{name} round {round} {line}")
                }
            }
            return;
        }
        match self {
            Self::Bar(pb) => {
                pb.set_length((p.epochs as usize * p.steps_per_epoch) as u64);
                pb.set_position(((p.epoch as usize - 1) * p.steps_per_epoch + p.step) as u64);
                pb.set_message(format!("epoch {}/{} loss {:.4}", p.epoch, p.epochs, p.loss));
            }
            Self::Log {
                name,
                round,
                epoch_started,
                loss_sum,
                steps,
            } => {
                *loss_sum += p.loss;
                *steps += 1;
                if p.step == p.steps_per_epoch {
                    tracing::info!(
                        target: TRAIN,
                        "{name} round {round} epoch {}/{}: mean loss {:.4} over {} steps in {:.1} s",
                        p.epoch,
                        p.epochs,
                        *loss_sum / *steps as f64,
                        steps,
                        epoch_started.elapsed().as_secs_f64()
                    );
                    *epoch_started = Instant::now();
                    *loss_sum = 0.0;
                    *steps = 0;
                }
            }
        }
    }

    pub fn finish(self) {
        if let Self::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }
}

/// Passes the trainer's progress to the heartbeat, waking it only when an epoch starts or
/// ends (not at every step).
pub(crate) fn report_training(
    tx: &tokio::sync::watch::Sender<Option<fedtune_proto::TrainingProgress>>,
    task_id: &str,
    p: &Progress,
) {
    let loss = Some(p.loss).filter(|l| l.is_finite());
    tx.send_if_modified(|now| match now {
        // A step within the same epoch: the loss only, no wake-up.
        Some(n) if n.epoch == p.epoch && p.validation.is_none() => {
            n.loss = loss;
            false
        }
        _ => {
            *now = Some(fedtune_proto::TrainingProgress {
                task_id: task_id.to_string(),
                epoch: p.epoch,
                epochs: p.epochs,
                loss,
            });
            true
        }
    });
}
