//! Update compression: how a payload's chunks carry f32 values in fewer bytes.
//!
//! An encoded payload cuts each tensor (in manifest order) into chunks of `chunk_size / 4`
//! values, so a chunk never spans two tensors and every chunk's encoded length follows from
//! its value count: the receiver knows each chunk's exact length before it arrives, and int8's
//! scale is never shared by a bias and a weight matrix. Chunks are still checksummed and
//! ordered by [`crate::wire::Assembler`], which decodes each one back to f32 as it is accepted,
//! so everything downstream (the journal, the aggregators, the trainer) sees f32 only.
//!
//! Raw f32 ([`Codec::F32`]) keeps the original layout (chunks cut anywhere), byte for byte.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use fedtune_proto as pb;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use xxhash_rust::xxh3::xxh3_64;

use crate::tensors::TensorSet;
use crate::wire::{EncodedTensors, MAX_CHUNK_BYTES, WireError, tensor_info};

/// The largest top-k fraction: beyond half, positions and values outweigh raw f32.
pub const MAX_TOPK_FRACTION: f32 = 0.5;

/// How a payload's values travel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    /// Raw little-endian f32 (no compression).
    F32,
    /// IEEE half precision: 2 bytes a value, ~3 significant digits, |x| ≤ 65504.
    F16,
    /// bfloat16: 2 bytes a value, f32's range with ~2 significant digits.
    Bf16,
    /// One f32 scale per chunk and one signed byte per value.
    Int8,
    /// The given fraction of each chunk's values, those of largest magnitude, with their
    /// positions; the rest are sent as 0 (the client keeps them for later rounds).
    TopK(f32),
}

/// A compression setting that is not one of the codecs.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error(
        "unknown compression `{0}`: use fp32, fp16, bf16, int8 or topk:FRACTION (e.g. topk:0.1)"
    )]
    Unknown(String),
    #[error(
        "top-k fraction `{0}` is not a number in (0, {MAX_TOPK_FRACTION}]: e.g. topk:0.1 sends a tenth of the values (above {MAX_TOPK_FRACTION}, fp32 is smaller)"
    )]
    Fraction(String),
    #[error("encoding {0} is not one this build knows (a newer peer?)")]
    UnknownEncoding(i32),
}

impl FromStr for Codec {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "none" => Ok(Self::F32),
            "fp16" | "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "int8" => Ok(Self::Int8),
            other => match other.strip_prefix("topk:") {
                Some(f) => {
                    let fraction: f32 = f.parse().map_err(|_| CodecError::Fraction(f.into()))?;
                    check_fraction(fraction).map_err(|_| CodecError::Fraction(f.into()))?;
                    Ok(Self::TopK(fraction))
                }
                None => Err(CodecError::Unknown(s.to_string())),
            },
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F32 => f.write_str("fp32"),
            Self::F16 => f.write_str("fp16"),
            Self::Bf16 => f.write_str("bf16"),
            Self::Int8 => f.write_str("int8"),
            Self::TopK(fraction) => write!(f, "topk:{fraction}"),
        }
    }
}

fn check_fraction(fraction: f32) -> Result<(), ()> {
    if fraction > 0.0 && fraction <= MAX_TOPK_FRACTION {
        Ok(())
    } else {
        Err(())
    }
}

impl Codec {
    /// The codec a peer's message names (absent: raw f32).
    pub fn from_proto(c: Option<&pb::Compression>) -> Result<Self, CodecError> {
        let Some(c) = c else {
            return Ok(Self::F32);
        };
        match pb::Encoding::try_from(c.encoding) {
            Ok(pb::Encoding::F32) => Ok(Self::F32),
            Ok(pb::Encoding::F16) => Ok(Self::F16),
            Ok(pb::Encoding::Bf16) => Ok(Self::Bf16),
            Ok(pb::Encoding::Int8) => Ok(Self::Int8),
            Ok(pb::Encoding::Topk) => check_fraction(c.topk_fraction)
                .map(|_| Self::TopK(c.topk_fraction))
                .map_err(|_| CodecError::Fraction(c.topk_fraction.to_string())),
            Err(_) => Err(CodecError::UnknownEncoding(c.encoding)),
        }
    }

    /// How a message names this codec (`None` for raw f32, which old peers assume).
    pub fn to_proto(self) -> Option<pb::Compression> {
        let (encoding, topk_fraction) = match self {
            Self::F32 => return None,
            Self::F16 => (pb::Encoding::F16, 0.0),
            Self::Bf16 => (pb::Encoding::Bf16, 0.0),
            Self::Int8 => (pb::Encoding::Int8, 0.0),
            Self::TopK(f) => (pb::Encoding::Topk, f),
        };
        Some(pb::Compression {
            encoding: encoding as i32,
            topk_fraction,
        })
    }

