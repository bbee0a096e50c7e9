//! `fedtune-coordinator tune`: federated hyper-parameter search. Each trial is a short
//! federation with the base settings (`--config`) and its own values of the searched keys
//! (`--space`), run on the clients connected to this coordinator: they join once and stay
//! through every trial. Trials are scheduled by successive halving over rounds ([`halving`]),
//! drawn by a seeded random or TPE sampler ([`sampler`]) after trial 0, which runs the base
//! settings as they are (the baseline), and ranked by a federated validation figure of the
//! global model ([`objective`]: the loss, accuracy or macro F1 on every client's own held-out
//! data, never a test set the server holds). Everything is in `tune.jsonl` ([`log`]); the winner's settings are written as
//! `best.toml`, which `serve --config` takes. A tuning run killed at any point continues when
//! started again with the same command: finished rungs are read back, a trial in progress
//! continues from its last completed round.
//!
//! Layout of `--out`: `tune.jsonl`, `best.toml`, and `trials/<n>/` with the trial's settings
//! (`trial.toml`) and its run folder (`run/`: checkpoints and metrics.jsonl, as `serve` writes).

pub mod halving;
pub mod log;
pub mod objective;
mod report;
pub mod sampler;
pub mod space;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use fedtune_settings::ServeFile;
use tracing::{info, warn};

use self::halving::{Halving, promote};
use self::log::{Entry, Plan, TrialResult, TuneLog};
use self::objective::Objective;
use self::sampler::{Observation, Sampler, SamplerKind};
use self::space::{Assignment, Show, Space};
use crate::config::{ServeArgs, ServeConfig};
use crate::round::Federation;

#[derive(clap::Args, Debug, Clone)]
pub struct TuneArgs {
    /// The base settings (a `serve --config` file): every trial runs them with its own values
    /// of the searched keys. Its `listen`, TLS and client settings serve the whole search.
    #[arg(long)]
    pub config: PathBuf,
    /// Trials to start (each trains at least --min-rounds rounds).
    #[arg(long, default_value_t = 8)]
    pub trials: u64,
    /// A searched key and its distribution (repeatable): uniform(a,b), loguniform(a,b) or
    /// choice(v1,v2,...), e.g. 'lr=loguniform(1e-4,1e-2)' 'strategy=choice(fedavg,fedadam)'.
    #[arg(long = "space", required = true)]
    pub space: Vec<String>,
    /// How trials are drawn: random, or tpe (random for the first 6, then towards the best).
    #[arg(long, value_enum, default_value_t = SamplerKind::Tpe)]
    pub sampler: SamplerKind,
    /// Seed of the sampler: the same seed and results draw the same trials.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rounds every trial trains before the first cut.
    #[arg(long, default_value_t = 1)]
    pub min_rounds: u64,
    /// Rounds the best trials train at the end [default: the base settings' `rounds`].
    #[arg(long)]
    pub max_rounds: Option<u64>,
    /// At each cut the best 1/η of the trials go on, to η times the rounds.
    #[arg(long, default_value_t = 3)]
    pub eta: u64,
    /// What ranks the trials: the federated validation loss, accuracy or macro F1 of the
    /// global model, measured by every client on its own held-out data.
    #[arg(long, value_enum, default_value_t = Objective::Loss)]
    pub objective: Objective,
    /// Folder of the search: tune.jsonl, best.toml, trials/.
    #[arg(long, default_value = "tune")]
    pub out: PathBuf,
}

/// What a tuning run found.
#[derive(Debug, Clone)]
pub struct TuneOutcome {
    pub best_trial: u64,
    pub params: Assignment,
    pub objective: f64,
    pub best_toml: PathBuf,
    /// Stopped by a signal before the end (continue with the same command).
    pub stopped: bool,
}

/// The base settings and how a trial's are made from them.
struct Trials {
    base: toml::Table,
    out: PathBuf,
    evaluate_every: u64,
}

impl Trials {
    fn dir(&self, trial: u64) -> PathBuf {
        self.out.join("trials").join(trial.to_string())
    }

