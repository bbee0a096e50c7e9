//! The receiving side of the codec: a manifest checked for consistency, then each chunk as it
//! arrives (order, length, checksum; decoded when the payload is compressed), then the whole.

use bytes::Bytes;
use fedtune_proto as pb;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use super::{WireError, extend_le};
use crate::codec::{ChunkPlan, Codec, check_encoded_chunk_size};
use crate::tensors::{NamedTensor, TensorError, TensorSet, TensorSpec};
use crate::wire::{MAX_CHUNK_BYTES, decode_le_vec};

/// Checks a manifest's internal consistency and returns its tensors' specs.
pub fn manifest_specs(manifest: &pb::Manifest) -> Result<Vec<TensorSpec>, WireError> {
    Ok(read_manifest(manifest)?.specs)
}

/// What a consistent manifest describes.
struct ManifestFacts {
    specs: Vec<TensorSpec>,
    codec: Codec,
    /// The values' bytes as f32 (what the receiver holds once decoded).
    decoded_bytes: u64,
}

fn read_manifest(manifest: &pb::Manifest) -> Result<ManifestFacts, WireError> {
    let codec = Codec::from_proto(manifest.compression.as_ref())?;
    if codec == Codec::F32 {
        if manifest.chunk_size == 0 || manifest.chunk_size as usize > MAX_CHUNK_BYTES {
            return Err(WireError::BadChunkSize(manifest.chunk_size));
        }
    } else {
        check_encoded_chunk_size(manifest.chunk_size as usize)?;
    }
    let mut computed: u64 = 0;
    let mut specs = Vec::with_capacity(manifest.tensors.len());
    for t in &manifest.tensors {
        if t.dtype != pb::DType::DtypeF32 as i32 {
            return Err(WireError::UnsupportedDType {
                name: t.name.clone(),
                dtype: t.dtype,
            });
        }
        let overflow = || WireError::ShapeOverflow {
            name: t.name.clone(),
            shape: t.shape.clone(),
        };
        let elements = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(overflow)?;
        computed = computed.checked_add(elements).ok_or_else(overflow)?;
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| overflow()))
            .collect::<Result<_, _>>()?;
        specs.push(TensorSpec {
            name: t.name.clone(),
            shape,
        });
    }
    let decoded_bytes = computed;
    if codec != Codec::F32 {
        computed = chunk_plan(&specs, manifest.chunk_size)
            .encoded_total(codec)
            .ok_or(WireError::SizeMismatch {
                declared: manifest.total_bytes,
                computed: u64::MAX,
            })?;
    }
    if computed != manifest.total_bytes {
        return Err(WireError::SizeMismatch {
            declared: manifest.total_bytes,
            computed,
        });
    }
    Ok(ManifestFacts {
        specs,
        codec,
        decoded_bytes,
    })
}

/// The chunks of an encoded payload of `specs`.
fn chunk_plan(specs: &[TensorSpec], chunk_size: u32) -> ChunkPlan {
    // The shapes were checked to fit in u64 bytes.
    let counts = specs
        .iter()
        .map(|s| s.shape.iter().map(|&d| d as u64).product())
        .collect();
    ChunkPlan::new(counts, chunk_size as usize / 4)
}

/// Receives a chunked payload, checking each chunk as it arrives.
pub struct Assembler {
    manifest: pb::Manifest,
    specs: Vec<TensorSpec>,
    codec: Codec,
    /// Compressed payloads: the value counts of the chunks still to come.
    plan: ChunkPlan,
    /// The payload so far; `None` when the caller keeps the checked chunks itself
    /// ([`Assembler::verifier`]).
    buf: Option<Vec<u8>>,
    received: u64,
    hasher: Xxh3,
}

impl Assembler {
    /// Starts receiving the payload `manifest` describes. `limit` is the most bytes the caller
    /// is prepared to hold: a manifest that declares more is refused before anything is allocated.
    /// A compressed payload is held decoded, so `limit` bounds its f32 bytes.
    pub fn new(manifest: pb::Manifest, limit: u64) -> Result<Self, WireError> {
        let facts = read_manifest(&manifest)?;
        if facts.decoded_bytes > limit {
            return Err(WireError::TooLarge {
                declared: facts.decoded_bytes,
                limit,
            });
        }
        let buf = Vec::with_capacity(facts.decoded_bytes as usize);
        Ok(Self::with(manifest, facts, Some(buf)))
    }

    fn with(manifest: pb::Manifest, facts: ManifestFacts, buf: Option<Vec<u8>>) -> Self {
        Self {
            plan: chunk_plan(&facts.specs, manifest.chunk_size),
            manifest,
            specs: facts.specs,
            codec: facts.codec,
            buf,
            received: 0,
            hasher: Xxh3::new(),
        }
    }

