//! A peer's tensor stream rebuilt from fuzz input, through the assembler.

use fedtune_formats::wire::{Assembler, Payload};
use fedtune_proto as pb;
use prost::Message;

/// The first message is flags, the second the manifest, the rest chunk data. Flag bits: 1
/// keeps the manifest's own checksum, 2 takes each chunk's offset from its first 8 bytes,
/// 4 keeps a wrong chunk checksum (0), 8 compresses the payload with encoding `flags >> 4`
/// (top-k: a quarter), so that the decoders are reached without finding the field first.
pub fn assemble(data: &[u8]) -> Option<Payload> {
    let msgs = super::shared::messages(data);
    let (flags, rest) = msgs.split_first()?;
    let flags = flags.first().copied().unwrap_or(0);
    let (manifest, chunks) = rest.split_first()?;
    let mut manifest = pb::Manifest::decode(*manifest).ok()?;
    if flags & 8 != 0 {
        manifest.compression = Some(pb::Compression {
            encoding: i32::from(flags >> 4),
            topk_fraction: 0.25,
        });
    }
    if flags & 1 == 0 {
        let whole: Vec<u8> = chunks.concat();
        manifest.checksum = xxhash_rust::xxh3::xxh3_64(&whole);
    }
    let mut asm = Assembler::new(manifest, 1 << 20).ok()?;
    let mut offset = 0u64;
    for c in chunks {
        let (offset_here, bytes) = if flags & 2 != 0 && c.len() >= 8 {
            let mut o = [0u8; 8];
            o.copy_from_slice(&c[..8]);
            (u64::from_le_bytes(o), &c[8..])
        } else {
            (offset, *c)
        };
        let chunk = pb::Chunk {
            offset: offset_here,
            data: bytes.to_vec().into(),
            checksum: if flags & 4 != 0 {
                0
            } else {
                xxhash_rust::xxh3::xxh3_64(bytes)
            },
        };
        asm.push(&chunk).ok()?;
        offset += bytes.len() as u64;
    }
    asm.finish().ok()
}
