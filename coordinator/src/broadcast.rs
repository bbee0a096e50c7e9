//! A round's global model on the wire: encoded once, shared by every client's download.

use std::sync::Arc;

use fedtune_common::tensors::TensorSet;
use fedtune_common::wire::{EncodedTensors, MAX_CHUNK_BYTES};

/// One global model version, encoded once for every client: in full, and (when the run freezes
/// tensors) without the frozen ones, for clients that already hold those.
pub struct Broadcast {
    full: Arc<EncodedTensors>,
    trainable: Option<Arc<EncodedTensors>>,
    /// Content hash of the frozen tensors (0 when nothing is frozen).
    frozen_hash: u64,
}

impl Broadcast {
    /// The broadcast of `global` without copying it: chunks are views of its tensors, so the
    /// global model and what every client downloads are one copy in memory.
    pub fn share(global: &Arc<TensorSet>, version: u64, frozen: &[String]) -> anyhow::Result<Self> {
        let full = Arc::new(EncodedTensors::share(
            global,
            |_| true,
            version,
            MAX_CHUNK_BYTES,
        )?);
        if frozen.is_empty() {
            return Ok(Self {
                full,
                trainable: None,
                frozen_hash: 0,
            });
        }
        let is_frozen = |n: &str| frozen.iter().any(|f| f == n);
        Ok(Self {
            full,
            trainable: Some(Arc::new(EncodedTensors::share(
                global,
                |n| !is_frozen(n),
                version,
                MAX_CHUNK_BYTES,
            )?)),
            frozen_hash: global.content_hash_of(is_frozen),
        })
    }

    /// Bytes of the whole model, as a client without frozen tensors downloads it.
    pub fn full_bytes(&self) -> u64 {
        self.full.total_bytes()
    }

    /// What a client holding frozen tensors with hash `frozen_hash` must download.
    pub(crate) fn for_client(&self, frozen_hash: u64) -> Arc<EncodedTensors> {
        match &self.trainable {
            Some(t) if frozen_hash != 0 && frozen_hash == self.frozen_hash => t.clone(),
            _ => self.full.clone(),
        }
    }
}
