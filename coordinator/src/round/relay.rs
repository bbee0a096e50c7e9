//! A tiered aggregator's rounds (`serve --upstream`): the parent's task decides when a round
//! runs and what it trains; these open it among this coordinator's own clients with the same
//! phases as a root's round (wait for clients, open, wait for reports, close) and return what
//! the parent gets instead of a server step: the example-weighted mean of the updates and
//! their total examples, or the combined evaluation. `tier` carries them to the parent.

use std::sync::Arc;

use super::*;
use crate::strategy::layout::Layout;
use crate::strategy::partial_mean::PartialMean;
use crate::strategy::weighted_eval;

/// A parent's training task, relayed.
pub struct RelayTrain {
    pub round: u64,
    /// Distinguishes a round the parent runs again (its retry) from the first time.
    pub attempt: u32,
    /// The parent's model version, which the clients' updates are computed against.
    pub model_version: u64,
    /// The parent's recipe, handed to every client as it is.
    pub config: pb::TrainConfig,
    pub global: Arc<TensorSet>,
}

/// What a relayed training round gathered.
pub struct RelayedFit {
    /// The example-weighted mean delta in the order of [`Federation::update_specs`]; `None`
    /// when the round failed by this coordinator's round policy.
    pub mean: Option<Vec<f32>>,
    /// Why the round failed, when it did.
    pub failure: Option<String>,
    pub num_examples: u64,
    /// The figures the parent reads from an update, combined as it would combine them.
    pub metrics: HashMap<String, f64>,
    pub selected: usize,
    pub reported: usize,
    pub bytes_down: u64,
    pub bytes_up: u64,
}

/// A parent's personalisation of an evaluation task (`--personalize-steps` at the root), handed
/// on to this aggregator's clients unchanged.
#[derive(Debug, Clone)]
pub struct Personalize {
    pub steps: u32,
    pub config: pb::TrainConfig,
    /// Ditto's key of the personal model (the root's run).
    pub personal_model: String,
}

impl Personalize {
    pub fn of(task: &pb::EvaluateTask) -> Option<Self> {
        Some(Self {
            steps: task.personalize_steps,
            config: task.personalize.clone()?,
            personal_model: task.personal_model.clone(),
        })
        .filter(|p| p.steps > 0)
    }
}

/// What a relayed evaluation gathered: the examples and the example-weighted figures.
pub struct RelayedEvaluation {
    pub num_examples: u64,
    pub metrics: HashMap<String, f64>,
    pub selected: usize,
    pub reported: usize,
}

impl Federation {
    /// Runs the parent's training round among this coordinator's live clients.
    pub async fn relay_train(&self, task: RelayTrain) -> anyhow::Result<RelayedFit> {
        let RelayTrain {
            round,
            attempt,
            model_version,
            config,
            global,
        } = task;
        let failed = |why: String| RelayedFit {
            mean: None,
            failure: Some(why),
            num_examples: 0,
            metrics: HashMap::new(),
            selected: 0,
            reported: 0,
            bytes_down: 0,
            bytes_up: 0,
        };
        if let Err(e) = self.wait_for_clients(round).await {
            return Ok(failed(format!("{e:#}")));
        }
        let clients: Vec<String> = self.candidates(false).into_iter().map(|c| c.id).collect();
        let broadcast = self.relay_broadcast(&global, model_version)?;
        let kind = PhaseKind::Fit {
            proximal_mu: config.proximal_mu,
            local_dp: None,
            secure: false,
        };
        // Before the phase opens: every task of it carries the parent's recipe.
        *lock(&self.relayed) = Some(Box::new(config));
        tokio::task::block_in_place(|| {
            self.begin_journal(kind, round, attempt, &global, clients.len(), &clients)
        })?;
        drop(global);
        let layout = Arc::new(Layout::new(&self.update_specs));
        let serial = self.open_phase(
            kind,
            round,
            attempt,
            model_version,
            broadcast,
            &clients,
            Some(Box::new(PartialMean::new(layout))),
        );
        self.wait_for_reports(serial, round, true).await;
        let fit = self.close_phase(serial, round);
        let combined = self.finish_aggregate(serial).await?;
        // The update goes to the parent; nothing here is resumed after a restart.
        self.clear_journal();
        let plan = FitPlan {
            clients,
            proximal_mu: 0.0,
            local_dp: None,
            count_whatever_arrives: false,
        };
        let failure = match (self.round_failure(&plan, &fit), &combined) {
            (Some(why), _) => Some(why),
            (None, Err(e)) => Some(e.clone()),
            (None, Ok(None)) => Some("no update arrived".to_string()),
            (None, Ok(Some(_))) => None,
        };
        let mut metrics = combine_fit_metrics(&fit.reports);
        // This level's failures and those of the aggregators below it.
        *metrics.entry("leaves_failed".into()).or_default() +=
            (fit.selected - fit.reports.len()) as f64;
        Ok(RelayedFit {
            mean: combined.ok().flatten().filter(|_| failure.is_none()),
            failure,
            num_examples: fit.reports.iter().map(|r| r.num_examples).sum(),
            metrics,
            selected: fit.selected,
            reported: fit.reports.len(),
            bytes_down: fit.stats.bytes_down.load(Ordering::Relaxed),
            bytes_up: fit.stats.bytes_up.load(Ordering::Relaxed),
        })
    }