    /// The base settings with `params` written in, as a settings file's text.
    fn text(&self, params: &Assignment) -> anyhow::Result<String> {
        let mut table = self.base.clone();
        for (k, v) in params {
            table.insert(k.clone(), v.clone());
        }
        Ok(toml::to_string(&table)?)
    }

    /// Trial `trial`'s settings, checked as `serve --config` checks a file, to train up to
    /// `rounds` rounds with federated evaluation by every client at each rung's end.
    fn config(&self, trial: u64, params: &Assignment, rounds: u64) -> anyhow::Result<ServeConfig> {
        let text = self.text(params)?;
        let file = ServeFile::parse(&text)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("trial {trial} ({})", Show(params)))?;
        let dir = self.dir(trial);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("trial.toml"), &text)
            .with_context(|| format!("cannot write {}", dir.join("trial.toml").display()))?;
        let args = ServeArgs {
            out: Some(dir.join("run")),
            rounds: Some(rounds),
            fraction_evaluate: Some(1.0),
            evaluate_every: Some(self.evaluate_every),
            ..Default::default()
        };
        let mut cfg = args
            .resolve_with(file)
            .with_context(|| format!("trial {trial} ({})", Show(params)))?;
        // A trial continues its own run folder from rung to rung, whatever the base file says.
        (cfg.fresh, cfg.resume) = (false, false);
        Ok(cfg)
    }
}

/// Runs the search on `listener` until it has its answer, or `stop` says why to stop.
pub async fn tune_until(
    args: TuneArgs,
    stop: impl Future<Output = String> + Send + 'static,
) -> anyhow::Result<TuneOutcome> {
    let base_text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("--config {}: cannot read it", args.config.display()))?;
    let base: toml::Table = toml::from_str(&base_text)
        .with_context(|| format!("--config {}", args.config.display()))?;
    let space = Space::parse(&args.space)?;
    for p in &space.params {
        if base.contains_key(&p.key) {
            info!(
                "`{}` is set in {} and searched: the search's values replace it",
                p.key,
                args.config.display()
            );
        }
    }
    let base_rounds = ServeArgs {
        config: Some(args.config.clone()),
        ..Default::default()
    }
    .resolve()?
    .rounds;
    let halving = Halving::new(
        args.min_rounds,
        args.max_rounds.unwrap_or(base_rounds),
        args.eta,
    )?;
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    let plan = Plan {
        trials: args.trials,
        space: args.space.clone(),
        sampler: format!("{:?}", args.sampler).to_lowercase(),
        seed: args.seed,
        budgets: halving.budgets.clone(),
        eta: halving.eta,
        objective: args.objective,
        base: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(base_text.as_bytes())),
    };
    let mut log = TuneLog::open(&args.out, &plan)?;
    let trials = Trials {
        base,
        out: args.out.clone(),
        evaluate_every: halving.evaluate_every(),
    };
    // The base settings serve the whole search: address, TLS, clients, model.
    let first = trials.config(0, &Assignment::new(), halving.budgets[0])?;
    let specs = crate::initial_global(&first)?.specs();
    let listener = crate::bind(&first).await?;
    info!(
        "tuning on {}: {} trials over {} ({} sampler, seed {}), rounds {:?} with the best 1/{} going on; model {}; writing to {}",
        listener.local_addr()?,
        args.trials,
        args.space.join(" "),
        plan.sampler,
        args.seed,
        halving.budgets,
        halving.eta,
        first.model.kind,
        args.out.display()
    );
    let engine = Arc::new(Federation::for_tuning(first.clone(), specs));
    let serving = crate::server::start(&first, listener, engine.clone()).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None::<String>);
    tokio::spawn(async move {
        let why = stop.await;
        let _ = stop_tx.send(Some(why));
    });
    let runner = Runner {
        engine: engine.clone(),
        objective: args.objective,
        trials: &trials,
        stop: stop_rx,
    };
    let result = search(&runner, &mut log, &args, &halving, space).await;
    let outcome = match result {
        Ok(Some(best)) => {
            let best_toml = report::write_best(&trials, &args.out, &best, args.objective)?;
            log.append(&Entry::Best {
                trial: best.trial,
                rounds: best.rounds,
                objective: best.objective.unwrap_or(f64::NAN),
                params: best.params.clone(),
                best_toml: best_toml.clone(),
            })?;
            println!("{}", report::table(&log, &halving, best.trial));
            info!(
                "best: trial {} ({}), {} {:.4} after {} rounds; settings in {} (serve --config {})",
                best.trial,
                Show(&best.params),
                args.objective.name(),
                best.objective.unwrap_or(f64::NAN),
                best.rounds,
                best_toml.display(),
                best_toml.display()
            );
            engine
                .finish(format!(
                    "tuning done: trial {} is the best of {}",
                    best.trial, args.trials
                ))
                .await;
            TuneOutcome {
                best_trial: best.trial,
                objective: best.objective.unwrap_or(f64::NAN),
                params: best.params,
                best_toml,
                stopped: false,
            }
        }
        Ok(None) => {
            info!(
                "tuning stopped; run the same command again to continue from {}",
                args.out.join(log::FILE).display()
            );
            serving.shutdown().await;
            return Ok(TuneOutcome {
                best_trial: 0,
                params: Assignment::new(),
                objective: f64::NAN,
                best_toml: PathBuf::new(),
                stopped: true,
            });
        }
        Err(e) => {
            engine.finish(format!("tuning failed: {e:#}")).await;
            serving.shutdown().await;
            return Err(e);
        }
    };
    serving.shutdown().await;
    Ok(outcome)
}

