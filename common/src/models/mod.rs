//! Built-in models, built by name: the coordinator names the model in each task and the client
//! builds the same architecture, so no code travels over the wire.

pub mod bert;
#[cfg(test)]
mod bert_tests;
mod cnn;
pub mod hf_bert;
pub mod lora;
mod mlp;
pub mod synthetic;

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::tensor::{Bool, Device, Int, Tensor};

pub use bert::{BertArch, TextClassifier};
pub use cnn::Cnn;
pub use lora::{LoraMode, LoraSpec};
pub use mlp::Mlp;

use crate::params::{self, ParamsError};
use crate::tensors::{TensorSet, TensorSpec};

/// Image geometry of the built-in image models.
pub const IMAGE_CHANNELS: usize = 1;
pub const IMAGE_SIZE: usize = 28;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error(
        "unknown model `{0}`: choose mlp, cnn, tabular-mlp:<features> (e.g. tabular-mlp:13), bert (with --init DIR, a Hugging Face BERT folder) or synthetic:<params> (e.g. synthetic:10M)"
    )]
    Unknown(String),
    #[error("{0}")]
    BadBert(String),
    #[error(
        "model `bert` needs its architecture: give --init DIR (a Hugging Face BERT folder with config.json), or name it in full, e.g. bert:v30522,h384,l6,a12,i1536,p512,t2,eps1e-12"
    )]
    BertWithoutArch,
    #[error("LoRA adapters need a transformer (--model bert); `{0}` has none")]
    LoraNeedsTransformer(String),
    #[error("{0}")]
    BadLora(String),
    #[error(
        "`{0}`: the number after `tabular-mlp:` must be the count of feature columns (1 or more)"
    )]
    BadFeatures(String),
    #[error(
        "`{0}`: the parameter count after `synthetic:` must be a positive number, optionally with k, M or G (e.g. synthetic:600M)"
    )]
    BadSyntheticSize(String),
    #[error("number of classes must be at least 2, got {0}")]
    BadClasses(u32),
    #[error("model `{0}` has no architecture to train; run its clients with `--train none`")]
    NotTrainable(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelKind {
    Mlp,
    Cnn,
    /// The MLP on `features` numeric inputs (CSV data).
    TabularMlp {
        features: usize,
    },
    Synthetic {
        params: u64,
    },
    /// BERT with a classification head on mean-pooled token states (text).
    Bert(BertArch),
}

impl FromStr for ModelKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mlp" => Ok(Self::Mlp),
            "cnn" => Ok(Self::Cnn),
            "bert" => Err(ModelError::BertWithoutArch),
            _ => {
                if let Some(arch) = s.strip_prefix("bert:") {
                    return arch.parse().map(Self::Bert).map_err(ModelError::BadBert);
                }
                if let Some(n) = s.strip_prefix("tabular-mlp:") {
                    return match n.parse::<usize>() {
                        Ok(features) if (1..=1 << 20).contains(&features) => {
                            Ok(Self::TabularMlp { features })
                        }
                        _ => Err(ModelError::BadFeatures(s.to_string())),
                    };
                }
                match s.strip_prefix("synthetic:") {
                    Some(size) => parse_count(size)
                        .map(|params| Self::Synthetic { params })
                        .ok_or_else(|| ModelError::BadSyntheticSize(s.to_string())),
                    None => Err(ModelError::Unknown(s.to_string())),
                }
            }
        }
    }
}

fn parse_count(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1_000),
        b'm' | b'M' => (&s[..s.len() - 1], 1_000_000),
        b'g' | b'G' => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    let n: f64 = digits.parse().ok()?;
    let total = n * mult as f64;
    (total.is_finite() && total >= 1.0 && total < u64::MAX as f64).then_some(total as u64)
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mlp => write!(f, "mlp"),
            Self::Cnn => write!(f, "cnn"),
            Self::TabularMlp { features } => write!(f, "tabular-mlp:{features}"),
            Self::Synthetic { params } => write!(f, "synthetic:{params}"),
            Self::Bert(arch) => write!(f, "{arch}"),
        }
    }
}

/// How a text model reads its input. Travels with the model so that every client tokenises
/// and numbers classes the same way.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextInput {
    /// Class names in class-number order (empty: labels are class numbers).
    pub labels: Vec<String>,
    /// SHA-256 (hex) of the coordinator's `tokenizer.json`; a client with another refuses.
    pub tokenizer_sha256: String,
    /// Longer texts are truncated to this many tokens (special tokens included).
    pub max_seq_len: usize,
}

