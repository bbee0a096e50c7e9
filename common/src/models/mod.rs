//! Built-in models, built by name: the coordinator names the model in each task and the client
//! builds the same architecture, so no code travels over the wire.

mod architecture;
pub mod bert;
pub mod bert_encoder;
#[cfg(test)]
mod bert_tests;
mod cnn;
pub mod hf_bert;
pub mod lora;
pub mod lora_linear;
mod mlp;
mod model;
mod registry;
pub mod synthetic;

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

pub use architecture::{Architecture, Input, InputMismatch, ModelInput};
pub use bert::{BertArch, TextClassifier};
pub use cnn::Cnn;
pub use lora::{LoraMode, LoraSpec};
pub use lora_linear::{LoraAdapter, LoraLinear};
pub use mlp::{Mlp, TabularMlp};
pub use model::Model;
pub use registry::{Registered, lookup, register, registered};

use crate::params::ParamsError;
use crate::tensors::{TensorSet, TensorSpec};

/// Image geometry of the built-in image models.
pub const IMAGE_CHANNELS: usize = 1;
pub const IMAGE_SIZE: usize = 28;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error(
        "unknown model `{name}`: this program knows {known}. An architecture of your own must be registered in both the coordinator's and the clients' binaries (see examples/custom-model)"
    )]
    Unknown { name: String, known: String },
    /// The options after `name:` do not suit the architecture (the message says why).
    #[error("{0}")]
    BadOptions(String),
    #[error("{0}")]
    BadBert(String),
    #[error(
        "LoRA adapters need an architecture that takes them (bert); `{0}` does not: drop --lora-rank"
    )]
    LoraNotSupported(String),
    #[error("{0}")]
    BadLora(String),
    #[error(
        "`{0}`: the parameter count after `synthetic:` must be a positive number, optionally with k, M or G (e.g. synthetic:600M)"
    )]
    BadSyntheticSize(String),
    #[error("number of classes must be at least 2, got {0}")]
    BadClasses(u32),
    #[error("model `{0}` has no architecture to train; run its clients with `--train none`")]
    NotTrainable(String),
    #[error("{0}")]
    Registration(String),
}

/// Which model: a network of a registered architecture, or a bare parameter set.
#[derive(Clone, PartialEq)]
pub enum ModelKind {
    /// `name` or `name:options` of a registered [`Architecture`].
    Net {
        arch: Registered,
        options: Option<String>,
        input: Input,
    },
    /// A parameter set of about `params` numbers with no architecture, for protocol and
    /// memory benchmarks (clients run `--train none`).
    Synthetic { params: u64 },
}

impl FromStr for ModelKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, options) = match s.split_once(':') {
            Some((name, options)) => (name, Some(options)),
            None => (s, None),
        };
        if name == "synthetic" {
            return options
                .and_then(parse_count)
                .map(|params| Self::Synthetic { params })
                .ok_or_else(|| ModelError::BadSyntheticSize(s.to_string()));
        }
        let arch = lookup(name).ok_or_else(|| ModelError::Unknown {
            name: s.to_string(),
            known: known_models(),
        })?;
        let input = arch.input(options).map_err(ModelError::BadOptions)?;
        Ok(Self::Net {
            arch,
            options: options.map(str::to_string),
            input,
        })
    }
}

/// The registered model names for messages: `mlp, cnn, …, or synthetic:<params> (…)`.
pub fn known_models() -> String {
    let names: Vec<&str> = registered().iter().map(Registered::usage).collect();
    format!(
        "{}, or synthetic:<params> (e.g. synthetic:10M, no architecture: clients run --train none)",
        names.join(", ")
    )
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

impl ModelKind {
    /// The options after `name:` (`13` in `tabular-mlp:13`), if any.
    pub fn options(&self) -> Option<&str> {
        match self {
            Self::Net { options, .. } => options.as_deref(),
            Self::Synthetic { .. } => None,
        }
    }

    /// What the network reads (`None`: a parameter set with no architecture).
    pub fn input(&self) -> Option<Input> {
        match self {
            Self::Net { input, .. } => Some(*input),
            Self::Synthetic { .. } => None,
        }
    }

    pub fn is_synthetic(&self) -> bool {
        matches!(self, Self::Synthetic { .. })
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net {
                arch,
                options: Some(options),
                ..
            } => write!(f, "{}:{options}", arch.name()),
            Self::Net { arch, .. } => f.write_str(arch.name()),
            Self::Synthetic { params } => write!(f, "synthetic:{params}"),
        }
    }
}

