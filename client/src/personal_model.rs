//! Ditto (Li et al. 2021) on the client: its personal model vᵢ, kept in the state folder
//! (`<state dir>/ditto-personal.<key>.safetensors`, per federation run: see
//! [`crate::state_files`]) across rounds and restarts. Each evaluation task continues it from
//! where the last one left it (from the global model the first time), trains it a few steps
//! on the local data pulled towards the new global model by λ/2·‖v − w‖², evaluates it, and
//! keeps it. The personal model never leaves the client; the global model is not changed by it.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use fedtune_common::checkpoint;
use fedtune_common::tensors::{TensorSet, TensorSpec};
use tracing::info;

use crate::state_files::{KEY, keyed_file, load_for, prune};

const PREFIX: &str = "ditto-personal.";

/// Where this client keeps its personal models.
#[derive(Debug, Clone)]
pub struct PersonalStore {
    dir: PathBuf,
}

impl PersonalStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The file of the personal model kept for federation `key`.
    pub fn file(&self, key: &str) -> PathBuf {
        keyed_file(&self.dir, PREFIX, key)
    }

    /// The personal model kept for `key`, if one is and it fits `specs` (the model's); `None`
    /// (said in the log when a file is there but cannot be used) starts from the global model.
    pub fn kept(&self, key: &str, specs: &[TensorSpec]) -> Option<TensorSet> {
        let path = self.file(key);
        let kept = load_for(&path, key, specs, "the personal model")?;
        info!("continuing the personal model kept in {}", path.display());
        Some(kept)
    }

    /// Keeps `personal` as this client's personal model for `key` (written whole or not at
    /// all).
    pub fn keep(&self, key: &str, personal: &TensorSet) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| {
            format!(
                "cannot create the client state folder {} (--state-dir)",
                self.dir.display()
            )
        })?;
        let path = self.file(key);
        let meta = HashMap::from([(KEY.to_string(), key.to_string())]);
        checkpoint::save(personal, meta, &path).with_context(|| {
            format!(
                "cannot keep the personal model in {} (--state-dir)",
                path.display()
            )
        })?;
        prune(&self.dir, PREFIX, "");
        Ok(())
    }
}
