//! The frozen tensors of a run, kept between rounds: they never change, so after the first
//! download the client offers their content hash and the coordinator sends only the trainable
//! tensors.

use anyhow::{Context, bail};
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::TensorSet;

#[derive(Default)]
pub struct FrozenCache {
    held: Option<(u64, TensorSet)>,
}

impl FrozenCache {
    /// The names of the frozen tensors held.
    pub fn names(&self) -> Vec<String> {
        self.held
            .as_ref()
            .map(|(_, t)| t.tensors().iter().map(|t| t.name.clone()).collect())
            .unwrap_or_default()
    }

    /// What to offer the coordinator for a task that freezes `frozen`: the hash and names, when
    /// exactly those tensors are held.
    pub fn offer<'a>(&self, frozen: &'a [String]) -> Option<(u64, &'a [String])> {
        let (hash, held) = self.held.as_ref()?;
        let same = !frozen.is_empty()
            && held.len() == frozen.len()
            && frozen.iter().all(|n| held.get(n).is_some());
        same.then_some((*hash, frozen))
    }

    /// The whole global model from a download: as received when it is complete; with the held
    /// frozen tensors added when the coordinator sent only the trainable ones. Refreshes what is
    /// held from a complete download.
    pub fn complete(
        &mut self,
        received: TensorSet,
        spec: &ModelSpec,
        frozen: &[String],
    ) -> anyhow::Result<TensorSet> {
        let expected = spec.specs();
        let global = if received.check_matches(&expected).is_ok() {
            received
        } else {
            let Some((_, held)) = &self.held else {
                bail!(
                    "the coordinator sent a partial model, and this client holds no frozen tensors to complete it"
                );
            };
            received
                .merged(held, &expected)
                .and_then(|g| g.check_matches(&expected).map(|_| g))
                .context("completing the model with the frozen tensors held")?
        };
        if frozen.is_empty() {
            self.held = None;
        } else {
            let set = global.select(|n| frozen.iter().any(|f| f == n));
            self.held = Some((set.content_hash(), set));
        }
        Ok(global)
    }
}
