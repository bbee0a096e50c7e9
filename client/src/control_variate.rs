//! SCAFFOLD on the client: its control variate cᵢ, kept on disk across rounds and restarts,
//! and the round's correction and new variate (see `fedtune_common::control_variate` for the
//! correction itself, and the coordinator's `strategy::scaffold` for the whole algorithm).
//!
//! The variate lives in `<state dir>/scaffold-variate.<key>.safetensors`, one file per
//! federation run (the key the task names; see [`crate::state_files`]). The round's new
//! variate is written beside it first (`.pending`) and replaces it only once the coordinator
//! counted the update, so a refused or lost update leaves cᵢ as the server assumes
//! it is: the server's c moves only by counted updates.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedtune_common::checkpoint;
use fedtune_common::control_variate::server_variate_of;
use fedtune_common::tensors::{NamedTensor, TensorSet, TensorSpec};

use crate::state_files::{KEY, keyed_file, load_for, prune};

const PREFIX: &str = "scaffold-variate.";
const PENDING: &str = "scaffold-variate.pending.safetensors";
const TASK: &str = "fedtune.task";

/// The file of the variate kept for federation `key`.
pub fn variate_file(dir: &Path, key: &str) -> PathBuf {
    keyed_file(dir, PREFIX, key)
}

/// Where this client keeps its control variate.
#[derive(Debug, Clone)]
pub struct VariateStore {
    dir: PathBuf,
}

/// One SCAFFOLD round on the client: c and cᵢ over the trainable tensors.
pub struct RoundVariates {
    pub key: String,
    /// The server's c, as downloaded (model tensor names).
    pub server: TensorSet,
    /// This client's cᵢ.
    pub own: TensorSet,
}

impl VariateStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Splits a download into the model and the server variate (renamed to model tensor
    /// names), and reads this client's variate for the federation `key` over the same tensors.
    pub fn begin(
        &self,
        key: &str,
        downloaded: TensorSet,
    ) -> anyhow::Result<(TensorSet, RoundVariates)> {
        let (mut model, mut server) = (Vec::new(), Vec::new());
        for t in downloaded.into_tensors() {
            match server_variate_of(&t.name) {
                Some(name) => server.push(NamedTensor {
                    name: name.to_string(),
                    ..t
                }),
                None => model.push(t),
            }
        }
        let server = TensorSet::new(server)?;
        let own = self.load(key, &server.specs());
        Ok((
            TensorSet::new(model)?,
            RoundVariates {
                key: key.to_string(),
                server,
                own,
            },
        ))
    }

    /// cᵢ for `key` over `specs`; zero when none is kept for this federation, or what is kept
    /// cannot be used (said in the log: the variate only steers training, so starting it again
    /// costs some drift correction, not data).
    fn load(&self, key: &str, specs: &[TensorSpec]) -> TensorSet {
        let path = variate_file(&self.dir, key);
        load_for(&path, key, specs, "the SCAFFOLD variate").unwrap_or_else(|| zeros(specs))
    }

    /// Writes the round's new variate aside until its update is counted.
    pub fn stage(&self, task_id: &str, key: &str, next: &TensorSet) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| {
            format!(
                "cannot create the client state folder {} (--state-dir)",
                self.dir.display()
            )
        })?;
        let meta = [(KEY, key), (TASK, task_id)]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        checkpoint::save(next, meta, &self.dir.join(PENDING))
            .context("cannot write the SCAFFOLD variate (--state-dir)")
    }

    /// The update of `task_id` was counted: its variate becomes this client's.
    pub fn commit(&self, task_id: &str) -> anyhow::Result<()> {
        let pending = self.dir.join(PENDING);
        let (staged_for, key) = match checkpoint::load(&pending) {
            Ok((_, meta)) => (meta.get(TASK).cloned(), meta.get(KEY).cloned()),
            Err(_) => (None, None),
        };
        let (Some(key), true) = (key, staged_for.as_deref() == Some(task_id)) else {
            return Ok(());
        };
        let path = variate_file(&self.dir, &key);
        std::fs::rename(&pending, &path)
            .and_then(|()| checkpoint::sync_parent(&path))
            .with_context(|| format!("cannot keep the SCAFFOLD variate in {}", path.display()))?;
        prune(&self.dir, PREFIX, PENDING);
        Ok(())
    }

    /// The update was refused: the staged variate must not be kept.
    pub fn discard(&self) {
        let _ = std::fs::remove_file(self.dir.join(PENDING));
    }
}

impl RoundVariates {
    /// c − cᵢ for every tensor of the model (zero for the ones that do not train).
    pub fn correction(&self, model: &TensorSet) -> anyhow::Result<TensorSet> {
        let mut out = model.clone();
        for (name, values) in out.values_mut() {
            match (self.server.get(name), self.own.get(name)) {
                (Some(c), Some(ci)) => {
                    for ((v, c), ci) in values.iter_mut().zip(&c.data).zip(&ci.data) {
                        *v = c - ci;
                    }
                }
                _ => values.fill(0.0),
            }
        }
        Ok(out)
    }

    /// cᵢ⁺ = cᵢ − c − Δ/a, over the tensors of the update `delta` (SCAFFOLD option II).
    pub fn next(&self, delta: &TensorSet, step_weight: f64) -> anyhow::Result<TensorSet> {
        anyhow::ensure!(
            step_weight.is_finite() && step_weight > 0.0,
            "local training made no step (step weight {step_weight}); SCAFFOLD cannot update this client's variate"
        );
        let mut next = self.own.clone();
        for (name, values) in next.values_mut() {
            let (Some(c), Some(d)) = (self.server.get(name), delta.get(name)) else {
                continue;
            };
            for ((ci, c), d) in values.iter_mut().zip(&c.data).zip(&d.data) {
                *ci = (f64::from(*ci) - f64::from(*c) - f64::from(*d) / step_weight) as f32;
            }
        }
        Ok(next)
    }
}

fn zeros(specs: &[TensorSpec]) -> TensorSet {
    let tensors = specs
        .iter()
        .map(|s| NamedTensor {
            name: s.name.clone(),
            shape: s.shape.clone(),
            data: vec![0.0; s.num_elements()],
        })
        .collect();
    // Names and shapes come from a valid set.
    TensorSet::new(tensors).unwrap_or_default()
}

/// The tensors a SCAFFOLD download carries after the model: the server variate of every
/// trainable tensor.
pub fn server_variate_specs(model: &[TensorSpec], frozen: &[String]) -> Vec<TensorSpec> {
    model
        .iter()
        .filter(|s| !frozen.contains(&s.name))
        .map(|s| TensorSpec {
            name: fedtune_common::control_variate::server_variate_name(&s.name),
            shape: s.shape.clone(),
        })
        .collect()
}
