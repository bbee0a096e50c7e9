//! A small convolutional network for 28x28x1 images:
//! conv 3x3 (16) -> ReLU -> pool 2 -> conv 3x3 (32) -> ReLU -> pool 2 -> 128 -> dropout -> classes.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, activation::relu};

use super::{
    Architecture, IMAGE_CHANNELS, IMAGE_SIZE, Input, InputMismatch, ModelError, ModelInput,
    ModelSpec,
};

const C1: usize = 16;
const C2: usize = 32;
const HIDDEN: usize = 128;

#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    dropout: Dropout,
    fc2: Linear,
}

impl Cnn {
    /// `height` and `width` must be multiples of 4 (two 2x2 poolings).
    pub fn new(
        channels: usize,
        height: usize,
        width: usize,
        num_classes: usize,
        dropout: f64,
        device: &Device,
    ) -> Self {
        let conv = |c_in, c_out| {
            Conv2dConfig::new([c_in, c_out], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device)
        };
        Self {
            conv1: conv(channels, C1),
            conv2: conv(C1, C2),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(C2 * (height / 4) * (width / 4), HIDDEN).init(device),
            dropout: DropoutConfig::new(dropout).init(),
            fc2: LinearConfig::new(HIDDEN, num_classes).init(device),
        }
    }

    /// `images`: `[batch, channels, height, width]`; returns logits `[batch, classes]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(relu(self.conv1.forward(images)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        let x = x.flatten::<2>(1, 3);
        let x = self.dropout.forward(relu(self.fc1.forward(x)));
        self.fc2.forward(x)
    }
}

impl Architecture for Cnn {
    const NAME: &'static str = "cnn";
    const USAGE: &'static str = "cnn (28x28 images)";
    const HEAD: Option<&'static str> = Some("fc2.");

    fn input(options: Option<&str>) -> Result<Input, String> {
        Input::fashion_images(Self::NAME, options)
    }

    fn build(spec: &ModelSpec, device: &Device, dropout: f64) -> Result<Self, ModelError> {
        let classes = spec.num_classes as usize;
        Ok(Self::new(
            IMAGE_CHANNELS,
            IMAGE_SIZE,
            IMAGE_SIZE,
            classes,
            dropout,
            device,
        ))
    }

    fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
        Ok(Cnn::forward(self, input.images()?))
    }
}