/// Runs trials on the connected clients.
struct Runner<'a> {
    engine: Arc<Federation>,
    objective: Objective,
    trials: &'a Trials,
    stop: tokio::sync::watch::Receiver<Option<String>>,
}

/// Successive halving over the trials; `None` when stopped.
async fn search(
    runner: &Runner<'_>,
    log: &mut TuneLog,
    args: &TuneArgs,
    halving: &Halving,
    space: Space,
) -> anyhow::Result<Option<TrialResult>> {
    let sampler = Sampler::new(args.sampler, args.seed, space);
    // Rung 0: each trial drawn after the results of those before it (TPE learns from them).
    let mut history = Vec::new();
    let mut alive: Vec<u64> = Vec::new();
    for t in 0..args.trials {
        let r = match log.results.get(&(t, 0)) {
            Some(r) => r.clone(),
            None => {
                // Trial 0 is the base settings as they are: the baseline every draw must beat.
                let params = if t == 0 {
                    Assignment::new()
                } else {
                    sampler.sample(t, &history)
                };
                let Some(r) = runner.run(t, 0, params, halving.budgets[0]).await? else {
                    return Ok(None);
                };
                log.append(&Entry::Result(r.clone()))?;
                r
            }
        };
        history.push(Observation {
            values: r.params.clone(),
            objective: args.objective.score(r.objective),
        });
        alive.push(t);
    }
    for rung in 1..halving.budgets.len() {
        let promoted = decide(log, rung - 1, &alive, halving.keep(alive.len()))?;
        for &t in &promoted {
            if log.results.contains_key(&(t, rung)) {
                continue;
            }
            let params = result_of(log, t, rung - 1)?.params.clone();
            let Some(r) = runner.run(t, rung, params, halving.budgets[rung]).await? else {
                return Ok(None);
            };
            log.append(&Entry::Result(r))?;
        }
        alive = promoted;
    }
    let last = halving.budgets.len() - 1;
    let best = decide(log, last, &alive, 1)?;
    match best.first() {
        Some(&t) => Ok(Some(result_of(log, t, last)?.clone())),
        None => bail!("no trial reached the last rung; see {}", log::FILE),
    }
}

/// Trial `trial`'s result at `rung`, which a decision names; a log edited by hand may lack it.
fn result_of(log: &TuneLog, trial: u64, rung: usize) -> anyhow::Result<&TrialResult> {
    log.results.get(&(trial, rung)).with_context(|| {
        format!(
            "{} decides on trial {trial} at rung {rung} but holds no result of it: the file was edited or damaged; remove its decision lines to decide again",
            log::FILE
        )
    })
}

