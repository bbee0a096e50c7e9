//! Built-in models, built by name: the coordinator names the model in each task and the client
//! builds the same architecture, so no code travels over the wire.

mod cnn;
mod mlp;
pub mod synthetic;

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

pub use cnn::Cnn;
pub use mlp::Mlp;

use crate::params::{self, ParamsError};
use crate::tensors::{TensorSet, TensorSpec};

/// Image geometry of the built-in image models.
pub const IMAGE_CHANNELS: usize = 1;
pub const IMAGE_SIZE: usize = 28;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error(
        "unknown model `{0}`: choose mlp, cnn, tabular-mlp:<features> (e.g. tabular-mlp:13) or synthetic:<params> (e.g. synthetic:10M)"
    )]
    Unknown(String),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl FromStr for ModelKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mlp" => Ok(Self::Mlp),
            "cnn" => Ok(Self::Cnn),
            _ => {
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
        }
    }
}

/// Which model, for how many classes. Travels in every task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub num_classes: u32,
}

/// Dropout of the built-in models while training, unless the run sets another.
pub const DROPOUT: f64 = 0.1;

impl ModelSpec {
    pub fn new(kind: ModelKind, num_classes: u32) -> Result<Self, ModelError> {
        if num_classes < 2 {
            return Err(ModelError::BadClasses(num_classes));
        }
        Ok(Self { kind, num_classes })
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
}

impl Net {
    pub fn num_classes(&self) -> usize {
        match self {
            Net::Mlp(m) => m.num_classes(),
            Net::Cnn(m) => m.num_classes(),
        }
    }

    /// `images`: `[batch, channels, height, width]`, normalised; returns logits.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Net::Mlp(m) => m.forward(images),
            Net::Cnn(m) => m.forward(images),
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
