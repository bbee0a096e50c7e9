//! Hugging Face BERT checkpoints in and out: the one table between burn's tensor names
//! (`bert.encoder.layers.0.attention.query.weight`, Linear weights `[in, out]`) and Hugging Face's
//! (`encoder.layer.0.attention.self.query.weight`, `[out, in]`).
//!
//! [`hf_name`] is the only mapping; loading looks each model tensor up under its Hugging Face
//! name and exporting renames by it, so the two directions cannot drift apart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::pretrained::LoadReport;
use crate::tensors::{NamedTensor, TensorSet};
use crate::wire::decode_le_vec;

#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("{}: tensor `{hf}` (the model's `{name}`) has shape {actual:?}; the model's config.json makes it {expected:?}", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        hf: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{}: not a BERT checkpoint: none of the encoder's tensors were found (e.g. `{example}`); the file holds {found}", path.display())]
    NotBert {
        path: PathBuf,
        example: String,
        found: String,
    },
    #[error("{}: {} of the encoder's tensors are missing, e.g. `{}`; the file does not match its config.json", path.display(), missing.len(), missing.first().map(String::as_str).unwrap_or(""))]
    Incomplete { path: PathBuf, missing: Vec<String> },
}

/// The Hugging Face name of a burn tensor of [`super::bert::TextClassifier`], or `None` for
/// tensors Hugging Face's `BertModel` does not have (LoRA factors).
pub fn hf_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("head.") {
        return matches!(rest, "weight" | "bias").then(|| format!("classifier.{rest}"));
    }
    let rest = name.strip_prefix("bert.")?;
    if rest.contains(".lora.") {
        return None;
    }
    let norm = |p: &str| match p {
        "gamma" => Some("weight"),
        "beta" => Some("bias"),
        _ => None,
    };
    if let Some(e) = rest.strip_prefix("embeddings.") {
        if let Some(p) = e.strip_prefix("layer_norm.") {
            return norm(p).map(|p| format!("embeddings.LayerNorm.{p}"));
        }
        return Some(format!("embeddings.{e}"));
    }
    let layer = rest.strip_prefix("encoder.layers.")?;
    let (index, tail) = layer.split_once('.')?;
    let (module, p) = tail.rsplit_once('.')?;
    let mapped = match module {
        "attention.query" | "attention.key" | "attention.value" => {
            format!("attention.self.{}.{p}", &module["attention.".len()..])
        }
        "attention.output" => format!("attention.output.dense.{p}"),
        "attention_norm" => format!("attention.output.LayerNorm.{}", norm(p)?),
        "intermediate" => format!("intermediate.dense.{p}"),
        "output" => format!("output.dense.{p}"),
        "output_norm" => format!("output.LayerNorm.{}", norm(p)?),
        _ => return None,
    };
    if !matches!(p, "weight" | "bias" | "gamma" | "beta") {
        return None;
    }
    Some(format!("encoder.layer.{index}.{mapped}"))
}

/// Whether a burn tensor is a Linear weight: `[in, out]` in burn, `[out, in]` in PyTorch.
/// (Embedding tables are `weight` too but stored alike; LayerNorms are `gamma`/`beta`.)
pub fn is_linear_weight(name: &str) -> bool {
    name.ends_with(".weight") && !name.contains(".lora.") && !name.contains(".embeddings.")
}

/// The float tensors of a safetensors file as f32, by name; the names of the others.
fn read_floats(path: &Path) -> Result<(HashMap<String, NamedTensor>, Vec<String>), HfError> {
    let err = |message: String| HfError::File {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let (mut out, mut other) = (HashMap::new(), Vec::new());
    for (name, view) in st.tensors() {
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => decode_le_vec(view.data()),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => {
                other.push(name);
                continue;
            }
        };
        let t = NamedTensor::new(name.clone(), view.shape().to_vec(), data)
            .map_err(|e| err(e.to_string()))?;
        out.insert(name, t);
    }
    Ok((out, other))
}

/// Where the weights of a Hugging Face model folder are.
pub fn weights_path(dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join("model.safetensors");
    if path.is_file() {
        return Ok(path);
    }
    let pytorch = dir.join("pytorch_model.bin");
    Err(if pytorch.is_file() {
        format!(
            "{}: only the PyTorch pickle is there; convert it to model.safetensors (safetensors' `convert` or `save_pretrained(safe_serialization=True)`)",
            dir.display()
        )
    } else {
        format!("{}: no model.safetensors in this folder", dir.display())
    })
}

