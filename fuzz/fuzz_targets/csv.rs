//! A CSV table (features and a label column) as a client opens its data.

#![no_main]

#[path = "shared.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = shared::file_with(data, "data.csv");
    let _ = fedtune_formats::data::table::read_csv(&path, "label");
});