    /// Values a top-k chunk of `n` values sends.
    fn kept(fraction: f32, n: usize) -> usize {
        ((f64::from(fraction) * n as f64).ceil() as usize).clamp(1, n.max(1))
    }

    /// The encoded length of a chunk of `n` values (n ≥ 1).
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Self::F32 => 4 * n,
            Self::F16 | Self::Bf16 => 2 * n,
            Self::Int8 => 4 + n,
            Self::TopK(f) => 8 * Self::kept(f, n),
        }
    }

    /// Appends the encoding of one chunk's values. A value the codec cannot carry is not
    /// refused here (the receiver's finite check names it): a NaN stays NaN (int8: the chunk's
    /// scale becomes NaN), and fp16 turns a finite value beyond ±65504 into infinity. Check
    /// with [`Codec::cannot_carry`] first.
    pub fn encode_chunk(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            // Whole slices at once: half converts them with F16C where the CPU has it.
            Self::F16 => {
                let mut halves = vec![f16::ZERO; values.len()];
                halves.convert_from_f32_slice(values);
                extend_u16_le(out, halves.reinterpret_cast());
            }
            Self::Bf16 => {
                let mut halves = vec![bf16::ZERO; values.len()];
                halves.convert_from_f32_slice(values);
                extend_u16_le(out, halves.reinterpret_cast());
            }
            Self::Int8 => {
                let mut largest = 0f32;
                let mut finite = true;
                for v in values {
                    finite &= v.is_finite();
                    largest = largest.max(v.abs());
                }
                let scale = if finite { largest / 127.0 } else { f32::NAN };
                out.extend_from_slice(&scale.to_le_bytes());
                let start = out.len();
                out.resize(start + values.len(), 0);
                if scale > 0.0 {
                    let inverse = 1.0 / scale;
                    for (q, v) in out[start..].iter_mut().zip(values) {
                        // Round half away from zero without `round` (a libm call on baseline
                        // x86-64); the clamp keeps ±127.
                        let x = (v * inverse).clamp(-127.0, 127.0);
                        *q = ((x + 0.5f32.copysign(x)) as i8) as u8;
                    }
                }
            }
            Self::TopK(f) => {
                let k = Self::kept(f, values.len());
                let mut order: Vec<u32> = (0..values.len() as u32).collect();
                // Largest magnitude first; a NaN counts as the largest, so it is sent and refused.
                let larger = |a: &u32, b: &u32| {
                    values[*b as usize]
                        .abs()
                        .total_cmp(&values[*a as usize].abs())
                };
                if k < order.len() {
                    order.select_nth_unstable_by(k - 1, larger);
                }
                let kept = &mut order[..k];
                kept.sort_unstable();
                for i in kept.iter() {
                    out.extend_from_slice(&i.to_le_bytes());
                }
                for i in kept.iter() {
                    out.extend_from_slice(&values[*i as usize].to_le_bytes());
                }
            }
        }
    }

    /// Decodes one chunk of `n` values (`data` must be [`Codec::encoded_len`] bytes) onto
    /// `out`; what is malformed is refused with why.
    pub fn decode_chunk(self, data: &[u8], n: usize, out: &mut Vec<f32>) -> Result<(), String> {
        let u16s = || {
            data.chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let f32_at = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        match self {
            Self::F32 => out.extend(data.chunks_exact(4).map(f32_at)),
            Self::F16 => {
                let bits: Vec<u16> = u16s().collect();
                let start = out.len();
                out.resize(start + bits.len(), 0.0);
                bits.reinterpret_cast::<f16>()
                    .convert_to_f32_slice(&mut out[start..]);
            }
            Self::Bf16 => {
                let bits: Vec<u16> = u16s().collect();
                let start = out.len();
                out.resize(start + bits.len(), 0.0);
                bits.reinterpret_cast::<bf16>()
                    .convert_to_f32_slice(&mut out[start..]);
            }
            Self::Int8 => {
                let scale = f32_at(&data[..4]);
                if !(scale.is_finite() && scale >= 0.0) {
                    return Err(format!(
                        "its int8 scale is {scale}, not a finite number ≥ 0"
                    ));
                }
                out.extend(data[4..].iter().map(|&q| f32::from(q as i8) * scale));
            }
            Self::TopK(_) => {
                let k = data.len() / 8;
                let (positions, values) = data.split_at(4 * k);
                let start = out.len();
                out.resize(start + n, 0.0);
                let mut next = 0u64;
                for (p, v) in positions.chunks_exact(4).zip(values.chunks_exact(4)) {
                    let p = u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
                    if p < next || p >= n as u64 {
                        return Err(format!(
                            "its top-k positions are not strictly increasing within 0..{n} (position {p})"
                        ));
                    }
                    out[start + p as usize] = f32_at(v);
                    next = p + 1;
                }
            }
        }
        Ok(())
    }

    /// The first value this codec cannot carry (index, value): only fp16 has a narrower range
    /// than f32 (a finite value beyond ±65504 would arrive as infinity).
    pub fn cannot_carry(self, values: &[f32]) -> Option<(usize, f32)> {
        match self {
            Self::F16 => values
                .iter()
                .position(|v| v.is_finite() && f16::from_f32(*v).is_infinite())
                .map(|i| (i, values[i])),
            _ => None,
        }
    }

    /// A value as it arrives after encoding on its own: fp16 and bf16 round each value alone;
    /// the others depend on the rest of the chunk and are returned unchanged.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Self::F16 => f16::from_f32(v).to_f32(),
            Self::Bf16 => bf16::from_f32(v).to_f32(),
            _ => v,
        }
    }
}

