//! The end of a tuning run: the table of every trial, and `best.toml`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::Trials;
use super::halving::Halving;
use super::log::{TrialResult, TuneLog};
use super::objective::Objective;
use super::space::Show;

pub const BEST: &str = "best.toml";

/// The base settings with the best trial's values and its rounds, as `serve --config` takes
/// them; written whole or not at all.
pub(super) fn write_best(
    trials: &Trials,
    out: &Path,
    best: &TrialResult,
    objective: Objective,
) -> anyhow::Result<PathBuf> {
    let mut params = best.params.clone();
    params.insert("rounds".into(), toml::Value::Integer(best.rounds as i64));
    let text = format!(
        "# Written by `fedtune-coordinator tune`: the base settings with the values of trial {} ({}),\n# {} {:.4} after {} rounds. Run it with `fedtune-coordinator serve --config {BEST}`.\n{}",
        best.trial,
        Show(&best.params),
        objective.name(),
        best.objective.unwrap_or(f64::NAN),
        best.rounds,
        trials.text(&params)?
    );
    // Checked as serve will check it.
    fedtune_settings::ServeFile::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = out.join(BEST);
    let tmp = out.join(format!("{BEST}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// One line per trial: its values, how far it went, its last figures.
pub(super) fn table(log: &TuneLog, halving: &Halving, best: u64) -> String {
    let mut out = String::from(
        "trial | rounds | val loss | val acc | val f1 | train loss | status | values\n",
    );
    let last_rung = halving.budgets.len() - 1;
    let mut trials: Vec<u64> = log.results.keys().map(|(t, _)| *t).collect();
    trials.dedup();
    for t in trials {
        let Some(r) = log
            .results
            .range((t, 0)..=(t, usize::MAX))
            .next_back()
            .map(|(_, r)| r)
        else {
            continue;
        };
        let f = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
        let status = if t == best {
            "best".to_string()
        } else if r.error.is_some() {
            "failed".to_string()
        } else if r.rung < last_rung {
            format!("stopped at rung {}", r.rung)
        } else {
            "finished".to_string()
        };
        let _ = writeln!(
            out,
            "{t:>5} | {:>6} | {:>8} | {:>7} | {:>6} | {:>10} | {status} | {}",
            r.rounds,
            f(r.fed_eval_loss, 4),
            r.fed_eval_accuracy
                .map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
            f(r.fed_eval_f1, 4),
            f(r.train_loss, 4),
            Show(&r.params)
        );
    }
    out
}
