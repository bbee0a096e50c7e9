//! The tensor codec of the wire protocol: a manifest, then little-endian chunks.
//!
//! A tensor set is encoded once into one buffer ([`EncodedTensors`]); its chunks are `Bytes`
//! slices of that buffer, so streaming the same broadcast to many clients copies nothing. The
//! receiving side ([`Assembler`]) checks every chunk as it arrives (order, size, checksum) and
//! the whole payload at the end, and refuses to allocate more than the caller expects. A
//! compressed payload ([`crate::codec`]) is checked the same way and decoded chunk by chunk.

use std::sync::Arc;

use bytes::Bytes;
use fedtune_proto as pb;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::codec::CodecError;
use crate::tensors::{NamedTensor, TensorError, TensorSet};

mod assembler;

pub use assembler::{Assembler, Payload, manifest_specs};
pub use fedtune_proto::MAX_CHUNK_BYTES;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("chunk size {0} is outside 1..={MAX_CHUNK_BYTES} bytes")]
    BadChunkSize(u32),
    #[error(
        "chunk size {0} of a compressed payload is not a multiple of 8 within 8..={MAX_CHUNK_BYTES}"
    )]
    BadEncodedChunkSize(u32),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("chunk at offset {offset} has {len} bytes; its {codec} encoding is {expected} bytes")]
    WrongChunkLength {
        offset: u64,
        len: usize,
        expected: usize,
        codec: String,
    },
    #[error("chunk at offset {offset} is not valid {codec}: {why}")]
    BadEncoding {
        offset: u64,
        codec: String,
        why: String,
    },
    #[error("tensor `{name}` has dtype {dtype}; only f32 is supported")]
    UnsupportedDType { name: String, dtype: i32 },
    #[error("manifest says {declared} bytes but its tensors' shapes add up to {computed} bytes")]
    SizeMismatch { declared: u64, computed: u64 },
    #[error("tensor `{name}`: shape {shape:?} is too large")]
    ShapeOverflow { name: String, shape: Vec<u64> },
    #[error("payload of {declared} bytes exceeds what the receiver expects ({limit} bytes)")]
    TooLarge { declared: u64, limit: u64 },
    #[error("chunk at offset {got} arrived out of order (expected offset {expected})")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("chunk at offset {offset} has {len} bytes; chunks are 1..={chunk_size} bytes")]
    BadChunkLength {
        offset: u64,
        len: usize,
        chunk_size: u32,
    },
    #[error("chunk at offset {offset} runs past the declared payload end ({total} bytes)")]
    Overrun { offset: u64, total: u64 },
    #[error("chunk at offset {offset} is corrupted (checksum mismatch)")]
    ChunkChecksum { offset: u64 },
    #[error("payload ended after {received} of {total} bytes")]
    Truncated { received: u64, total: u64 },
    #[error("payload checksum mismatch: the assembled bytes differ from what the sender hashed")]
    PayloadChecksum,
    #[error("stream ended without a manifest")]
    MissingManifest,
    #[error("a second manifest arrived in the same stream")]
    UnexpectedManifest,
    #[error("not this round's masked update: {0}")]
    NotMasked(String),
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// A tensor set encoded for the wire: the manifest and zero-copy chunks of one shared buffer.
#[derive(Debug, Clone)]
pub struct EncodedTensors {
    pub manifest: pb::Manifest,
    pub chunks: Vec<pb::Chunk>,
}

impl EncodedTensors {
    /// Encodes `set` once. `chunk_size` must be within 1..=[`MAX_CHUNK_BYTES`].
    pub fn encode(
        set: &TensorSet,
        model_version: u64,
        chunk_size: usize,
    ) -> Result<Self, WireError> {
        check_chunk_size(chunk_size)?;
        let mut payload = Vec::with_capacity(set.byte_len());
        for t in set.tensors() {
            extend_le(&mut payload, &t.data);
        }
        let checksum = xxh3_64(&payload);
        let payload = Bytes::from(payload);
        let chunks = (0..payload.len())
            .step_by(chunk_size)
            .map(|start| {
                let data = payload.slice(start..(start + chunk_size).min(payload.len()));
                pb::Chunk {
                    offset: start as u64,
                    checksum: xxh3_64(&data),
                    data,
                }
            })
            .collect();
        let manifest = pb::Manifest {
            tensors: set.tensors().iter().map(tensor_info).collect(),
            total_bytes: payload.len() as u64,
            checksum,
            chunk_size: chunk_size as u32,
            model_version,
            compression: None,
        };
        Ok(Self { manifest, chunks })
    }

