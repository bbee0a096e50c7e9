//! A safetensors file as `--init` and `--resume` read it (checksummed when it is fedtune's).

#![no_main]

#[path = "shared.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = shared::file_with(data, "model.safetensors");
    let _ = fedtune_formats::checkpoint::load(&path);
});
