//! A two-layer perceptron: flatten -> 256 -> ReLU -> dropout -> classes. `mlp` reads 28x28x1
//! images, `tabular-mlp:<features>` rows of a CSV table.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor, activation::relu};

use super::{
    Architecture, IMAGE_CHANNELS, IMAGE_SIZE, Input, InputMismatch, ModelError, ModelInput,
    ModelSpec,
};

pub const HIDDEN: usize = 256;

#[derive(Module, Debug)]
pub struct Mlp {
    fc1: Linear,
    dropout: Dropout,
    fc2: Linear,
}

impl Mlp {
    pub fn new(input_features: usize, num_classes: usize, dropout: f64, device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(input_features, HIDDEN).init(device),
            dropout: DropoutConfig::new(dropout).init(),
            fc2: LinearConfig::new(HIDDEN, num_classes).init(device),
        }
    }

    /// `images`: `[batch, channels, height, width]`; returns logits `[batch, classes]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = images.flatten::<2>(1, 3);
        let x = self.dropout.forward(relu(self.fc1.forward(x)));
        self.fc2.forward(x)
    }
}

impl Architecture for Mlp {
    const NAME: &'static str = "mlp";
    const USAGE: &'static str = "mlp (28x28 images)";
    const HEAD: Option<&'static str> = Some("fc2.");

    fn input(options: Option<&str>) -> Result<Input, String> {
        Input::fashion_images(Self::NAME, options)
            .map_err(|e| format!("{e}; for CSV rows use tabular-mlp:<features>"))
    }

    fn build(spec: &ModelSpec, device: &Device, dropout: f64) -> Result<Self, ModelError> {
        let inputs = IMAGE_CHANNELS * IMAGE_SIZE * IMAGE_SIZE;
        Ok(Self::new(
            inputs,
            spec.num_classes as usize,
            dropout,
            device,
        ))
    }

    fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
        Ok(Mlp::forward(self, input.images()?))
    }
}

/// The MLP on rows of `features` numbers (`tabular-mlp:13`). A one-variant enum so that its
/// tensor names are the MLP's own (`fc1.weight`): burn leaves enum variants out of paths.
#[derive(Module, Debug)]
pub enum TabularMlp {
    Mlp(Mlp),
}

impl TabularMlp {
    fn features(options: Option<&str>) -> Result<usize, String> {
        let bad = || {
            format!(
                "`tabular-mlp:{}`: the number after `tabular-mlp:` must be the count of feature columns (1 or more), e.g. tabular-mlp:13",
                options.unwrap_or("")
            )
        };
        match options.map(str::parse::<usize>) {
            Some(Ok(n)) if (1..=1 << 20).contains(&n) => Ok(n),
            _ => Err(bad()),
        }
    }
}

impl Architecture for TabularMlp {
    const NAME: &'static str = "tabular-mlp";
    const USAGE: &'static str = "tabular-mlp:<features> (CSV rows, e.g. tabular-mlp:13)";
    const HEAD: Option<&'static str> = Some("fc2.");

    fn input(options: Option<&str>) -> Result<Input, String> {
        Self::features(options).map(|features| Input::Table { features })
    }

    fn build(spec: &ModelSpec, device: &Device, dropout: f64) -> Result<Self, ModelError> {
        let features = Self::features(spec.kind.options()).map_err(ModelError::BadOptions)?;
        let classes = spec.num_classes as usize;
        Ok(Self::Mlp(Mlp::new(features, classes, dropout, device)))
    }

    fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
        let Self::Mlp(mlp) = self;
        Ok(mlp.forward(input.images()?))
    }
}