    /// Checks a chunked payload as it arrives without keeping it: the caller keeps each chunk
    /// [`Assembler::push`] accepted (e.g. streams it to disk) and calls
    /// [`Assembler::verify_end`] at the end. Nothing model-sized is allocated.
    pub fn verifier(manifest: pb::Manifest) -> Result<Self, WireError> {
        let facts = read_manifest(&manifest)?;
        Ok(Self::with(manifest, facts, None))
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    pub fn manifest(&self) -> &pb::Manifest {
        &self.manifest
    }

    /// Encoded bytes received so far (where a resumed stream goes on from).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// How the payload's values travel.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Checks the next chunk and returns its values as raw little-endian f32 bytes (the
    /// chunk's own bytes, without a copy, when the payload is not compressed).
    pub fn push(&mut self, chunk: &pb::Chunk) -> Result<Bytes, WireError> {
        let expected = self.received;
        if chunk.offset != expected {
            return Err(WireError::OutOfOrder {
                expected,
                got: chunk.offset,
            });
        }
        let len = chunk.data.len();
        // A compressed chunk's length follows from its place in the payload.
        let values = if self.codec == Codec::F32 {
            None
        } else {
            self.plan.next()
        };
        if let Some(n) = values
            && len != self.codec.encoded_len(n)
        {
            return Err(WireError::WrongChunkLength {
                offset: chunk.offset,
                len,
                expected: self.codec.encoded_len(n),
                codec: self.codec.to_string(),
            });
        }
        if len == 0 || (values.is_none() && len > self.manifest.chunk_size as usize) {
            return Err(WireError::BadChunkLength {
                offset: chunk.offset,
                len,
                chunk_size: self.manifest.chunk_size,
            });
        }
        if expected + len as u64 > self.manifest.total_bytes {
            return Err(WireError::Overrun {
                offset: chunk.offset,
                total: self.manifest.total_bytes,
            });
        }
        if xxh3_64(&chunk.data) != chunk.checksum {
            return Err(WireError::ChunkChecksum {
                offset: chunk.offset,
            });
        }
        let decoded = match values {
            None => chunk.data.clone(),
            Some(n) => {
                let mut out = Vec::with_capacity(n);
                self.codec
                    .decode_chunk(&chunk.data, n, &mut out)
                    .map_err(|why| WireError::BadEncoding {
                        offset: chunk.offset,
                        codec: self.codec.to_string(),
                        why,
                    })?;
                f32_bytes(out)
            }
        };
        self.hasher.update(&chunk.data);
        if let Some(buf) = &mut self.buf {
            buf.extend_from_slice(&decoded);
        }
        self.received += len as u64;
        Ok(decoded)
    }

    /// Ends a stream: every byte arrived and the whole-payload checksum matches.
    pub fn verify_end(&self) -> Result<(), WireError> {
        if self.received != self.manifest.total_bytes {
            return Err(WireError::Truncated {
                received: self.received,
                total: self.manifest.total_bytes,
            });
        }
        if self.hasher.digest() != self.manifest.checksum {
            return Err(WireError::PayloadChecksum);
        }
        Ok(())
    }

    /// Ends the stream and returns the payload (an assembler made by [`Assembler::new`]).
    pub fn finish(self) -> Result<Payload, WireError> {
        self.verify_end()?;
        Ok(Payload {
            bytes: self.buf.unwrap_or_default(),
            manifest: self.manifest,
            specs: self.specs,
        })
    }
}

/// A complete, verified payload: raw bytes plus the tensors' specs.
#[derive(Debug)]
pub struct Payload {
    pub manifest: pb::Manifest,
    pub specs: Vec<TensorSpec>,
    pub bytes: Vec<u8>,
}

impl Payload {
    /// Each tensor's spec and its raw little-endian bytes, in manifest order.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, &[u8])> {
        let mut offset = 0;
        self.specs.iter().map(move |s| {
            let len = s.num_elements() * 4;
            let bytes = &self.bytes[offset..offset + len];
            offset += len;
            (s, bytes)
        })
    }

    /// Checks that every value is finite, naming the first tensor and index that is not.
    pub fn check_finite(&self) -> Result<(), TensorError> {
        crate::blocks::FiniteCheck::new(&self.specs).feed(&self.bytes)
    }

    pub fn into_tensor_set(self) -> Result<TensorSet, WireError> {
        let tensors = self
            .tensors()
            .map(|(spec, bytes)| {
                NamedTensor::new(spec.name.clone(), spec.shape.clone(), decode_le_vec(bytes))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TensorSet::new(tensors)?)
    }
}

/// Values as their little-endian bytes, without a copy on little-endian machines.
fn f32_bytes(values: Vec<f32>) -> Bytes {
    struct Values(Vec<f32>);
    impl AsRef<[u8]> for Values {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }
    if cfg!(target_endian = "little") {
        Bytes::from_owner(Values(values))
    } else {
        let mut out = Vec::with_capacity(values.len() * 4);
        extend_le(&mut out, &values);
        Bytes::from(out)
    }
}
