//! The coordinator's checks of an update, on a peer's stream: assembled, then its tensors
//! against the model's (names, shapes), every value finite, and turned into tensors.

#![no_main]

#[path = "shared.rs"]
mod shared;
#[path = "stream.rs"]
mod stream;

use fedtune_formats::tensors::{TensorSpec, check_specs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(update) = stream::assemble(data) else {
        return;
    };
    let model = [
        TensorSpec {
            name: "fc.weight".into(),
            shape: vec![4, 3],
        },
        TensorSpec {
            name: "fc.bias".into(),
            shape: vec![3],
        },
    ];
    if check_specs(&update.specs, &model).is_err() || update.check_finite().is_err() {
        return;
    }
    let _ = update.into_tensor_set();
});
