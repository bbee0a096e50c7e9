//! A linear projection that may carry a LoRA adapter beside its frozen weight, computed the way
//! PEFT computes it: `x·W + b + scale·(drop(x)·A)·B`.
//!
//! The adapter is a separate path rather than a reparameterised weight (`x·(W + scale·A·B)`,
//! burn's `apply_lora`) for two reasons: LoRA dropout drops the adapter's *input* only, which
//! a merged weight cannot express; and the separate path never builds the dense `[in, out]`
//! sum nor its gradient, only two rank-`r` products.
//!
//! Tensor names: `<module>.weight` `[in, out]` and `<module>.bias` as burn's `Linear`, and
//! `<module>.lora.a` `[in, r]`, `<module>.lora.b` `[r, out]`.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::module::linear;
use burn::tensor::{Device, Distribution, Tensor};

/// The two low-rank factors of an adapter, its scale and its input dropout.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[in, r]`, drawn at random: the adapter's down-projection.
    pub a: Param<Tensor<2>>,
    /// `[r, out]`, zero at the start so that attaching the adapter changes nothing.
    pub b: Param<Tensor<2>>,
    /// `alpha / r`.
    pub scale: f64,
    /// Drops the adapter's input while training (PEFT's `lora_dropout`).
    pub dropout: Dropout,
}

impl LoraAdapter {
    /// A fresh adapter: `a` ~ N(0, std²), `b` = 0.
    pub fn new(
        [d_in, d_out]: [usize; 2],
        rank: usize,
        scale: f64,
        init_std: f64,
        dropout: f64,
        device: &Device,
    ) -> Self {
        Self {
            a: Param::from_tensor(Tensor::random(
                [d_in, rank],
                Distribution::Normal(0.0, init_std),
                device,
            )),
            b: Param::from_tensor(Tensor::zeros([rank, d_out], device)),
            scale,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// `scale·(drop(x)·A)·B`; the scale goes on `B` (`[r, out]`), the smallest operand.
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let down = linear(self.dropout.forward(x), self.a.val(), None);
        linear(down, self.b.val().mul_scalar(self.scale), None)
    }
}

/// `x·W + b`, plus the adapter's contribution when there is one.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// `[in, out]`.
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub lora: Option<LoraAdapter>,
}

impl LoraLinear {
    /// `linear` (burn's, freshly initialised) with `lora` beside it.
    pub fn new(linear: Linear, lora: Option<LoraAdapter>) -> Self {
        Self {
            weight: linear.weight,
            bias: linear.bias,
            lora,
        }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.val().dims()
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        match &self.lora {
            Some(lora) => linear(x.clone(), self.weight.val(), bias) + lora.forward(x),
            None => linear(x, self.weight.val(), bias),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::LinearConfig;
    use burn::tensor::TensorData;

    use super::*;

    /// A 6→6 projection whose adapter is the identity (`A = B = I`, scale 0.5), so that the
    /// adapter's contribution is `0.5·drop(x)` and can be read off directly.
    fn identity_adapted(dropout: f64, device: &Device) -> LoraLinear {
        let mut lora = LoraAdapter::new([6, 6], 6, 0.5, 0.1, dropout, device);
        let eye = || Param::from_tensor(Tensor::<2>::eye(6, device));
        (lora.a, lora.b) = (eye(), eye());
        LoraLinear::new(LinearConfig::new(6, 6).init(device), Some(lora))
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn a_fresh_adapter_changes_nothing() {
        let device = Device::flex();
        let base = LinearConfig::new(6, 4).init(&device);
        let adapted = LoraLinear::new(
            base.clone(),
            Some(LoraAdapter::new([6, 4], 2, 4.0, 0.3, 0.0, &device)),
        );
        let x = Tensor::<2>::random([3, 6], Distribution::Default, &device);
        assert_eq!(
            values(base.forward(x.clone())),
            values(adapted.forward(x)),
            "b starts at zero"
        );
    }

    #[test]
    fn lora_dropout_drops_the_adapter_input_and_never_the_base_path() {
        let device = Device::flex().autodiff();
        let layer = identity_adapted(0.5, &device);
        let x = Tensor::<2>::from_data(
            TensorData::new((1..=240).map(|v| v as f32).collect(), [40, 6]),
            &device,
        );
        let base = linear(
            x.clone(),
            layer.weight.val(),
            layer.bias.as_ref().map(|b| b.val()),
        );
        let adapter = values(layer.forward(x.clone()) - base);
        // Each input element reaches the output through the adapter either dropped (0) or
        // kept and rescaled by 1 / (1 - p) = 2: 0.5·2·x = x.
        let (mut dropped, mut kept) = (0, 0);
        for (got, x) in adapter.iter().zip(values(x)) {
            if got.abs() < 1e-3 {
                dropped += 1;
            } else {
                assert!((got - x).abs() < 1e-3 * x, "{got} is neither 0 nor {x}");
                kept += 1;
            }
        }
        assert!(dropped > 40 && kept > 40, "{dropped} dropped, {kept} kept");
    }

    #[test]
    fn lora_dropout_is_off_outside_training() {
        let device = Device::flex().autodiff();
        let layer = identity_adapted(0.5, &device).valid();
        let x = Tensor::<2>::ones([4, 6], &Device::flex());
        let base = linear(
            x.clone(),
            layer.weight.val(),
            layer.bias.as_ref().map(|b| b.val()),
        );
        let adapter = values(layer.forward(x) - base);
        assert!(
            adapter.iter().all(|v| (v - 0.5).abs() < 1e-6),
            "{adapter:?}"
        );
    }
}
