//! `pretrained` (in `fedtune-formats`) on real models' weights: loading needs a model's fresh
//! parameters, which burn builds.

use std::path::Path;

use crate::models::ModelSpec;
use crate::pretrained::*;

/// The values `tests/fixtures/make-mlp-torch.py` wrote for an `[out, in]` tensor.
fn pattern(out_f: usize, in_f: usize, salt: usize) -> Vec<f32> {
    (0..out_f * in_f)
        .map(|k| (((k + salt) % 1000) as f64 / 1000.0 - 0.5) as f32)
        .collect()
}

fn rules(r: &[(&str, &str)]) -> Vec<Remap> {
    r.iter().map(|(p, s)| Remap::new(p, s).unwrap()).collect()
}

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mlp-torch.pt")
}

#[test]
fn a_pytorch_checkpoint_loads_through_remap_rules_in_burns_layout() {
    let init = ModelSpec::parse("mlp", 10)
        .unwrap()
        .init_weights(1)
        .unwrap();
    let opts = InitOptions {
        remap: rules(&[(r"^features\.0\.", "fc1."), (r"^classifier\.", "fc2.")]),
        layout: Layout::Auto,
        reset_head: None,
    };
    let (set, report, adapted) = load(&fixture(), &init, &opts).unwrap();
    assert_eq!(report.applied.len(), 4);
    assert!(report.missing.is_empty());
    assert_eq!(report.unused, vec!["features.1.num_batches_tracked"]);
    assert_eq!(adapted.transposed, vec!["fc1.weight", "fc2.weight"]);
    // fc1.weight is [in = 784, out = 256]: element (j, i) is the file's (i, j).
    let file = pattern(256, 784, 0);
    let w = set.get("fc1.weight").unwrap();
    assert_eq!(w.shape, vec![784, 256]);
    for (i, j) in [(0, 0), (3, 700), (255, 783), (100, 1)] {
        assert_eq!(w.data[j * 256 + i], file[i * 784 + j], "({i}, {j})");
    }
    assert_eq!(set.get("fc2.bias").unwrap().data, pattern(1, 10, 11));

    // Without the rules nothing fits, and the error lists what the file has.
    let bare = InitOptions {
        remap: vec![],
        ..opts.clone()
    };
    let e = load(&fixture(), &init, &bare).unwrap_err().to_string();
    assert!(
        e.contains("none of the model's tensors") && e.contains("classifier.weight"),
        "{e}"
    );
    // Read as burn's layout, the shapes do not fit: the error names both.
    let burn = InitOptions {
        layout: Layout::Burn,
        ..opts.clone()
    };
    let e = load(&fixture(), &init, &burn).unwrap_err().to_string();
    assert!(
        e.contains("fc1.weight") && e.contains("[784, 256]") && e.contains("[256, 784]"),
        "{e}"
    );
}

#[test]
fn another_tools_safetensors_missing_unused_shape_errors_and_head_reset() {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    // Written with the safetensors crate directly, keys as another tool names them,
    // PyTorch layout, a 5-class head, fc1.bias absent, one extra tensor.
    let w1: Vec<u8> = pattern(256, 784, 0)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let w2: Vec<u8> = pattern(5, 256, 3)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let extra: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "model.encoder.dense.weight",
            TensorView::new(safetensors::Dtype::F32, vec![256, 784], &w1).unwrap(),
        ),
        (
            "model.head.weight",
            TensorView::new(safetensors::Dtype::F32, vec![5, 256], &w2).unwrap(),
        ),
        (
            "model.temperature",
            TensorView::new(safetensors::Dtype::F32, vec![2], &extra).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &path).unwrap();

    let init = ModelSpec::parse("mlp", 10)
        .unwrap()
        .init_weights(1)
        .unwrap();
    let opts = InitOptions {
        remap: rules(&[
            (r"^model\.", ""),
            (r"^encoder\.dense\.", "fc1."),
            (r"^head\.", "fc2."),
        ]),
        layout: Layout::PyTorch,
        reset_head: None,
    };
    // A 5-class head on a 10-class model: refused, naming the tensor and both shapes.
    let e = load(&path, &init, &opts).unwrap_err().to_string();
    assert!(
        e.contains("fc2.weight") && e.contains("[256, 10]") && e.contains("[256, 5]"),
        "{e}"
    );
    // With the head reset, the rest loads and the head keeps its fresh weights.
    let reset = InitOptions {
        reset_head: Some("fc2.".into()),
        ..opts
    };
    let (set, report, adapted) = load(&path, &init, &reset).unwrap();
    assert_eq!(report.applied, vec!["fc1.weight"]);
    assert_eq!(report.missing, vec!["fc1.bias"]);
    assert_eq!(report.unused, vec!["temperature"]);
    assert_eq!(
        adapted.reset,
        vec![
            ("fc2.weight".to_string(), Some(vec![5, 256])),
            ("fc2.bias".to_string(), None)
        ]
    );
    assert_eq!(set.get("fc2.weight"), init.get("fc2.weight"));
    assert_eq!(set.get("fc1.bias"), init.get("fc1.bias"));
    // Two keys renamed to one name are refused.
    let clash = InitOptions {
        remap: rules(&[(r"^model\.[a-z.]*weight$", "fc1.weight")]),
        layout: Layout::PyTorch,
        reset_head: None,
    };
    let e = load(&path, &init, &clash).unwrap_err().to_string();
    assert!(e.contains("both become `fc1.weight`"), "{e}");
    assert!(
        Remap::new("(", "x")
            .unwrap_err()
            .contains("not a valid regex")
    );
}

#[test]
fn pytorch_export_transposes_linear_weights_only() {
    let cnn = ModelSpec::parse("cnn", 10)
        .unwrap()
        .init_weights(2)
        .unwrap();
    let out = to_pytorch_layout(&cnn);
    for t in cnn.tensors() {
        let o = out.get(&t.name).unwrap();
        if t.name.starts_with("fc") && t.name.ends_with(".weight") {
            assert_eq!(o.shape, vec![t.shape[1], t.shape[0]], "{}", t.name);
            assert_eq!(
                o.data[1], t.data[t.shape[1]],
                "{}: (0, 1) is (1, 0)",
                t.name
            );
        } else {
            assert_eq!(o, t, "{} keeps its layout", t.name);
        }
    }
}
