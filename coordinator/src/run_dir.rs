//! The run's output folder, which is also what `--resume` continues from:
//!
//! - `global.safetensors`: the global model after the last completed round (metadata
//!   `fedtune.round`, `fedtune.model`, `fedtune.strategy`, `fedtune.checksum`, ...), rewritten
//!   atomically and durably: the commit point of a round;
//! - `global.previous.safetensors`: the round before's, kept so that a damaged latest model
//!   (a disk error, a truncated copy) costs one round instead of the run;
//! - `strategy-state.rN.safetensors`: the server state of a stateful strategy (momentum,
//!   moments, the privacy accountant) after round N, written before the model, so the state of
//!   each kept model exists; older ones are removed after the commit;
//! - `metrics.jsonl`: one JSON object per round, appended and synced before the commit; on
//!   resume, rows past the resumed round (a crash between the two writes) are dropped;
//! - `run.json`: the run's settings ([`crate::run_identity`]);
//! - `journal/`: the open round's accepted updates ([`crate::journal`]), removed at each
//!   commit.
//!
//! A new run never overwrites an earlier one: its files are moved to `earlier-runs/<time>/`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedtune_common::checkpoint;
use fedtune_common::models::{ModelSpec, hf_bert, lora};
use fedtune_common::pretrained;
use fedtune_common::tensors::TensorSet;

use crate::hf_export::{self, HfSources};
use crate::round_record::RoundRecord;

pub const GLOBAL_FILE: &str = "global.safetensors";
pub const PREVIOUS_FILE: &str = "global.previous.safetensors";
/// A latest model found damaged at resume, kept for inspection rather than deleted.
pub const DAMAGED_FILE: &str = "global.damaged.safetensors";
/// Where the files of earlier runs in the same folder are moved.
pub const EARLIER_RUNS: &str = "earlier-runs";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// With `--export-pytorch`: the global model with Linear weights as `[out, in]`.
pub const PYTORCH_FILE: &str = "global.pytorch.safetensors";

fn state_file(round: u64) -> String {
    format!("strategy-state.r{round}.safetensors")
}

pub struct RunDir {
    dir: PathBuf,
    strategy: String,
    metrics: File,
    export_pytorch: bool,
    hf_sources: Option<HfSources>,
}

/// What `--resume` found in the output folder.
pub struct Resumed {
    pub run_dir: RunDir,
    pub global: TensorSet,
    /// The last completed round.
    pub round: u64,
    pub strategy_state: Option<TensorSet>,
}

impl RunDir {
    /// Creates the folder for a new run. The files of an earlier run in it are moved to
    /// `earlier-runs/<time>/`, never appended to or overwritten.
    /// `keep_journal`: the open round's journal belongs to this run (the same settings died
    /// in round 1, before any checkpoint), so it stays.
    pub fn create(dir: &Path, strategy: &str, keep_journal: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
        if let Some(moved) = move_earlier_run(dir, keep_journal)? {
            tracing::warn!(
                "{} held an earlier run: its files are now in {}",
                dir.display(),
                moved.display()
            );
        }
        Self::open(dir, strategy)
    }