    /// Encodes the tensors of `set` that `keep` selects without copying them: each chunk of a
    /// large tensor is a view of the tensor itself (little-endian f32 is the wire's form), so
    /// the global model and its broadcast are one copy in memory. Tensors smaller than a
    /// chunk are packed together (copied: they are small). While any chunk lives, `set` is
    /// shared; on a big-endian machine every chunk is copied.
    pub fn share(
        set: &Arc<TensorSet>,
        keep: impl Fn(&str) -> bool,
        model_version: u64,
        chunk_size: usize,
    ) -> Result<Self, WireError> {
        check_chunk_size(chunk_size)?;
        let mut chunks = Vec::new();
        let mut whole = Xxh3::new();
        let mut offset = 0u64;
        let mut pack = Vec::new();
        let mut push = |data: Bytes, chunks: &mut Vec<pb::Chunk>, offset: &mut u64| {
            whole.update(&data);
            let len = data.len() as u64;
            chunks.push(pb::Chunk {
                offset: *offset,
                checksum: xxh3_64(&data),
                data,
            });
            *offset += len;
        };
        let mut infos = Vec::new();
        for (index, t) in set.tensors().iter().enumerate() {
            if !keep(&t.name) {
                continue;
            }
            infos.push(tensor_info(t));
            let len = t.data.len() * 4;
            if len < chunk_size || cfg!(target_endian = "big") {
                // Small tensors run on across chunks, so a model of small tensors is chunked
                // exactly as `encode` chunks it.
                extend_le(&mut pack, &t.data);
                while pack.len() >= chunk_size {
                    let rest = pack.split_off(chunk_size);
                    push(
                        Bytes::from(std::mem::replace(&mut pack, rest)),
                        &mut chunks,
                        &mut offset,
                    );
                }
                continue;
            }
            if !pack.is_empty() {
                push(
                    Bytes::from(std::mem::take(&mut pack)),
                    &mut chunks,
                    &mut offset,
                );
            }
            for start in (0..len).step_by(chunk_size) {
                let view = TensorBytes {
                    set: set.clone(),
                    index,
                    range: start..(start + chunk_size).min(len),
                };
                push(Bytes::from_owner(view), &mut chunks, &mut offset);
            }
        }
        if !pack.is_empty() {
            push(Bytes::from(pack), &mut chunks, &mut offset);
        }
        let manifest = pb::Manifest {
            tensors: infos,
            total_bytes: offset,
            checksum: whole.digest(),
            chunk_size: chunk_size as u32,
            model_version,
            compression: None,
        };
        Ok(Self { manifest, chunks })
    }

    pub fn total_bytes(&self) -> u64 {
        self.manifest.total_bytes
    }
}

/// A byte range of one tensor of a shared set: the owner of a zero-copy chunk.
struct TensorBytes {
    set: Arc<TensorSet>,
    index: usize,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        // Only built on little-endian machines, where the values' bytes are the wire's.
        let values: &[f32] = &self.set.tensors()[self.index].data;
        &bytemuck::cast_slice(values)[self.range.clone()]
    }
}

fn check_chunk_size(chunk_size: usize) -> Result<(), WireError> {
    if chunk_size == 0 || chunk_size > MAX_CHUNK_BYTES {
        return Err(WireError::BadChunkSize(
            chunk_size.min(u32::MAX as usize) as u32
        ));
    }
    Ok(())
}

pub(crate) fn tensor_info(t: &NamedTensor) -> pb::TensorInfo {
    pb::TensorInfo {
        name: t.name.clone(),
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        dtype: pb::DType::DtypeF32 as i32,
    }
}

fn extend_le(out: &mut Vec<u8>, values: &[f32]) {
    if cfg!(target_endian = "little") {
        // The wire format is the in-memory format: one copy.
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Decodes little-endian f32 values (`bytes.len()` must be a multiple of 4; a trailing partial
/// value is ignored, which the manifest checks rule out).
pub fn decode_le(bytes: &[u8]) -> impl ExactSizeIterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Decodes little-endian f32 values into a new vector (one copy on little-endian machines).
pub fn decode_le_vec(bytes: &[u8]) -> Vec<f32> {
    if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec(&bytes[..bytes.len() / 4 * 4])
    } else {
        decode_le(bytes).collect()
    }
}

#[cfg(test)]
mod tests;