/// Which model, for how many classes, with which adapters. Travels in every task.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub num_classes: u32,
    /// LoRA adapters on the transformer (`None`: no adapters).
    pub lora: Option<LoraSpec>,
    /// For text models: tokenisation and label names.
    pub text: Option<TextInput>,
}

/// What a model takes in one batch (one lives at a time, moved into `forward`: boxing the
/// larger variant would buy nothing).
#[allow(clippy::large_enum_variant)]
pub enum ModelInput {
    /// `[batch, channels, height, width]`, normalised (tabular rows as `[batch, 1, 1, n]`).
    Images(Tensor<4>),
    /// Token ids `[batch, seq]` and `padding` (true at padding positions).
    Tokens {
        ids: Tensor<2, Int>,
        padding: Tensor<2, Bool>,
    },
}

/// Dropout of the built-in models while training, unless the run sets another.
pub const DROPOUT: f64 = 0.1;

impl ModelSpec {
    pub fn new(kind: ModelKind, num_classes: u32) -> Result<Self, ModelError> {
        if num_classes < 2 {
            return Err(ModelError::BadClasses(num_classes));
        }
        Ok(Self {
            kind,
            num_classes,
            lora: None,
            text: None,
        })
    }

    /// Adds LoRA adapters (transformers only).
    pub fn with_lora(mut self, lora: Option<LoraSpec>) -> Result<Self, ModelError> {
        if lora.is_some() && !self.is_text() {
            return Err(ModelError::LoraNeedsTransformer(self.kind.to_string()));
        }
        self.lora = lora;
        Ok(self)
    }

    /// Whether the model reads text (tokens) rather than images or table rows.
    pub fn is_text(&self) -> bool {
        matches!(self.kind, ModelKind::Bert(_))
    }

    /// The tensors that do not train under this spec's adapters (none without LoRA): the
    /// frozen base, sent once and kept by content hash.
    pub fn lora_frozen(&self) -> Vec<String> {
        match &self.lora {
            Some(lora) => self
                .specs()
                .into_iter()
                .filter(|s| !lora.is_trainable(&s.name))
                .map(|s| s.name)
                .collect(),
            None => Vec::new(),
        }
    }

    pub fn parse(name: &str, num_classes: u32) -> Result<Self, ModelError> {
        Self::new(name.parse()?, num_classes)
    }

    /// Builds the network on `device` with fresh (seeded by the device) weights.
    pub fn build(&self, device: &Device) -> Result<Net, ModelError> {
        self.build_with_dropout(device, DROPOUT)
    }