    fn open(dir: &Path, strategy: &str) -> anyhow::Result<Self> {
        let metrics_path = dir.join(METRICS_FILE);
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("cannot open {}", metrics_path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            strategy: strategy.to_string(),
            metrics,
            export_pytorch: false,
            hf_sources: None,
        })
    }

    /// Opens the folder of an earlier run to continue it: the latest model that reads back
    /// whole (its checksum) with its strategy state — the round before's when the latest is
    /// damaged, with a warning naming the file —, and `metrics.jsonl` cut back to that round.
    pub fn resume(
        dir: &Path,
        model: &ModelSpec,
        strategy: &str,
        stateful: bool,
    ) -> anyhow::Result<Resumed> {
        let mut unusable: Vec<(PathBuf, anyhow::Error)> = Vec::new();
        let mut found = None;
        for name in [GLOBAL_FILE, PREVIOUS_FILE] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            match read_commit(&path, model, strategy, stateful)? {
                Ok(commit) => {
                    found = Some(commit);
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        "{} cannot be resumed from: {e:#}; trying the round before",
                        path.display()
                    );
                    unusable.push((path, e));
                }
            }
        }
        let Some(commit) = found else {
            if unusable.is_empty() {
                bail!(
                    "{} holds no completed round ({GLOBAL_FILE} does not exist): nothing to resume",
                    dir.display()
                );
            }
            let why: Vec<String> = unusable
                .iter()
                .map(|(p, e)| format!("{}: {e:#}", p.display()))
                .collect();
            bail!(
                "no model in {} can be resumed from ({}); run with --fresh to start over (the damaged run is moved to {EARLIER_RUNS}/)",
                dir.display(),
                why.join("; ")
            );
        };
        let global_path = dir.join(GLOBAL_FILE);
        if commit.path != global_path && global_path.exists() {
            let kept = dir.join(DAMAGED_FILE);
            std::fs::rename(&global_path, &kept).with_context(|| {
                format!("cannot move the damaged {} aside", global_path.display())
            })?;
            tracing::warn!(
                "resuming from {} (round {}), the round before the damaged {}; that file is kept as {}",
                commit.path.display(),
                commit.round,
                global_path.display(),
                kept.display()
            );
        }
        truncate_metrics(&dir.join(METRICS_FILE), commit.round)?;
        Ok(Resumed {
            run_dir: Self::open(dir, strategy)?,
            global: commit.global,
            round: commit.round,
            strategy_state: commit.state,
        })
    }

    /// Also write the model in PyTorch's layout with every checkpoint; for a text model (with
    /// `hf` sources) also the Hugging Face folders of [`crate::hf_export`].
    pub fn with_pytorch_export(mut self, on: bool, hf: Option<HfSources>) -> Self {
        self.export_pytorch = on;
        self.hf_sources = hf.filter(|_| on);
        self
    }

    pub fn global_path(&self) -> PathBuf {
        self.dir.join(GLOBAL_FILE)
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join(METRICS_FILE)
    }

    /// Records a completed round: the strategy's state, the metrics row, then the model (the
    /// commit; the one it replaces becomes `global.previous.safetensors`), then removes the
    /// state of the round before that, which no kept model needs.
    pub fn checkpoint(
        &mut self,
        global: &TensorSet,
        model: &ModelSpec,
        record: &RoundRecord,
        strategy_state: Option<&TensorSet>,
    ) -> anyhow::Result<()> {
        let round = record.round.to_string();
        if let Some(state) = strategy_state {
            let meta = HashMap::from([
                ("fedtune.round".to_string(), round.clone()),
                ("fedtune.strategy".to_string(), self.strategy.clone()),
            ]);
            checkpoint::save(state, meta, &self.dir.join(state_file(record.round)))?;
        }
        let line = serde_json::to_string(record)?;
        writeln!(self.metrics, "{line}")
            .and_then(|_| self.metrics.sync_data())
            .with_context(|| format!("cannot append to {}", self.metrics_path().display()))?;
        let meta = HashMap::from([
            ("fedtune.round".to_string(), round),
            ("fedtune.model".to_string(), model.kind.to_string()),
            (
                "fedtune.num_classes".to_string(),
                model.num_classes.to_string(),
            ),
            (
                "fedtune.model_version".to_string(),
                record.model_version.to_string(),
            ),
            ("fedtune.strategy".to_string(), self.strategy.clone()),
        ]);
        match (&self.hf_sources, self.export_pytorch) {
            // A text model from a Hugging Face folder: a whole folder `transformers` loads.
            (Some(sources), true) => {
                hf_export::write(&self.dir, global, model, sources, record.round)?
            }
            (None, true) => {
                let mut meta = meta.clone();
                meta.insert("fedtune.layout".into(), "pytorch".into());
                checkpoint::save(
                    &pytorch_export(global, model)?,
                    meta,
                    &self.dir.join(PYTORCH_FILE),
                )?;
            }
            (_, false) => {}
        }
        fedtune_common::crash_point::reached("checkpoint");
        // The model being replaced stays one more round, as the fallback if this one is ever
        // found damaged (a rename: a crash in between leaves it, and resume finds it).
        let global_path = self.global_path();
        if global_path.exists() {
            let previous = self.dir.join(PREVIOUS_FILE);
            std::fs::rename(&global_path, &previous).with_context(|| {
                format!(
                    "cannot keep {} as {}",
                    global_path.display(),
                    previous.display()
                )
            })?;
        }
        checkpoint::save(global, meta, &global_path)?;
        if record.round > 2 {
            let old = self.dir.join(state_file(record.round - 2));
            if old.exists()
                && let Err(e) = std::fs::remove_file(&old)
            {
                tracing::warn!("cannot remove {}: {e}", old.display());
            }
        }
        Ok(())
    }
}

/// A committed model and the state of its round, read back whole.
struct Commit {
    path: PathBuf,
    global: TensorSet,
    round: u64,
    state: Option<TensorSet>,
}

/// Reads the model at `path` and its round's strategy state. The outer error refuses the
/// resume (another model or strategy: no fallback would fit); the inner one says this file
/// cannot be used (damaged, unreadable, its state missing), so the round before is tried.
fn read_commit(
    path: &Path,
    model: &ModelSpec,
    strategy: &str,
    stateful: bool,
) -> anyhow::Result<anyhow::Result<Commit>> {
    let (global, meta) = match checkpoint::load(path) {
        Ok(loaded) => loaded,
        Err(e) => return Ok(Err(e.into())),
    };
    let field = |k: &str| meta.get(k).map(String::as_str).unwrap_or("");
    let Ok(round) = field("fedtune.round").parse::<u64>() else {
        return Ok(Err(anyhow::anyhow!(
            "no valid `fedtune.round` metadata (not written by a fedtune run)"
        )));
    };
    let want_model = model.kind.to_string();
    if field("fedtune.model") != want_model
        || field("fedtune.num_classes") != model.num_classes.to_string()
    {
        bail!(
            "{} holds model `{}` with {} classes, this run asks for `{want_model}` with {}; use the same --model / --num-classes, or --fresh to start over",
            path.display(),
            field("fedtune.model"),
            field("fedtune.num_classes"),
            model.num_classes
        );
    }
    let saved_strategy = field("fedtune.strategy");
    if saved_strategy != strategy {
        bail!(
            "the run in {} used strategy `{saved_strategy}`, this run asks for `{strategy}`; use the same --strategy (server state cannot be carried across strategies), or --fresh to start over",
            path.parent().unwrap_or(Path::new(".")).display()
        );
    }
    let state = if stateful {
        let state_path = path.with_file_name(state_file(round));
        match checkpoint::load(&state_path) {
            Ok((state, meta)) if meta.get("fedtune.round") == Some(&round.to_string()) => {
                Some(state)
            }
            Ok(_) => {
                return Ok(Err(anyhow::anyhow!(
                    "{} is not the server state of round {round}",
                    state_path.display()
                )));
            }
            Err(e) => {
                return Ok(Err(anyhow::Error::new(e)
                    .context(format!("the {strategy} server state of round {round}"))));
            }
        }
    } else {
        None
    };
    Ok(Ok(Commit {
        path: path.to_path_buf(),
        global,
        round,
        state,
    }))
}