/// Loads a Hugging Face BERT checkpoint onto `init` (the fresh parameters of a
/// [`super::bert::TextClassifier`], with or without LoRA): every encoder tensor must be in the
/// file with the shape the config gives; the classifier head is taken from the file only when
/// it has one of the right shape (a fine-tuned `BertForSequenceClassification`), otherwise it
/// keeps its fresh initialisation like the LoRA factors. A `bert.` prefix in the file's names
/// is accepted.
pub fn load(path: &Path, init: &TensorSet) -> Result<(TensorSet, LoadReport), HfError> {
    let (mut file, skipped) = read_floats(path)?;
    // BertForSequenceClassification and friends put the encoder under `bert.`.
    let prefixed: Vec<String> = file
        .keys()
        .filter(|k| k.starts_with("bert."))
        .cloned()
        .collect();
    for k in prefixed {
        if let Some(mut t) = file.remove(&k) {
            t.name = k["bert.".len()..].to_string();
            file.insert(t.name.clone(), t);
        }
    }
    let mut report = LoadReport {
        applied: vec![],
        missing: vec![],
        unused: vec![],
    };
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(init.len());
    let mut encoder_missing = Vec::new();
    for t in init.tensors() {
        let Some(hf) = hf_name(&t.name) else {
            report.missing.push(t.name.clone());
            out.push(t.clone());
            continue;
        };
        let is_head = t.name.starts_with("head.");
        let Some(f) = file.get(&hf) else {
            if !is_head {
                encoder_missing.push(hf);
            }
            report.missing.push(t.name.clone());
            out.push(t.clone());
            continue;
        };
        let f = if is_linear_weight(&t.name) && f.shape.len() == 2 {
            f.transposed()
        } else {
            f.clone()
        };
        if f.shape != t.shape {
            if is_head {
                // Another number of classes: the head starts fresh.
                report.missing.push(t.name.clone());
                out.push(t.clone());
                continue;
            }
            return Err(HfError::Shape {
                path: path.to_path_buf(),
                name: t.name.clone(),
                hf,
                expected: t.shape.clone(),
                actual: f.shape,
            });
        }
        used.insert(hf);
        report.applied.push(t.name.clone());
        out.push(NamedTensor {
            name: t.name.clone(),
            ..f
        });
    }
    let mut unused: Vec<String> = file
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .chain(skipped)
        .collect();
    unused.sort();
    report.unused = unused;
    if report
        .applied
        .iter()
        .all(|n| !n.starts_with("bert.encoder."))
    {
        let mut found: Vec<&String> = file.keys().collect();
        found.sort();
        let shown: Vec<&str> = found.iter().take(5).map(|s| s.as_str()).collect();
        return Err(HfError::NotBert {
            path: path.to_path_buf(),
            example: encoder_missing.first().cloned().unwrap_or_default(),
            found: format!(
                "{} tensors ({}{})",
                found.len(),
                shown.join(", "),
                if found.len() > 5 { ", …" } else { "" }
            ),
        });
    }
    if !encoder_missing.is_empty() {
        return Err(HfError::Incomplete {
            path: path.to_path_buf(),
            missing: encoder_missing,
        });
    }
    let set = TensorSet::new(out).map_err(|e| HfError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok((set, report))
}

/// `set` (a model without LoRA factors, e.g. merged) under Hugging Face names and layout:
/// what `transformers`' `BertModel.from_pretrained` loads (the head as `classifier.*`).
pub fn to_hf(set: &TensorSet) -> Result<TensorSet, String> {
    let mut out = Vec::with_capacity(set.len());
    for t in set.tensors() {
        let Some(hf) = hf_name(&t.name) else {
            return Err(format!(
                "`{}` has no Hugging Face name (merge LoRA factors before exporting)",
                t.name
            ));
        };
        let t = if is_linear_weight(&t.name) {
            t.transposed()
        } else {
            t.clone()
        };
        out.push(NamedTensor { name: hf, ..t });
    }
    TensorSet::new(out).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        let cases = [
            (
                "bert.embeddings.word_embeddings.weight",
                Some("embeddings.word_embeddings.weight"),
            ),
            (
                "bert.embeddings.layer_norm.gamma",
                Some("embeddings.LayerNorm.weight"),
            ),
            (
                "bert.encoder.layers.3.attention.query.bias",
                Some("encoder.layer.3.attention.self.query.bias"),
            ),
            (
                "bert.encoder.layers.0.attention.output.weight",
                Some("encoder.layer.0.attention.output.dense.weight"),
            ),
            (
                "bert.encoder.layers.5.attention_norm.beta",
                Some("encoder.layer.5.attention.output.LayerNorm.bias"),
            ),
            (
                "bert.encoder.layers.1.intermediate.weight",
                Some("encoder.layer.1.intermediate.dense.weight"),
            ),
            (
                "bert.encoder.layers.1.output.bias",
                Some("encoder.layer.1.output.dense.bias"),
            ),
            (
                "bert.encoder.layers.2.output_norm.gamma",
                Some("encoder.layer.2.output.LayerNorm.weight"),
            ),
            ("head.weight", Some("classifier.weight")),
            ("bert.encoder.layers.0.attention.query.lora.a", None),
            ("bert.encoder.layers.0.attention.query.lora.b", None),
            ("bert.encoder.layers.0.attention.output_norm.gamma", None),
            ("fc1.weight", None),
        ];
        for (burn, hf) in cases {
            assert_eq!(hf_name(burn).as_deref(), hf, "{burn}");
        }
        assert!(is_linear_weight(
            "bert.encoder.layers.0.attention.value.weight"
        ));
        assert!(is_linear_weight("head.weight"));
        assert!(!is_linear_weight("bert.embeddings.word_embeddings.weight"));
    }
}
