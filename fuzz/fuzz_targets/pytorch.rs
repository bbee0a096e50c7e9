//! A PyTorch checkpoint (`.pt`: zip or legacy pickle) loaded onto a small model, as `--init`
//! reads an untrusted file.

#![no_main]

#[path = "shared.rs"]
mod shared;

use fedtune_formats::pretrained::{InitOptions, load};
use fedtune_formats::tensors::{NamedTensor, TensorSet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = shared::file_with(data, "model.pt");
    let Ok(w) = NamedTensor::new("fc.weight", vec![4, 3], vec![0.0; 12]) else {
        return;
    };
    let Ok(b) = NamedTensor::new("fc.bias", vec![3], vec![0.0; 3]) else {
        return;
    };
    let Ok(init) = TensorSet::new(vec![w, b]) else {
        return;
    };
    let _ = load(&path, &init, &InitOptions::default());
});