    /// The tensor-name prefix of the classifier head (replaced by `--reset-head`, kept
    /// trainable by `--freeze head-only`).
    pub fn head_prefix(&self) -> Option<&'static str> {
        match self.kind {
            ModelKind::Mlp | ModelKind::Cnn | ModelKind::TabularMlp { .. } => Some("fc2."),
            ModelKind::Bert(_) => Some("head."),
            ModelKind::Synthetic { .. } => None,
        }
    }

    /// As [`ModelSpec::build`] with dropout probability `dropout` (active only in training).
    pub fn build_with_dropout(&self, device: &Device, dropout: f64) -> Result<Net, ModelError> {
        let classes = self.num_classes as usize;
        match self.kind {
            ModelKind::Mlp => Ok(Net::Mlp(Mlp::new(
                IMAGE_CHANNELS * IMAGE_SIZE * IMAGE_SIZE,
                classes,
                dropout,
                device,
            ))),
            ModelKind::TabularMlp { features } => {
                Ok(Net::Mlp(Mlp::new(features, classes, dropout, device)))
            }
            ModelKind::Cnn => Ok(Net::Cnn(Cnn::new(
                IMAGE_CHANNELS,
                IMAGE_SIZE,
                IMAGE_SIZE,
                classes,
                dropout,
                device,
            ))),
            ModelKind::Bert(arch) => {
                let net = TextClassifier::new(&arch, classes, dropout, device);
                let net = match &self.lora {
                    Some(lora) => lora.apply(net, arch.hidden).map_err(ModelError::BadLora)?,
                    None => net,
                };
                Ok(Net::Bert(net))
            }
            ModelKind::Synthetic { .. } => Err(ModelError::NotTrainable(self.kind.to_string())),
        }
    }

    /// Whether `data` fits this model: labels below the number of classes, and 28×28 images for
    /// the image models or rows of exactly `features` values for `tabular-mlp`.
    pub fn check_data(
        &self,
        data: &crate::data::ImageDataset,
    ) -> Result<(), crate::data::DataError> {
        use crate::data::DataError;
        data.check_labels(self.num_classes)?;
        let mismatch = |reason: String| DataError::File {
            path: data.source.clone(),
            reason,
        };
        if self.is_text() {
            return Err(mismatch(format!(
                "image or table data, but the model `{}` reads text: give a CSV/TSV/JSONL file with a text column",
                self.kind
            )));
        }
        match (self.kind, data.is_tabular()) {
            (ModelKind::TabularMlp { features }, true) if data.cols == features => Ok(()),
            (ModelKind::TabularMlp { features }, true) => Err(mismatch(format!(
                "{} feature columns, the model `{}` takes {features}",
                data.cols, self.kind
            ))),
            (ModelKind::TabularMlp { .. }, false) => Err(mismatch(format!(
                "image data, but the model `{}` takes CSV rows",
                self.kind
            ))),
            (_, true) => Err(mismatch(format!(
                "tabular (CSV) data, but the model `{}` takes 28x28 images; use tabular-mlp:{}",
                self.kind, data.cols
            ))),
            _ => data.check_image_size(IMAGE_SIZE, IMAGE_SIZE),
        }
    }

    /// Initial weights, deterministic in `seed`.
    pub fn init_weights(&self, seed: u64) -> Result<TensorSet, ParamsError> {
        match self.kind {
            ModelKind::Synthetic { params } => Ok(synthetic::init(params)),
            _ => {
                let device = Device::flex();
                device.seed(seed);
                let net = self.build(&device).map_err(|e| ParamsError::Read {
                    name: self.kind.to_string(),
                    message: e.to_string(),
                })?;
                params::extract(&net)
            }
        }
    }

    /// Names and shapes of the model's parameters.
    pub fn specs(&self) -> Vec<TensorSpec> {
        match self.kind {
            ModelKind::Synthetic { params } => synthetic::specs(params),
            _ => match self.build(&Device::flex()) {
                Ok(net) => params::specs(&net),
                Err(_) => Vec::new(),
            },
        }
    }
}

/// One of the trainable built-in networks.
// A process holds one or two of these; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Net {
    Mlp(Mlp),
    Cnn(Cnn),
    Bert(TextClassifier),
}

/// A batch of one kind given to a model that reads another.
#[derive(Debug, thiserror::Error)]
#[error("the model reads {model}, the batch holds {batch}")]
pub struct InputMismatch {
    model: &'static str,
    batch: &'static str,
}

impl Net {
    pub fn num_classes(&self) -> usize {
        match self {
            Net::Mlp(m) => m.num_classes(),
            Net::Cnn(m) => m.num_classes(),
            Net::Bert(m) => m.num_classes(),
        }
    }

    /// Logits `[batch, classes]`.
    pub fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
        match (self, input) {
            (Net::Mlp(m), ModelInput::Images(x)) => Ok(m.forward(x)),
            (Net::Cnn(m), ModelInput::Images(x)) => Ok(m.forward(x)),
            (Net::Bert(m), ModelInput::Tokens { ids, padding }) => Ok(m.forward(ids, padding)),
            (Net::Bert(_), ModelInput::Images(_)) => Err(InputMismatch {
                model: "text",
                batch: "images",
            }),
            (_, ModelInput::Tokens { .. }) => Err(InputMismatch {
                model: "images",
                batch: "text",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!("mlp".parse(), Ok(ModelKind::Mlp));
        assert_eq!(
            "synthetic:10M".parse(),
            Ok(ModelKind::Synthetic { params: 10_000_000 })
        );
        assert_eq!(
            "synthetic:1.5k".parse(),
            Ok(ModelKind::Synthetic { params: 1_500 })
        );
        assert!(matches!(
            "synthetic:-3".parse::<ModelKind>(),
            Err(ModelError::BadSyntheticSize(_))
        ));
        assert!(matches!(
            "resnet".parse::<ModelKind>(),
            Err(ModelError::Unknown(_))
        ));
        assert!(ModelSpec::parse("mlp", 1).is_err());
    }

    #[test]
    fn built_in_models_have_stable_names() {
        let spec = ModelSpec::parse("cnn", 10).unwrap();
        let names: Vec<_> = spec.specs().into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias"
            ]
        );
    }
}
