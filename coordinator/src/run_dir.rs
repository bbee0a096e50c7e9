//! The run's output folder, which is also what `--resume` continues from:
//!
//! - `global.safetensors`: the global model after the last completed round (metadata
//!   `fedtune.round`, `fedtune.model`, `fedtune.strategy`, ...), rewritten atomically: the
//!   commit point of a round;
//! - `strategy-state.rN.safetensors`: the server state of a stateful strategy (momentum,
//!   moments) after round N, written before the model, so the state of the committed round
//!   always exists; older ones are removed after the commit;
//! - `metrics.jsonl`: one JSON object per round, appended and synced before the commit; on
//!   resume, rows past the committed round (a crash between the two writes) are dropped.

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
    /// Creates the folder for a new run. A `metrics.jsonl` left by an earlier run is kept,
    /// renamed with a timestamp, rather than appended to or overwritten.
    pub fn create(dir: &Path, strategy: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
        let metrics_path = dir.join(METRICS_FILE);
        if metrics_path.exists() {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let kept = dir.join(format!("metrics.{stamp}.jsonl"));
            std::fs::rename(&metrics_path, &kept).with_context(|| {
                format!("cannot move the previous {} aside", metrics_path.display())
            })?;
            tracing::warn!(
                "{} holds an earlier run's metrics: moved to {}",
                dir.display(),
                kept.display()
            );
        }
        // Server state of an earlier run in this folder would be mistaken for this run's.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("strategy-state.r") && name.ends_with(".safetensors") {
                    tracing::warn!(
                        "removing {name}, the server state of an earlier run in {}",
                        dir.display()
                    );
                    let _ = std::fs::remove_file(e.path());
                }
            }
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

    /// Opens the folder of an earlier run to continue it: the committed model, its round, the
    /// strategy's state of that round, and `metrics.jsonl` cut back to that round.
    pub fn resume(
        dir: &Path,
        model: &ModelSpec,
        strategy: &str,
        stateful: bool,
    ) -> anyhow::Result<Resumed> {
        let global_path = dir.join(GLOBAL_FILE);
        if !global_path.is_file() {
            bail!(
                "--resume: {} does not exist; nothing to resume in {} (start without --resume)",
                global_path.display(),
                dir.display()
            );
        }
        let (global, meta) = checkpoint::load(&global_path)?;
        let field = |k: &str| meta.get(k).map(String::as_str).unwrap_or("");
        let round: u64 = field("fedtune.round").parse().with_context(|| {
            format!(
                "--resume: {} has no valid `fedtune.round` metadata (it was not written by a fedtune run)",
                global_path.display()
            )
        })?;
        let want_model = model.kind.to_string();
        if field("fedtune.model") != want_model
            || field("fedtune.num_classes") != model.num_classes.to_string()
        {
            bail!(
                "--resume: {} holds model `{}` with {} classes, this run asks for `{want_model}` with {}; use the same --model / --num-classes",
                global_path.display(),
                field("fedtune.model"),
                field("fedtune.num_classes"),
                model.num_classes
            );
        }
        let saved_strategy = field("fedtune.strategy");
        if saved_strategy != strategy {
            bail!(
                "--resume: the run in {} used strategy `{saved_strategy}`, this run asks for `{strategy}`; use the same --strategy (server state cannot be carried across strategies)",
                dir.display()
            );
        }
        let strategy_state = if stateful {
            let path = dir.join(state_file(round));
            let (state, meta) = checkpoint::load(&path).with_context(|| {
                format!("--resume: the {strategy} server state of round {round} is missing")
            })?;
            if meta.get("fedtune.round").map(String::as_str) != Some(&round.to_string()) {
                bail!(
                    "--resume: {} is not the state of round {round}",
                    path.display()
                );
            }
            Some(state)
        } else {
            None
        };
        truncate_metrics(&dir.join(METRICS_FILE), round)?;
        Ok(Resumed {
            run_dir: Self::open(dir, strategy)?,
            global,
            round,
            strategy_state,
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
    /// commit), then removes the previous state.
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
        checkpoint::save(global, meta, &self.global_path())?;
        if record.round > 1 {
            let old = self.dir.join(state_file(record.round - 1));
            if old.exists()
                && let Err(e) = std::fs::remove_file(&old)
            {
                tracing::warn!("cannot remove {}: {e}", old.display());
            }
        }
        Ok(())
    }
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
        let row: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        match row.get("round").and_then(|r| r.as_u64()) {
            Some(r) if r <= round => {
                kept.push_str(line);
                kept.push('\n');
            }
            Some(_) => dropped += 1,
            None => bail!("{} line {}: no `round` field", path.display(), i + 1),
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