    /// Runs the parent's evaluation of model `model_version` among the live clients.
    pub async fn relay_evaluate(
        &self,
        round: u64,
        model_version: u64,
        global: Arc<TensorSet>,
        personalize: Option<Personalize>,
    ) -> anyhow::Result<RelayedEvaluation> {
        *lock(&self.relayed_personalize) = personalize;
        let clients: Vec<String> = self.candidates(true).into_iter().map(|c| c.id).collect();
        if clients.is_empty() {
            return Ok(RelayedEvaluation {
                num_examples: 0,
                metrics: HashMap::new(),
                selected: 0,
                reported: 0,
            });
        }
        let broadcast = self.relay_broadcast(&global, model_version)?;
        drop(global);
        let serial = self.open_phase(
            PhaseKind::Evaluate,
            round,
            1,
            model_version,
            broadcast,
            &clients,
            None,
        );
        self.wait_for_reports(serial, round, false).await;
        let closed = self.close_phase(serial, round);
        let reports: Vec<EvalReport> = closed
            .reports
            .into_iter()
            .map(ClientReport::into_eval)
            .collect();
        // Combined as the parent combines them (`weighted_eval`), so the tree's figures are
        // the flat ones.
        let e = weighted_eval(&reports);
        let metrics = [
            ("loss", e.loss),
            ("accuracy", e.accuracy),
            ("precision", e.precision),
            ("recall", e.recall),
            ("f1", e.f1),
            ("personal_loss", e.personal_loss),
            ("personal_accuracy", e.personal_accuracy),
            ("personal_f1", e.personal_f1),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect();
        Ok(RelayedEvaluation {
            num_examples: e.examples,
            metrics,
            selected: closed.selected,
            reported: e.clients,
        })
    }

    /// The parent's model as this coordinator's clients receive it (`--compress-down` here).
    fn relay_broadcast(
        &self,
        global: &Arc<TensorSet>,
        model_version: u64,
    ) -> anyhow::Result<Arc<Broadcast>> {
        Ok(Arc::new(tokio::task::block_in_place(|| {
            Broadcast::share(
                global,
                model_version,
                &self.cfg().frozen,
                self.cfg().compression.down,
            )
        })?))
    }

    /// The parent's run is over (or this aggregator stops): clients are told why.
    pub async fn relay_finished(&self, reason: String) {
        lock(&self.state).enter(Phase::Finished { reason });
        self.changed.notify_waiters();
        self.wait_for_goodbyes().await;
    }
}

/// A training round's figures as one update carries them to the parent: each validation
/// figure weighted by validation examples (their sum is `val_examples`), every other figure
/// by training examples, times as the longest; counts (`val_examples`, `leaves_failed` of
/// aggregators below) summed; `contributors` counts the clients behind the update (an
/// aggregator below this one says how many it had).
fn combine_fit_metrics(reports: &[ClientReport]) -> HashMap<String, f64> {
    let mut sums: HashMap<String, (f64, f64)> = HashMap::new();
    let mut out = HashMap::new();
    for r in reports {
        let val_examples = r.metrics.get("val_examples").copied().unwrap_or(0.0);
        for (k, &v) in &r.metrics {
            match k.as_str() {
                "contributors" => {}
                "val_examples" | "leaves_failed" => *out.entry(k.clone()).or_insert(0.0) += v,
                k if k.ends_with("_ms") => {
                    let longest = out.entry(k.to_string()).or_insert(0.0);
                    *longest = f64::max(*longest, v);
                }
                k => {
                    let w = if k.starts_with("val_") {
                        val_examples
                    } else {
                        r.num_examples as f64
                    };
                    let s = sums.entry(k.to_string()).or_insert((0.0, 0.0));
                    s.0 += w * v;
                    s.1 += w;
                }
            }
        }
    }
    for (k, (s, w)) in sums {
        if w > 0.0 {
            out.insert(k, s / w);
        }
    }
    let contributors: u64 = reports.iter().map(ClientReport::contributors).sum();
    out.insert("contributors".into(), contributors as f64);
    out
}
