//! An IDX file (Fashion-MNIST's format, gzipped or not) as a client opens its data.

#![no_main]

#[path = "shared.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = shared::file_with(data, "train-images-idx3-ubyte");
    let _ = fedtune_formats::data::idx::read(&path);
});
