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
