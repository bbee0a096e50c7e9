//! A two-layer perceptron for 28x28x1 images: flatten -> 256 -> ReLU -> dropout -> classes.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor, activation::relu};

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

    pub fn num_classes(&self) -> usize {
        self.fc2.weight.val().dims()[1]
    }

    /// `images`: `[batch, channels, height, width]`; returns logits `[batch, classes]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = images.flatten::<2>(1, 3);
        let x = self.dropout.forward(relu(self.fc1.forward(x)));
        self.fc2.forward(x)
    }
}