/// Appends `bits` as little-endian bytes (one copy on little-endian machines).
fn extend_u16_le(out: &mut Vec<u8>, bits: &[u16]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(bits));
    } else {
        bits.iter()
            .for_each(|b| out.extend_from_slice(&b.to_le_bytes()));
    }
}

/// The value counts of an encoded payload's chunks: each tensor of `counts` values cut into
/// chunks of `per_chunk` values, in order. Empty tensors have no chunk.
#[derive(Debug, Clone)]
pub struct ChunkPlan {
    counts: Vec<u64>,
    per_chunk: u64,
    tensor: usize,
    done: u64,
}

impl ChunkPlan {
    pub fn new(counts: Vec<u64>, per_chunk: usize) -> Self {
        Self {
            counts,
            per_chunk: per_chunk.max(1) as u64,
            tensor: 0,
            done: 0,
        }
    }

    /// The encoded bytes of the whole payload under `codec`; `None` on overflow.
    pub fn encoded_total(&self, codec: Codec) -> Option<u64> {
        let per = self.per_chunk;
        self.counts.iter().try_fold(0u64, |acc, &n| {
            let full = (n / per).checked_mul(codec.encoded_len(per as usize) as u64)?;
            let rest = match n % per {
                0 => 0,
                r => codec.encoded_len(r as usize) as u64,
            };
            acc.checked_add(full)?.checked_add(rest)
        })
    }
}

impl Iterator for ChunkPlan {
    /// The next chunk's value count.
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.tensor < self.counts.len() {
            let left = self.counts[self.tensor] - self.done;
            if left == 0 {
                self.tensor += 1;
                self.done = 0;
                continue;
            }
            let n = left.min(self.per_chunk);
            self.done += n;
            return Some(n as usize);
        }
        None
    }
}

impl EncodedTensors {
    /// Encodes the tensors of `set` that `keep` selects with `codec` (raw f32 is
    /// [`EncodedTensors::encode`]'s layout). `chunk_size` must be a multiple of 8 within
    /// 8..=[`MAX_CHUNK_BYTES`], so that every encoded chunk fits in it.
    pub fn compress(
        set: &TensorSet,
        keep: impl Fn(&str) -> bool,
        codec: Codec,
        model_version: u64,
        chunk_size: usize,
    ) -> Result<Self, WireError> {
        if codec == Codec::F32 {
            return Self::encode(&set.select(keep), model_version, chunk_size);
        }
        check_encoded_chunk_size(chunk_size)?;
        let per_chunk = chunk_size / 4;
        let kept: Vec<_> = set.tensors().iter().filter(|t| keep(&t.name)).collect();
        let mut payload = Vec::new();
        let mut ends = Vec::new();
        for t in &kept {
            for values in t.data.chunks(per_chunk) {
                codec.encode_chunk(values, &mut payload);
                ends.push(payload.len());
            }
        }
        let payload = Bytes::from(payload);
        let mut start = 0;
        let chunks = ends
            .into_iter()
            .map(|end| {
                let data = payload.slice(start..end);
                let chunk = pb::Chunk {
                    offset: start as u64,
                    checksum: xxh3_64(&data),
                    data,
                };
                start = end;
                chunk
            })
            .collect();
        let manifest = pb::Manifest {
            tensors: kept.iter().map(|t| tensor_info(t)).collect(),
            total_bytes: payload.len() as u64,
            checksum: xxh3_64(&payload),
            chunk_size: chunk_size as u32,
            model_version,
            compression: codec.to_proto(),
        };
        Ok(Self { manifest, chunks })
    }
}

/// An encoded payload's chunk size: a multiple of 8 (an even count of values, so that int8's
/// scale and top-k's positions fit within the chunk's raw size).
pub(crate) fn check_encoded_chunk_size(chunk_size: usize) -> Result<(), WireError> {
    if chunk_size < 8 || !chunk_size.is_multiple_of(8) || chunk_size > MAX_CHUNK_BYTES {
        return Err(WireError::BadEncodedChunkSize(
            chunk_size.min(u32::MAX as usize) as u32,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
