//! Pre-trained weights in: safetensors or PyTorch (`.pt` / `.pth`) files, keys renamed by
//! regex rules, PyTorch's layout adapted to burn's, the classifier head optionally
//! re-initialised; and the global model out in PyTorch's layout.
//!
//! Layouts: burn's `Linear` stores its weight as `[in, out]`, PyTorch's as `[out, in]`;
//! convolutions agree (`[out, in, kh, kw]`). So a 2-D `*.weight` is transposed when the file
//! is in PyTorch layout.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;

use crate::checkpoint::{self, CheckpointError};
use crate::tensors::{NamedTensor, TensorSet};

/// How a file's tensors are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `.pt` / `.pth` files are PyTorch's, safetensors files burn's.
    Auto,
    Burn,
    PyTorch,
}

impl std::str::FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "burn" => Ok(Self::Burn),
            "pytorch" => Ok(Self::PyTorch),
            _ => Err(format!("unknown layout `{s}`: use auto, burn or pytorch")),
        }
    }
}

/// A key-renaming rule: every match of `pattern` in a file key is replaced (`$1` etc. refer to
/// capture groups). Rules apply in order, each to the result of the previous one.
#[derive(Debug, Clone)]
pub struct Remap {
    pub pattern: Regex,
    pub replacement: String,
}

impl Remap {
    pub fn new(pattern: &str, replacement: &str) -> Result<Self, String> {
        Ok(Self {
            pattern: Regex::new(pattern)
                .map_err(|e| format!("remap pattern `{pattern}` is not a valid regex: {e}"))?,
            replacement: replacement.to_string(),
        })
    }
}

/// How to load pre-trained weights (default: names as they are, layout by extension).
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub remap: Vec<Remap>,
    pub layout: Layout,
    /// Tensor-name prefix of the classifier head, re-initialised instead of loaded.
    pub reset_head: Option<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            remap: Vec::new(),
            layout: Layout::Auto,
            reset_head: None,
        }
    }
}

/// What loading pre-trained weights into a model did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub applied: Vec<String>,
    /// Model tensors the file lacks: they keep their fresh initialisation.
    pub missing: Vec<String>,
    /// File tensors the model has no place for: ignored.
    pub unused: Vec<String>,
}

/// What loading did beyond the report: tensors transposed from PyTorch's layout, and the head
/// tensors re-initialised (with the file's shape, if it had them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Adaptations {
    pub transposed: Vec<String>,
    pub reset: Vec<(String, Option<Vec<usize>>)>,
}

fn is_pytorch_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pt" | "pth" | "bin")
    )
}

/// Every tensor of a PyTorch checkpoint, as f32 (floating dtypes only; others are skipped and
/// returned by name).
fn read_pytorch(path: &Path) -> Result<(Vec<NamedTensor>, Vec<String>), CheckpointError> {
    use pytorch_reader::{DType, PytorchReader};
    let err = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let reader = PytorchReader::new(path)
        .map_err(|e| err(format!("not a readable PyTorch checkpoint: {e}")))?;
    let mut names: Vec<&String> = reader.tensors().keys().collect();
    names.sort();
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    for name in names {
        let t = &reader.tensors()[name];
        let bytes = t.read().map_err(|e| err(e.to_string()))?;
        let data: Vec<f32> = match t.dtype() {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => {
                skipped.push(name.clone());
                continue;
            }
        };
        let shape = t.shape().to_vec();
        out.push(NamedTensor::new(name.clone(), shape, data).map_err(|e| err(e.to_string()))?);
    }
    Ok((out, skipped))
}

/// Loads `path` onto a model whose fresh parameters are `init`.
pub fn load(
    path: &Path,
    init: &TensorSet,
    opts: &InitOptions,
) -> Result<(TensorSet, LoadReport, Adaptations), CheckpointError> {
    let pytorch_file = is_pytorch_file(path);
    let (raw, skipped) = if pytorch_file {
        read_pytorch(path)?
    } else {
        (checkpoint::load(path)?.0.into_tensors(), Vec::new())
    };
    let pytorch_layout = match opts.layout {
        Layout::Auto => pytorch_file,
        Layout::Burn => false,
        Layout::PyTorch => true,
    };
    // Rename, refusing two file keys that end up with the same name.
    let mut renamed: HashMap<String, NamedTensor> = HashMap::new();
    let mut order = Vec::new();
    for mut t in raw {
        let original = t.name.clone();
        for rule in &opts.remap {
            t.name = rule
                .pattern
                .replace_all(&t.name, rule.replacement.as_str())
                .into_owned();
        }
        if let Some(other) = renamed.get(&t.name) {
            return Err(CheckpointError::Format {
                path: path.to_path_buf(),
                message: format!(
                    "after remapping, `{original}` and another key both become `{}` (the other one's shape is {:?}); fix the remap rules",
                    t.name, other.shape
                ),
            });
        }
        order.push(t.name.clone());
        renamed.insert(t.name.clone(), t);
    }
    let mut adapt = Adaptations::default();
    let is_head = |n: &str| opts.reset_head.as_deref().is_some_and(|h| n.starts_with(h));
    let mut report = LoadReport {
        applied: vec![],
        missing: vec![],
        unused: vec![],
    };
    let mut out = Vec::with_capacity(init.len());
    for t in init.tensors() {
        if is_head(&t.name) {
            adapt.reset.push((
                t.name.clone(),
                renamed.get(&t.name).map(|f| f.shape.clone()),
            ));
            out.push(t.clone());
            continue;
        }
        let Some(f) = renamed.get(&t.name) else {
            report.missing.push(t.name.clone());
            out.push(t.clone());
            continue;
        };
        let f = if pytorch_layout && f.shape.len() == 2 && t.name.ends_with(".weight") {
            adapt.transposed.push(t.name.clone());
            f.transposed()
        } else {
            f.clone()
        };
        if f.shape != t.shape {
            return Err(CheckpointError::Shape {
                path: path.to_path_buf(),
                name: t.name.clone(),
                expected: t.shape.clone(),
                actual: f.shape,
            });
        }
        report.applied.push(t.name.clone());
        out.push(f);
    }
    report.unused = order
        .into_iter()
        .filter(|n| init.get(n).is_none())
        .chain(skipped)
        .collect();
    if report.applied.is_empty() {
        return Err(CheckpointError::NothingApplied {
            path: path.to_path_buf(),
            unused: report.unused,
        });
    }
    let set = TensorSet::new(out).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok((set, report, adapt))
}

/// `set` in PyTorch's layout: 2-D `*.weight` tensors transposed to `[out, in]`.
pub fn to_pytorch_layout(set: &TensorSet) -> TensorSet {
    let tensors = set
        .tensors()
        .iter()
        .map(|t| {
            if t.shape.len() == 2 && t.name.ends_with(".weight") {
                t.transposed()
            } else {
                t.clone()
            }
        })
        .collect();
    // Names are unchanged, so they stay unique.
    TensorSet::new(tensors).unwrap_or_else(|_| set.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelSpec;

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
}
