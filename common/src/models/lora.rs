//! LoRA adapters on a transformer's projections: which projections get one, how they start,
//! which tensors then train and travel, and the adapters out as PEFT's files or merged.
//!
//! With LoRA the frozen base of a projection `P` is `P.weight` (burn layout `[in, out]`), the
//! adapter `P.lora.a` `[in, r]` and `P.lora.b` `[r, out]`, and the layer computes
//! `x·W + (alpha / r)·(drop(x)·a)·b` ([`super::lora_linear`]). `b` starts at zero, so adding
//! adapters leaves the model's outputs unchanged.
//!
//! Two federated modes:
//! - **FedIT** (`fedit`, Zhang et al. 2024): `a` and `b` both train and are averaged
//!   separately. Approximate: mean(b)·mean(a) ≠ mean(b·a) when clients' `a` differ.
//! - **FFA-LoRA** (`ffa`, Sun et al. 2024): `a` stays as the coordinator initialised it (frozen,
//!   identical everywhere); only `b` trains, so averaging `b` averages the updates exactly:
//!   mean(a·b_k) = a·mean(b_k).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use super::lora_linear::LoraAdapter;
use crate::tensors::{NamedTensor, TensorSet};

/// Projections of a BERT layer that can carry adapters (Hugging Face's names for them, which
/// [`super::bert_encoder`] builds them under).
pub const TARGETS: &[&str] = &[
    "query",
    "key",
    "value",
    "attention_output",
    "intermediate",
    "output",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    FedIt,
    Ffa,
}

impl FromStr for LoraMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fedit" => Ok(Self::FedIt),
            "ffa" => Ok(Self::Ffa),
            _ => Err(format!(
                "unknown LoRA mode `{s}`: use fedit (A and B averaged, approximate) or ffa (A frozen, B averaged, exact)"
            )),
        }
    }
}

impl fmt::Display for LoraMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FedIt => "fedit",
            Self::Ffa => "ffa",
        })
    }
}

/// Which adapters a run trains. Travels in every task so that every client builds the same
/// adapted model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Names from [`TARGETS`].
    pub targets: Vec<String>,
    pub mode: LoraMode,
    /// Probability of dropping each element of an adapter's input while training (PEFT's
    /// `lora_dropout`); the frozen path is never dropped.
    pub dropout: f64,
}

impl LoraSpec {
    /// Checks values that may come from a peer or a config file.
    pub fn new(
        rank: usize,
        alpha: f64,
        targets: Vec<String>,
        mode: LoraMode,
    ) -> Result<Self, String> {
        if !(1..=1024).contains(&rank) {
            return Err(format!("LoRA rank {rank} must be in 1..=1024"));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(format!("LoRA alpha {alpha} must be a positive number"));
        }
        if targets.is_empty() {
            return Err("LoRA needs at least one target (e.g. query,value)".into());
        }
        for t in &targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(format!(
                    "unknown LoRA target `{t}`: choose from {}",
                    TARGETS.join(", ")
                ));
            }
        }
        Ok(Self {
            rank,
            alpha,
            targets,
            mode,
            dropout: 0.0,
        })
    }

    /// With LoRA dropout `p`, in `[0, 1)`.
    pub fn with_dropout(mut self, p: f64) -> Result<Self, String> {
        if !(p.is_finite() && (0.0..1.0).contains(&p)) {
            return Err(format!(
                "LoRA dropout {p} must be in [0, 1) (a probability; 0 = off)"
            ));
        }
        self.dropout = p;
        Ok(self)
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// A fresh adapter for the projection `target` (`[in, out]`) when this spec targets it:
    /// `a` drawn like PEFT's (std 1/√(3·in), the std of its Kaiming-uniform draw), `b` zero.
    pub fn adapter(&self, target: &str, dims: [usize; 2], device: &Device) -> Option<LoraAdapter> {
        self.targets.iter().any(|t| t == target).then(|| {
            LoraAdapter::new(
                dims,
                self.rank,
                self.scale(),
                1.0 / (3.0 * dims[0] as f64).sqrt(),
                self.dropout,
                device,
            )
        })
    }

    /// Whether the tensor `name` trains (and travels) under this spec: the adapters (FFA: `b`
    /// only) and the classifier head. The frozen base is everything else.
    pub fn is_trainable(&self, name: &str) -> bool {
        name.ends_with(".lora.b")
            || (self.mode == LoraMode::FedIt && name.ends_with(".lora.a"))
            || name.starts_with("head.")
    }
}

/// The adapters of `set` in PEFT's `adapter_model.safetensors` layout for a Hugging Face
/// `BertModel`: `base_model.model.<module>.lora_A.weight` `[r, in]` (= aᵀ) and `lora_B.weight`
/// `[out, r]` (= bᵀ); PEFT's scaling is the same alpha / r.
pub fn to_peft(set: &TensorSet) -> Result<TensorSet, String> {
    let mut out = Vec::new();
    for t in set.tensors() {
        let (module, factor) = match t.name.rsplit_once(".lora.") {
            Some((module, f @ ("a" | "b"))) => (module, f),
            _ => continue,
        };
        let hf = super::hf_bert::hf_name(&format!("{module}.weight"))
            .ok_or_else(|| format!("`{module}` has no Hugging Face name"))?;
        let module = hf.strip_suffix(".weight").unwrap_or(&hf);
        let which = if factor == "a" { "lora_A" } else { "lora_B" };
        let mut transposed = t.transposed();
        transposed.name = format!("base_model.model.{module}.{which}.weight");
        out.push(transposed);
    }
    if out.is_empty() {
        return Err("the model has no LoRA adapters".into());
    }
    TensorSet::new(out).map_err(|e| e.to_string())
}