/// The trials of `rung` that go on (or, at the last rung, the best), as recorded, or decided
/// now and recorded. Fails when no trial of the rung has a figure for the objective.
fn decide(log: &mut TuneLog, rung: usize, alive: &[u64], keep: usize) -> anyhow::Result<Vec<u64>> {
    if let Some(p) = log.decisions.get(&rung) {
        return Ok(p.clone());
    }
    let scores: Vec<(u64, f64)> = alive
        .iter()
        .filter_map(|t| {
            let r = log.results.get(&(*t, rung))?;
            Some((*t, log.objective.score(r.objective)))
        })
        .collect();
    if scores.iter().all(|(_, s)| !s.is_finite()) {
        bail!(
            "no trial of rung {rung} has a {}: the clients need validation data (their --val-fraction above 0), and the trials must not all diverge; see {}",
            log.objective.name(),
            log::FILE
        );
    }
    let promoted = promote(&scores, keep);
    let stopped: Vec<u64> = alive
        .iter()
        .copied()
        .filter(|t| !promoted.contains(t))
        .collect();
    if rung + 1 == log.rungs {
        info!(
            "rung {rung}, the last: trial {promoted:?} is the best, {stopped:?} finished behind it"
        );
    } else {
        info!("rung {rung}: trials {promoted:?} go on, {stopped:?} stop here");
    }
    log.append(&Entry::Decision {
        rung,
        promoted: promoted.clone(),
        stopped,
    })?;
    Ok(promoted)
}

impl Runner<'_> {
    /// Trains trial `trial` up to `rounds` rounds (from its last checkpoint) and measures it;
    /// `None` when stopped.
    async fn run(
        &self,
        trial: u64,
        rung: usize,
        params: Assignment,
        rounds: u64,
    ) -> anyhow::Result<Option<TrialResult>> {
        let started = Instant::now();
        let failed = |e: anyhow::Error| {
            warn!("trial {trial} failed: {e:#}");
            TrialResult {
                trial,
                rung,
                rounds,
                params: params.clone(),
                objective: None,
                fed_eval_loss: None,
                fed_eval_accuracy: None,
                fed_eval_f1: None,
                train_loss: None,
                seconds: started.elapsed().as_secs_f64(),
                error: Some(format!("{e:#}")),
            }
        };
        // Settings the base file accepts can still be refused in combination (fedprox without
        // mu): the trial fails, the search goes on.
        let cfg = match self.trials.config(trial, &params, rounds) {
            Ok(cfg) => cfg,
            Err(e) => return Ok(Some(failed(e))),
        };
        info!(
            "trial {trial}, rung {rung} (to round {rounds}): {}",
            Show(&params)
        );
        let metrics = cfg.out.join("metrics.jsonl");
        if last_row(&metrics, rounds).is_none() {
            self.engine.set_run(cfg.clone(), &format!("t{trial}"));
            let opened = crate::initial_global(&cfg).and_then(|g| crate::open_run(&cfg, g));
            let (strategy, run_dir, start) = match opened {
                Ok(o) => o,
                Err(e) => return Ok(Some(failed(e))),
            };
            let mut stop = self.stop.clone();
            let stopped = async move {
                loop {
                    if let Some(why) = stop.borrow_and_update().clone() {
                        return why;
                    }
                    if stop.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            match self
                .engine
                .clone()
                .run_segment(start, strategy, run_dir, None, stopped)
                .await
            {
                Ok(s) if s.stopped => return Ok(None),
                Ok(_) => {}
                Err(e) => return Ok(Some(failed(e))),
            }
        }
        let Some(row) = last_row(&metrics, rounds) else {
            return Ok(Some(failed(anyhow::anyhow!(
                "{} has no round {rounds}",
                metrics.display()
            ))));
        };
        let num = |k: &str| row[k].as_f64().filter(|v| v.is_finite());
        Ok(Some(TrialResult {
            trial,
            rung,
            rounds,
            params,
            objective: num(self.objective.metric()),
            fed_eval_loss: num("fed_eval_loss"),
            fed_eval_accuracy: num("fed_eval_accuracy"),
            fed_eval_f1: num("fed_eval_f1"),
            train_loss: num("train_loss"),
            seconds: started.elapsed().as_secs_f64(),
            error: None,
        }))
    }
}

/// The metrics row of round `round` in a trial's metrics.jsonl, if it got there.
fn last_row(path: &Path, round: u64) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|row| row["round"].as_u64() == Some(round))
}
