//! `tune.jsonl`: everything a tuning run did, one JSON object a line, appended and flushed to
//! disk as it happens. It is also what a restarted `tune` continues from: the trials' values
//! and results are read back, the sampler draws the rest exactly as it would have, and trials
//! continue from their own checkpoints.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::objective::Objective;
use super::space::Assignment;

pub const FILE: &str = "tune.jsonl";

/// One line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// What the run searches and how: a restart with other settings is refused.
    Start(Plan),
    /// A trial reached the end of a rung.
    Result(TrialResult),
    /// A rung decided: who goes on, who stops here.
    Decision {
        rung: usize,
        promoted: Vec<u64>,
        stopped: Vec<u64>,
    },
    /// The tuning run's answer.
    Best {
        trial: u64,
        rounds: u64,
        objective: f64,
        params: Assignment,
        best_toml: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub trials: u64,
    pub space: Vec<String>,
    pub sampler: String,
    pub seed: u64,
    pub budgets: Vec<u64>,
    pub eta: u64,
    /// What ranks the trials (a log written before the choice existed ranked by the loss).
    #[serde(default)]
    pub objective: Objective,
    /// The base settings file, as read (xxh3 of its text).
    pub base: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialResult {
    pub trial: u64,
    pub rung: usize,
    /// Rounds trained so far.
    pub rounds: u64,
    pub params: Assignment,
    /// The plan's objective: a federated validation figure of the global model after
    /// `rounds` (clients' own held-out data); `None` when the trial diverged or failed.
    pub objective: Option<f64>,
    #[serde(default)]
    pub fed_eval_loss: Option<f64>,
    pub fed_eval_accuracy: Option<f64>,
    #[serde(default)]
    pub fed_eval_f1: Option<f64>,
    pub train_loss: Option<f64>,
    /// Wall time of this rung's rounds.
    pub seconds: f64,
    /// Why the trial failed, when it did.
    pub error: Option<String>,
}

/// The log, open for appending, with what it held when opened.
pub struct TuneLog {
    file: File,
    path: PathBuf,
    pub results: BTreeMap<(u64, usize), TrialResult>,
    pub decisions: BTreeMap<usize, Vec<u64>>,
    /// Rungs of the plan.
    pub rungs: usize,
    /// What ranks the trials.
    pub objective: Objective,
}

impl TuneLog {
    /// Opens `dir/tune.jsonl`, starting it with `plan` or, when it exists, checking it was
    /// written for the same plan and reading what it holds.
    pub fn open(dir: &Path, plan: &Plan) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the tuning folder {}", dir.display()))?;
        let path = dir.join(FILE);
        let mut results = BTreeMap::new();
        let mut decisions = BTreeMap::new();
        let existed = path.exists();
        if existed {
            let reader = BufReader::new(
                File::open(&path).with_context(|| format!("cannot read {}", path.display()))?,
            );
            for (i, line) in reader.lines().enumerate() {
                let line = line.with_context(|| format!("cannot read {}", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let entry: Entry = match serde_json::from_str(&line) {
                    Ok(e) => e,
                    // A line cut by a crash mid-write is the last one: what it said is redone.
                    Err(_) if i > 0 => {
                        tracing::warn!("{} line {}: incomplete, ignored", path.display(), i + 1);
                        continue;
                    }
                    Err(e) => bail!("{} line 1 is not a tuning plan: {e}", path.display()),
                };
                match entry {
                    Entry::Start(then) if i == 0 => {
                        if &then != plan {
                            bail!(
                                "{} holds a tuning run with other settings ({}); run with the same --config, --trials, --space, --sampler, --seed, --min-rounds, --max-rounds, --eta and --objective to continue it, or choose another --out",
                                path.display(),
                                differences(&then, plan)
                            );
                        }
                    }
                    Entry::Start(_) => bail!("{} line {}: a second plan", path.display(), i + 1),
                    Entry::Result(r) => {
                        results.insert((r.trial, r.rung), r);
                    }
                    Entry::Decision { rung, promoted, .. } => {
                        decisions.insert(rung, promoted);
                    }
                    Entry::Best { .. } => {}
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut log = Self {
            file,
            path,
            results,
            decisions,
            rungs: plan.budgets.len(),
            objective: plan.objective,
        };
        if !existed {
            log.append(&Entry::Start(plan.clone()))?;
        }
        Ok(log)
    }

    pub fn append(&mut self, entry: &Entry) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(entry)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        match entry {
            Entry::Result(r) => {
                self.results.insert((r.trial, r.rung), r.clone());
            }
            Entry::Decision { rung, promoted, .. } => {
                self.decisions.insert(*rung, promoted.clone());
            }
            _ => {}
        }
        Ok(())
    }
}

fn differences(a: &Plan, b: &Plan) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return String::new();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} → {}", b.get(k).cloned().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("; ")
}