/// Moves the files of an earlier run in `dir` to `earlier-runs/<time>/`; `None` when there
/// was no earlier run. Server state alone (no model: a crash before the first commit) is
/// removed instead: it belongs to no model.
fn move_earlier_run(dir: &Path, keep_journal: bool) -> anyhow::Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read output folder {}", dir.display()))?;
    let mut run_files = Vec::new();
    let mut states = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_state = name.starts_with("strategy-state.r") && name.ends_with(".safetensors");
        let is_run = [
            GLOBAL_FILE,
            PREVIOUS_FILE,
            DAMAGED_FILE,
            PYTORCH_FILE,
            METRICS_FILE,
            crate::run_identity::RUN_FILE,
            hf_export::MODEL_DIR,
            hf_export::ADAPTER_DIR,
        ]
        .contains(&name.as_str())
            || (name == crate::journal::JOURNAL_DIR && !keep_journal);
        if is_state {
            states.push(e.path());
        } else if is_run {
            run_files.push(e.path());
        }
    }
    let has_results = run_files.iter().any(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        name != crate::run_identity::RUN_FILE
            && !(name == METRICS_FILE && p.metadata().map(|m| m.len() == 0).unwrap_or(false))
    });
    if !has_results {
        for p in states.iter().chain(&run_files) {
            let removed = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            if let Err(e) = removed {
                tracing::warn!("cannot remove {}: {e}", p.display());
            }
        }
        return Ok(None);
    }
    let stamp = time::OffsetDateTime::now_utc();
    let base = format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        stamp.year(),
        u8::from(stamp.month()),
        stamp.day(),
        stamp.hour(),
        stamp.minute(),
        stamp.second()
    );
    let earlier = dir.join(EARLIER_RUNS);
    let mut dest = earlier.join(&base);
    let mut n = 1;
    while dest.exists() {
        n += 1;
        dest = earlier.join(format!("{base}-{n}"));
    }
    std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    for p in run_files.iter().chain(&states) {
        if let Some(name) = p.file_name() {
            std::fs::rename(p, dest.join(name))
                .with_context(|| format!("cannot move {} to {}", p.display(), dest.display()))?;
        }
    }
    checkpoint::sync_parent(&dest.join("x"))
        .and_then(|_| checkpoint::sync_parent(&dir.join("x")))
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(Some(dest))
}

/// The global model for PyTorch: Linear weights `[out, in]`; a text model also merged (LoRA
/// folded into the base weights) under Hugging Face's BERT names, which `transformers` loads.
fn pytorch_export(global: &TensorSet, model: &ModelSpec) -> anyhow::Result<TensorSet> {
    if !model.is_text() {
        return Ok(pretrained::to_pytorch_layout(global));
    }
    let merged = match &model.lora {
        Some(lora) => lora::merge(global, lora.scale()).map_err(anyhow::Error::msg)?,
        None => global.clone(),
    };
    hf_bert::to_hf(&merged).map_err(anyhow::Error::msg)
}

/// Keeps the rows of rounds ≤ `round` (rewritten atomically).
fn truncate_metrics(path: &Path, round: u64) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut kept = String::new();
    let mut dropped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // A row cut short (the process killed while appending it) or damaged is dropped with
        // a warning: the metrics must not stop a run from resuming.
        let row = serde_json::from_str::<serde_json::Value>(line).ok();
        match row
            .as_ref()
            .and_then(|r| r.get("round"))
            .and_then(|r| r.as_u64())
        {
            Some(r) if r <= round => {
                kept.push_str(line);
                kept.push('\n');
            }
            Some(_) => dropped += 1,
            None => {
                tracing::warn!(
                    "{} line {}: not a whole metrics row (cut short or damaged); dropped",
                    path.display(),
                    i + 1
                );
            }
        }
    }
    if dropped > 0 {
        tracing::warn!(
            "{}: dropped {dropped} row(s) past round {round}, the last committed round",
            path.display()
        );
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept)
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot rewrite {}", path.display()))
}
