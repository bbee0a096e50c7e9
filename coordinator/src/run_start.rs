//! Whether `serve` starts a new run or continues the one in `--out`. An unfinished run with
//! the same settings (`run.json`) is resumed by itself — restarting a crashed coordinator is
//! running the same command again; one with other settings is refused naming what changed;
//! `--fresh` starts over and moves the earlier run aside. A run is never silently
//! overwritten.

use anyhow::bail;
use tracing::warn;

use crate::config::ServeConfig;
use crate::run_dir::{EARLIER_RUNS, GLOBAL_FILE, PREVIOUS_FILE, Resumed, RunDir};
use crate::run_identity::{RUN_FILE, RunIdentity};

pub enum RunStart {
    /// A new run from round 1.
    Fresh(RunDir),
    /// An earlier run continued after its last good checkpoint.
    Resume(Resumed),
}

pub fn open(cfg: &ServeConfig, strategy: &str, stateful: bool) -> anyhow::Result<RunStart> {
    let dir = &cfg.out;
    let now = RunIdentity::of(cfg);
    if cfg.fresh && cfg.resume {
        bail!(
            "--fresh asks for a new run and `resume` (in the config file) for continuing one; drop one of them"
        );
    }
    let committed = dir.join(GLOBAL_FILE).is_file() || dir.join(PREVIOUS_FILE).is_file();
    if cfg.fresh || !committed {
        if cfg.resume {
            bail!(
                "--resume: {} holds no completed round ({GLOBAL_FILE} does not exist): nothing to resume (start without --resume)",
                dir.display()
            );
        }
        // The same settings died in round 1 (nothing committed yet): its journal carries on.
        let same_run = !cfg.fresh
            && matches!(RunIdentity::read(dir), Ok(Some(then)) if then.changes(&now).is_empty());
        let run = RunDir::create(dir, strategy, same_run)?;
        now.write(dir)?;
        return Ok(RunStart::Fresh(run));
    }
    let known = match RunIdentity::read(dir) {
        Ok(Some(then)) => {
            let changes = then.changes(&now);
            if !changes.is_empty() {
                bail!(
                    "{} holds a run with other settings ({}); run with the same settings to resume it, or with --fresh to start a new run (the earlier one is moved to {}/{EARLIER_RUNS}/)",
                    dir.display(),
                    changes.join("; "),
                    dir.display()
                );
            }
            true
        }
        Ok(None) => {
            warn!(
                "{} has no {RUN_FILE} (an older fedtune wrote it): only its model and strategy can be checked before resuming",
                dir.display()
            );
            false
        }
        Err(e) => bail!(
            "{e:#}; put the file back, or run with --fresh to start a new run (the earlier one is moved to {}/{EARLIER_RUNS}/)",
            dir.display()
        ),
    };
    let resumed = RunDir::resume(dir, &cfg.model, strategy, stateful)?;
    if resumed.round >= cfg.rounds {
        bail!(
            "the run in {} already completed {} of {} rounds; raise --rounds to continue it, or run with --fresh to start a new one",
            dir.display(),
            resumed.round,
            cfg.rounds
        );
    }
    if !known {
        now.write(dir)?;
    }
    // Said by the caller, once the model and server state are restored (`crate::open_run`).
    Ok(RunStart::Resume(resumed))
}
