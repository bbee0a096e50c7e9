//! The run's output folder: `global.safetensors` (rewritten atomically after every round) and
//! `metrics.jsonl` (one JSON object per round, appended and flushed as each round ends).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fedtune_common::checkpoint;
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::TensorSet;

use crate::round_record::RoundRecord;

pub const GLOBAL_FILE: &str = "global.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct RunDir {
    dir: PathBuf,
    metrics: File,
}

impl RunDir {
    /// Creates the folder. A `metrics.jsonl` left by an earlier run is kept, renamed with a
    /// timestamp, rather than appended to or overwritten.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
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
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("cannot open {}", metrics_path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            metrics,
        })
    }

    pub fn global_path(&self) -> PathBuf {
        self.dir.join(GLOBAL_FILE)
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join(METRICS_FILE)
    }

    /// Writes the global model after `round` (atomically) and appends the round's record.
    pub fn checkpoint(
        &mut self,
        global: &TensorSet,
        model: &ModelSpec,
        record: &RoundRecord,
    ) -> anyhow::Result<()> {
        let meta = HashMap::from([
            ("fedtune.round".to_string(), record.round.to_string()),
            ("fedtune.model".to_string(), model.kind.to_string()),
            (
                "fedtune.num_classes".to_string(),
                model.num_classes.to_string(),
            ),
            (
                "fedtune.model_version".to_string(),
                record.model_version.to_string(),
            ),
        ]);
        checkpoint::save(global, meta, &self.global_path())?;
        let line = serde_json::to_string(record)?;
        writeln!(self.metrics, "{line}")
            .and_then(|_| self.metrics.sync_data())
            .with_context(|| format!("cannot append to {}", self.metrics_path().display()))?;
        Ok(())
    }
}
