//! The one trait a model family implements to be federated: how its name reads, what it takes
//! in, how it is built from the task's model spec, and its forward pass. Tensor names come
//! from the burn module itself (field paths: `conv1.weight`), so nothing else is needed.
//!
//! Built-in architectures are registered in `registry.rs`; a program built on the fedtune
//! libraries registers its own with [`crate::models::register`] before it runs.

use burn::module::Module;
use burn::tensor::{Bool, Device, Int, Tensor};

use super::{ModelError, ModelSpec};

/// What a model reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Images `[batch, channels, height, width]` (IDX files or image folders).
    Images { height: usize, width: usize },
    /// Rows of `features` numbers (CSV tables), given as `[batch, 1, 1, features]`.
    Table { features: usize },
    /// Token ids and padding masks (CSV/TSV/JSONL text through the task's tokenizer): ids
    /// below `vocab_size` (a larger tokenizer is refused), at most `max_positions` per text
    /// (the cap on `--max-seq-len`).
    Text {
        vocab_size: usize,
        max_positions: usize,
    },
}

impl Input {
    /// 28x28 grey images, and no options after the name: the built-in image models.
    pub(super) fn fashion_images(name: &str, options: Option<&str>) -> Result<Self, String> {
        match options {
            None => Ok(Self::Images {
                height: super::IMAGE_SIZE,
                width: super::IMAGE_SIZE,
            }),
            Some(o) => Err(format!("`{name}:{o}`: {name} takes no options")),
        }
    }
}

/// A burn module that fedtune can build, train, evaluate and exchange by tensor name.
///
/// ```ignore
/// #[derive(Module, Debug)]
/// pub struct TinyNet { fc: Linear }
///
/// impl Architecture for TinyNet {
///     const NAME: &'static str = "tiny-net";
///     fn input(_options: Option<&str>) -> Result<Input, String> {
///         Ok(Input::Images { height: 28, width: 28 })
///     }
///     fn build(spec: &ModelSpec, device: &Device, _dropout: f64) -> Result<Self, ModelError> {
///         Ok(Self { fc: LinearConfig::new(784, spec.num_classes as usize).init(device) })
///     }
///     fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
///         Ok(self.fc.forward(input.images()?.flatten(1, 3)))
///     }
/// }
/// ```
pub trait Architecture: Module + 'static {
    /// The model name users give (`--model NAME`), or its part before `:` when the model takes
    /// options (`tabular-mlp:13`). Lower-case letters, digits and `-`.
    const NAME: &'static str;
    /// How a full name of this family is written, for help and error messages.
    const USAGE: &'static str = Self::NAME;
    /// Tensor-name prefix of the classifier head (`fc2.`): what `--reset-head` replaces and
    /// `--freeze head-only` keeps trainable. `None`: the model has no separable head.
    const HEAD: Option<&'static str> = None;
    /// Whether `--lora-rank` may attach adapters (the model's `build` applies `spec.lora`).
    const LORA: bool = false;

    /// What the model reads, given the options after `NAME:` (`None` for the bare name). An
    /// error says what is wrong with the options; it is shown after the model name.
    fn input(options: Option<&str>) -> Result<Input, String>;

    /// The network for `spec` (options: [`super::ModelKind::options`]) with fresh weights
    /// drawn on `device`; `dropout` acts in training only. The parameters' paths are the
    /// tensor names on the wire and in checkpoints.
    fn build(spec: &ModelSpec, device: &Device, dropout: f64) -> Result<Self, ModelError>;

    /// Logits `[batch, num_classes]` for one batch, in training and in evaluation.
    fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch>;
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

impl ModelInput {
    /// The image (or table-row) batch, or an error for a model that reads images.
    pub fn images(self) -> Result<Tensor<4>, InputMismatch> {
        match self {
            Self::Images(x) => Ok(x),
            Self::Tokens { .. } => Err(InputMismatch {
                model: "images",
                batch: "text",
            }),
        }
    }

    /// Token ids and padding mask, or an error for a model that reads text.
    pub fn tokens(self) -> Result<(Tensor<2, Int>, Tensor<2, Bool>), InputMismatch> {
        match self {
            Self::Tokens { ids, padding } => Ok((ids, padding)),
            Self::Images(_) => Err(InputMismatch {
                model: "text",
                batch: "images",
            }),
        }
    }
}

/// A batch of one kind given to a model that reads another.
#[derive(Debug, thiserror::Error)]
#[error("the model reads {model}, the batch holds {batch}")]
pub struct InputMismatch {
    model: &'static str,
    batch: &'static str,
}
