//! libtorch (feature `tch`): the same weights give the same outputs on flex and libtorch, and
//! asking for CUDA where there is none is a clear error, not a panic.
#![cfg(feature = "tch")]

use fedtune_common::data::{DataFolder, Examples};
use fedtune_common::device::{DeviceChoice, DeviceError};
use fedtune_common::embed::SentenceEncoder;
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::TensorSet;
use fedtune_tests::{fashion_subset, minilm_dir, minilm_reference};

fn logits(spec: &ModelSpec, weights: &TensorSet, device: DeviceChoice) -> Vec<f32> {
    let device = device.device().unwrap();
    let model = spec
        .build(&device)
        .unwrap()
        .inject(weights)
        .unwrap()
        .valid();
    let test = DataFolder::open(&fashion_subset())
        .unwrap()
        .evaluation_set();
    let (images, _) = test.batch(&(0..64).collect::<Vec<_>>(), &device, None);
    model
        .forward(images)
        .unwrap()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap()
}

#[test]
fn same_weights_same_outputs_on_flex_and_libtorch() {
    for name in ["mlp", "cnn"] {
        let spec = ModelSpec::parse(name, 10).unwrap();
        // One set of weights for both (drawing them twice would race with other tests on the
        // device's random generator).
        let weights = spec.init_weights(3).unwrap();
        let (a, b) = (
            logits(&spec, &weights, DeviceChoice::Flex),
            logits(&spec, &weights, DeviceChoice::LibTorch),
        );
        assert_eq!(a.len(), 64 * 10);
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{name}: flex and libtorch differ by {worst}");
    }
}

#[test]
fn minilm_gives_the_published_similarities_on_libtorch() {
    let Some(dir) = minilm_dir() else { return };
    let device = DeviceChoice::LibTorch.device().unwrap();
    let encoder = SentenceEncoder::open(&dir, &device, 256).unwrap();
    minilm_reference::check(|s| encoder.encode(s, 8).unwrap(), "libtorch");
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    match DeviceChoice::Cuda(0).device() {
        Ok(_) => eprintln!("a CUDA device is present; nothing to check here"),
        Err(e) => {
            assert!(matches!(e, DeviceError::CudaUnavailable { .. }), "{e}");
            assert!(e.to_string().contains("cuda:0"), "{e}");
        }
    }
}