impl fmt::Debug for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
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

    /// Adds LoRA adapters (architectures that take them only).
    pub fn with_lora(mut self, lora: Option<LoraSpec>) -> Result<Self, ModelError> {
        let supported = matches!(&self.kind, ModelKind::Net { arch, .. } if arch.supports_lora());
        if lora.is_some() && !supported {
            return Err(ModelError::LoraNotSupported(self.kind.to_string()));
        }
        self.lora = lora;
        Ok(self)
    }

    /// Whether the model reads text (tokens) rather than images or table rows.
    pub fn is_text(&self) -> bool {
        matches!(self.kind.input(), Some(Input::Text { .. }))
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
    pub fn build(&self, device: &Device) -> Result<Model, ModelError> {
        self.build_with_dropout(device, DROPOUT)
    }

    /// The tensor-name prefix of the classifier head (replaced by `--reset-head`, kept
    /// trainable by `--freeze head-only`).
    pub fn head_prefix(&self) -> Option<&'static str> {
        match &self.kind {
            ModelKind::Net { arch, .. } => arch.head_prefix(),
            ModelKind::Synthetic { .. } => None,
        }
    }

    /// As [`ModelSpec::build`] with dropout probability `dropout` (active only in training).
    pub fn build_with_dropout(&self, device: &Device, dropout: f64) -> Result<Model, ModelError> {
        match &self.kind {
            ModelKind::Net { arch, .. } => arch.build(self, device, dropout),
            ModelKind::Synthetic { .. } => Err(ModelError::NotTrainable(self.kind.to_string())),
        }
    }

    /// Whether `data` fits this model: labels below the number of classes, and images of the
    /// model's size or rows of exactly its number of features.
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
        let Some(input) = self.kind.input() else {
            return Ok(());
        };
        match (input, data.is_tabular()) {
            (Input::Text { .. }, _) => Err(mismatch(format!(
                "image or table data, but the model `{}` reads text: give a CSV/TSV/JSONL file with a text column",
                self.kind
            ))),
            (Input::Table { features }, true) if data.cols == features => Ok(()),
            (Input::Table { features }, true) => Err(mismatch(format!(
                "{} feature columns, the model `{}` takes {features}",
                data.cols, self.kind
            ))),
            (Input::Table { .. }, false) => Err(mismatch(format!(
                "image data, but the model `{}` takes CSV rows",
                self.kind
            ))),
            (Input::Images { height, width }, true) => Err(mismatch(format!(
                "tabular (CSV) data, but the model `{}` takes {height}x{width} images; use tabular-mlp:{}",
                self.kind, data.cols
            ))),
            (Input::Images { height, width }, false) => data.check_image_size(height, width),
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
                net.extract()
            }
        }
    }

    /// Names and shapes of the model's parameters.
    pub fn specs(&self) -> Vec<TensorSpec> {
        match self.kind {
            ModelKind::Synthetic { params } => synthetic::specs(params),
            _ => match self.build(&Device::flex()) {
                Ok(net) => net.specs(),
                Err(_) => Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!("mlp".parse::<ModelKind>().unwrap().to_string(), "mlp");
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
        let unknown = "resnet".parse::<ModelKind>().unwrap_err().to_string();
        assert!(
            unknown.contains("`resnet`") && unknown.contains("tabular-mlp:<features>"),
            "{unknown}"
        );
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
