//! A model of your own, federated by fedtune without forking it.
//!
//! `TinyConv` is an ordinary burn module. Implementing fedtune's one trait,
//! [`Architecture`], tells fedtune its name (`tiny-conv`, with an optional channel count:
//! `tiny-conv:16`), what it reads, how to build it from the task's model spec and how to run
//! it. The two binaries in `src/bin/` register it and hand over to fedtune's own command
//! lines, so they take every flag of `fedtune-coordinator` and `fedtune-client`.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, activation::relu};
use fedtune_common::models::{
    Architecture, Input, InputMismatch, ModelError, ModelInput, ModelSpec,
};

/// Two strided convolutions, global average pooling and a linear head, for 28x28 grey images.
#[derive(Module, Debug)]
pub struct TinyConv {
    conv1: Conv2d,
    conv2: Conv2d,
    head: Linear,
}

/// Channels of the first convolution unless the model name says otherwise (`tiny-conv:16`).
const DEFAULT_CHANNELS: usize = 8;

/// The channel count in the model's options, checked.
fn channels(options: Option<&str>) -> Result<usize, String> {
    match options {
        None => Ok(DEFAULT_CHANNELS),
        Some(o) => match o.parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => Ok(n),
            _ => Err(format!(
                "`tiny-conv:{o}`: the number after `tiny-conv:` is the channel count of the first convolution, 1 to 256"
            )),
        },
    }
}

impl Architecture for TinyConv {
    const NAME: &'static str = "tiny-conv";
    const USAGE: &'static str = "tiny-conv[:<channels>] (28x28 images)";
    // `--freeze head-only` and `--reset-head` act on the tensors under `head.`.
    const HEAD: Option<&'static str> = Some("head.");

    fn input(options: Option<&str>) -> Result<Input, String> {
        channels(options)?;
        Ok(Input::Images {
            height: 28,
            width: 28,
        })
    }

    fn build(spec: &ModelSpec, device: &Device, _dropout: f64) -> Result<Self, ModelError> {
        let c = channels(spec.kind.options()).map_err(ModelError::BadOptions)?;
        let conv = |c_in, c_out| {
            Conv2dConfig::new([c_in, c_out], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Ok(Self {
            conv1: conv(1, c),
            conv2: conv(c, 2 * c),
            head: LinearConfig::new(2 * c, spec.num_classes as usize).init(device),
        })
    }

    fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
        let x = input.images()?;
        let x = relu(self.conv1.forward(x));
        let x = relu(self.conv2.forward(x));
        // Global average pooling: [batch, channels, h, w] -> [batch, channels].
        let x = x.mean_dim(3).mean_dim(2).flatten::<2>(1, 3);
        Ok(self.head.forward(x))
    }
}
