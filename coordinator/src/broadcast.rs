//! A round's global model on the wire: encoded once, shared by every client's download.

use std::sync::Arc;

use fedtune_common::codec::Codec;
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
    /// The broadcast of `global`. In raw f32 it copies nothing: chunks are views of its
    /// tensors, so the global model and what every client downloads are one copy in memory.
    /// Compressed (`codec` fp16 or bf16), it is encoded once into a buffer of its own.
    pub fn share(
        global: &Arc<TensorSet>,
        version: u64,
        frozen: &[String],
        codec: Codec,
    ) -> anyhow::Result<Self> {
        let encode = |keep: &dyn Fn(&str) -> bool| {
            if codec == Codec::F32 {
                EncodedTensors::share(global, keep, version, MAX_CHUNK_BYTES)
            } else {
                EncodedTensors::compress(global, keep, codec, version, MAX_CHUNK_BYTES)
            }
        };
        let full = Arc::new(encode(&|_| true)?);
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
            trainable: Some(Arc::new(encode(&|n| !is_frozen(n))?)),
            // What clients hold is the frozen tensors as they arrive: rounded by the codec.
            frozen_hash: global.content_hash_as(is_frozen, |v| codec.round(v)),
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
