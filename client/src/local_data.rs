//! The client's private data: a training part and a validation part it never trains on.

use std::path::Path;

use anyhow::{Context, bail};
use fedtune_common::data::{DataFolder, ImageDataset, validation_split};
use fedtune_common::models::ModelSpec;

pub struct LocalData {
    /// The training pair (train-* when the folder has one).
    pub train: ImageDataset,
    /// Indices of `train` used for training.
    pub train_idx: Vec<usize>,
    /// Indices of `train` held out for validation (deterministic in the seed).
    pub val_idx: Vec<usize>,
    /// The folder's t10k-* pair, if any (evaluation only).
    pub test: Option<ImageDataset>,
}

impl LocalData {
    pub fn open(
        dir: &Path,
        label_column: &str,
        val_fraction: f64,
        seed: u64,
    ) -> anyhow::Result<Self> {
        if !(0.0..1.0).contains(&val_fraction) {
            bail!("--val-fraction must be in [0, 1), got {val_fraction}");
        }
        let folder = DataFolder::open_with(dir, label_column)
            .with_context(|| format!("cannot load local data from {}", dir.display()))?;
        if folder.train.len() < 2 {
            bail!(
                "{}: at least 2 training examples are needed (found {})",
                dir.display(),
                folder.train.len()
            );
        }
        let (train_idx, val_idx) = validation_split(folder.train.len(), val_fraction, seed);
        Ok(Self {
            train: folder.train,
            train_idx,
            val_idx,
            test: folder.test,
        })
    }

    pub fn check_fits(&self, spec: &ModelSpec) -> anyhow::Result<()> {
        spec.check_data(&self.train)
            .context("local data does not fit the coordinator's model")?;
        if let Some(test) = &self.test {
            spec.check_data(test)
                .context("local test data does not fit the coordinator's model")?;
        }
        Ok(())
    }
}
