//! An image folder (`<class>/<file>`) with one fuzzed file, PNG or JPEG by the first byte, as a
//! client opens its data.

#![no_main]

#[path = "shared.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((kind, image)) = data.split_first() else {
        return;
    };
    let dir = shared::fresh_dir();
    let class = dir.join("shirt");
    std::fs::create_dir_all(&class).expect("create the class folder");
    let name = if kind & 1 == 0 { "x.png" } else { "x.jpg" };
    std::fs::write(class.join(name), image).expect("write the image");
    let _ = fedtune_formats::data::image_folder::read(&dir, 28);
});