/// `rank 8, alpha 16, on query,value, fedit, dropout 0.05`, for the logs.
impl fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {}, alpha {}, on {}, {}, dropout {}",
            self.rank,
            self.alpha,
            self.targets.join(","),
            match self.mode {
                LoraMode::FedIt => "fedit (A and B averaged)",
                LoraMode::Ffa => "ffa (A fixed, B averaged)",
            },
            self.dropout
        )
    }
}

impl LoraSpec {
    /// PEFT's `adapter_config.json` for these adapters on a `BertModel` at `base_model`.
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        let plain = ["query", "key", "value"];
        let target_modules = if self.targets.iter().all(|t| plain.contains(&t.as_str())) {
            serde_json::json!(self.targets)
        } else {
            // `dense` alone would match three different projections: name them in full.
            let paths: Vec<&str> = self
                .targets
                .iter()
                .map(|t| match t.as_str() {
                    "query" => r"attention\.self\.query",
                    "key" => r"attention\.self\.key",
                    "value" => r"attention\.self\.value",
                    "attention_output" => r"attention\.output\.dense",
                    "intermediate" => r"intermediate\.dense",
                    _ => r"layer\.[0-9]+\.output\.dense",
                })
                .collect();
            serde_json::json!(format!(r".*\.({})$", paths.join("|")))
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "FEATURE_EXTRACTION",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
        })
    }
}

/// `set` with every adapter folded into its base weight (`W + scale·a·b`) and the factors
/// removed: the plain fine-tuned model.
pub fn merge(set: &TensorSet, scale: f64) -> Result<TensorSet, String> {
    let mut out = Vec::with_capacity(set.len());
    for t in set.tensors() {
        if t.name.ends_with(".lora.a") || t.name.ends_with(".lora.b") {
            continue;
        }
        let module = t.name.strip_suffix(".weight");
        let factor = |f: &str| module.and_then(|m| set.get(&format!("{m}.lora.{f}")));
        let (a, b) = (factor("a"), factor("b"));
        let merged = match (a, b) {
            (Some(a), Some(b)) => add_low_rank(t, a, b, scale as f32)?,
            (None, None) => t.clone(),
            _ => return Err(format!("`{}` has only one of its two LoRA factors", t.name)),
        };
        out.push(merged);
    }
    TensorSet::new(out).map_err(|e| e.to_string())
}

/// `w + scale·a·b` for `w` `[in, out]`, `a` `[in, r]`, `b` `[r, out]`.
fn add_low_rank(
    w: &NamedTensor,
    a: &NamedTensor,
    b: &NamedTensor,
    scale: f32,
) -> Result<NamedTensor, String> {
    let (&[n_in, n_out], &[a_in, r], &[b_r, b_out]) =
        (w.shape.as_slice(), a.shape.as_slice(), b.shape.as_slice())
    else {
        return Err(format!("`{}`: LoRA factors must be matrices", w.name));
    };
    if (a_in, b_r, b_out) != (n_in, r, n_out) {
        return Err(format!(
            "`{}` is {:?} but its factors are {:?} and {:?}",
            w.name, w.shape, a.shape, b.shape
        ));
    }
    let mut data = w.data.clone();
    for i in 0..n_in {
        let row = &mut data[i * n_out..(i + 1) * n_out];
        for k in 0..r {
            let s = scale * a.data[i * r + k];
            if s == 0.0 {
                continue;
            }
            for (out, bv) in row.iter_mut().zip(&b.data[k * n_out..(k + 1) * n_out]) {
                *out += s * bv;
            }
        }
    }
    Ok(NamedTensor {
        name: w.name.clone(),
        shape: w.shape.clone(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(LoraSpec::new(8, 16.0, t(&["query", "value"]), LoraMode::FedIt).is_ok());
        let cases = [
            (0, 16.0, t(&["query"]), "rank 0"),
            (8, f64::NAN, t(&["query"]), "alpha"),
            (8, 16.0, t(&[]), "at least one target"),
            (8, 16.0, t(&["qkv"]), "unknown LoRA target `qkv`"),
        ];
        for (rank, alpha, targets, want) in cases {
            let e = LoraSpec::new(rank, alpha, targets, LoraMode::Ffa).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!("lora".parse::<LoraMode>().is_err());
        let spec = LoraSpec::new(8, 16.0, t(&["query"]), LoraMode::FedIt).unwrap();
        assert_eq!(spec.clone().with_dropout(0.05).unwrap().dropout, 0.05);
        for p in [-0.1, 1.0, f64::NAN] {
            let e = spec.clone().with_dropout(p).unwrap_err();
            assert!(e.contains("LoRA dropout") && e.contains("[0, 1)"), "{e}");
        }
    }

    #[test]
    fn merge_adds_the_scaled_low_rank_product() {
        let w = NamedTensor::new("x.weight", vec![2, 3], vec![0.0; 6]).unwrap();
        let a = NamedTensor::new("x.lora.a", vec![2, 1], vec![1.0, 2.0]).unwrap();
        let b = NamedTensor::new("x.lora.b", vec![1, 3], vec![1.0, 0.0, -1.0]).unwrap();
        let set = TensorSet::new(vec![w, a, b]).unwrap();
        let merged = merge(&set, 0.5).unwrap();
        assert_eq!(merged.len(), 1);
        assert_eq!(
            merged.get("x.weight").unwrap().data,
            vec![0.5, 0.0, -0.5, 1.0, 0.0, -1.0]
        );
    }
}
