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

use crate::codec::{ChunkPlan, Codec, CodecError, check_encoded_chunk_size};
use crate::tensors::{NamedTensor, TensorError, TensorSet, TensorSpec};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn odd_set() -> TensorSet {
        // Over 8 MiB in total, with sizes that do not divide the chunk size.
        let sizes = [
            (vec![1031usize, 1513], "big"),
            (vec![7], "tiny"),
            (vec![999, 3, 337], "odd"),
            (vec![1], "one"),
        ];
        let mut x = 0x9E3779B9u32;
        let tensors = sizes
            .iter()
            .map(|(shape, name)| {
                let n = shape.iter().product();
                let data = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        f32::from_bits(x & 0x7F7F_FFFF) // finite, any exponent, both signs not needed
                    })
                    .collect();
                NamedTensor::new(*name, shape.clone(), data).unwrap()
            })
            .collect();
        TensorSet::new(tensors).unwrap()
    }

    #[test]
    fn chunked_round_trip_is_bit_exact_over_8_mib() {
        let set = odd_set();
        assert!(set.byte_len() > 8 << 20);
        let enc = EncodedTensors::encode(&set, 3, MAX_CHUNK_BYTES).unwrap();
        assert!(enc.chunks.iter().all(|c| c.data.len() <= MAX_CHUNK_BYTES));
        let mut asm = Assembler::new(enc.manifest.clone(), set.byte_len() as u64).unwrap();
        for c in &enc.chunks {
            asm.push(c).unwrap();
        }
        let back = asm.finish().unwrap().into_tensor_set().unwrap();
        for (a, b) in set.tensors().iter().zip(back.tensors()) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.shape, b.shape);
            assert!(
                a.data
                    .iter()
                    .zip(&b.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
            );
        }
    }

    #[test]
    fn a_shared_set_is_the_same_payload_as_an_encoded_one_whatever_the_chunk_size() {
        let set = Arc::new(odd_set());
        for chunk in [MAX_CHUNK_BYTES, 1 << 16, 4096, 28, 5] {
            let enc = EncodedTensors::encode(&set, 3, chunk).unwrap();
            let shared = EncodedTensors::share(&set, |_| true, 3, chunk).unwrap();
            assert_eq!(shared.manifest, enc.manifest, "chunk {chunk}");
            let mut asm = Assembler::new(shared.manifest.clone(), u64::MAX).unwrap();
            for c in &shared.chunks {
                assert!(c.data.len() <= chunk);
                asm.push(c).unwrap();
            }
            let payload = asm.finish().unwrap();
            let want: Vec<u8> = enc.chunks.iter().flat_map(|c| c.data.to_vec()).collect();
            assert_eq!(payload.bytes, want, "chunk {chunk}");
        }
    }

    #[test]
    fn a_shared_subset_holds_only_the_kept_tensors() {
        let set = Arc::new(odd_set());
        let shared = EncodedTensors::share(&set, |n| n != "big", 1, 1 << 12).unwrap();
        let want = set.select(|n| n != "big");
        let enc = EncodedTensors::encode(&want, 1, 1 << 12).unwrap();
        assert_eq!(shared.manifest, enc.manifest);
    }

    #[test]
    fn corrupted_chunk_is_refused() {
        let set = odd_set();
        let enc = EncodedTensors::encode(&set, 1, 1 << 16).unwrap();
        let mut asm = Assembler::new(enc.manifest.clone(), u64::MAX).unwrap();
        asm.push(&enc.chunks[0]).unwrap();
        let mut bad = enc.chunks[1].clone();
        let mut data = bad.data.to_vec();
        data[17] ^= 0x01;
        bad.data = Bytes::from(data);
        assert_eq!(
            asm.push(&bad),
            Err(WireError::ChunkChecksum { offset: 1 << 16 })
        );
    }

    #[test]
    fn stream_faults_are_refused() {
        let set = odd_set();
        let enc = EncodedTensors::encode(&set, 1, 1 << 20).unwrap();
        // Too large for the receiver: refused before allocating.
        assert!(matches!(
            Assembler::new(enc.manifest.clone(), 1024),
            Err(WireError::TooLarge { .. })
        ));
        // Out of order.
        let mut asm = Assembler::new(enc.manifest.clone(), u64::MAX).unwrap();
        assert!(matches!(
            asm.push(&enc.chunks[1]),
            Err(WireError::OutOfOrder { .. })
        ));
        // Truncated.
        asm.push(&enc.chunks[0]).unwrap();
        assert!(matches!(asm.finish(), Err(WireError::Truncated { .. })));
        // A manifest whose sizes lie.
        let mut lying = enc.manifest.clone();
        lying.total_bytes -= 4;
        assert!(matches!(
            Assembler::new(lying, u64::MAX),
            Err(WireError::SizeMismatch { .. })
        ));
        // Consistent chunks but a wrong whole-payload checksum.
        let mut wrong = enc.manifest.clone();
        wrong.checksum ^= 1;
        let mut asm = Assembler::new(wrong, u64::MAX).unwrap();
        enc.chunks.iter().for_each(|c| {
            asm.push(c).unwrap();
        });
        assert!(matches!(asm.finish(), Err(WireError::PayloadChecksum)));
    }
}
