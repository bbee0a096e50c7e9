//! The chunk assembler on a peer's stream: a manifest (protobuf) then chunks. The harness
//! gives chunks their true checksum and offset unless the input's flags say not to, so the
//! fuzzer gets past the checksums to what lies behind them.

#![no_main]

#[path = "shared.rs"]
mod shared;
#[path = "stream.rs"]
mod stream;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stream::assemble(data);
});
