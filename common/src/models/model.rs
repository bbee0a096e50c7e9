//! A built network of any registered architecture behind one type, so that training,
//! evaluation and the exchange of weights by name need not know which architecture it is.
//!
//! burn's `Module` cannot be a trait object (its visitors are generic), so [`Trainable`] is
//! the object-safe set of operations fedtune performs on a network, implemented once for
//! every [`Architecture`]; each runs burn's generic code on the concrete type.

use std::fmt;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Gradients, Tensor};

use super::architecture::{Architecture, InputMismatch, ModelInput};
use crate::control_variate::Correction;
use crate::optim::clip_global_norm;
use crate::params::{self, ParamsError};
use crate::proximal::Proximal;
use crate::tensors::{TensorSet, TensorSpec};

trait Trainable: Send + fmt::Debug {
    fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch>;
    fn boxed_clone(&self) -> Box<dyn Trainable>;
    fn valid(&self) -> Box<dyn Trainable>;
    fn extract(&self) -> Result<TensorSet, ParamsError>;
    fn specs(&self) -> Vec<TensorSpec>;
    fn inject(self: Box<Self>, set: &TensorSet) -> Result<Box<dyn Trainable>, ParamsError>;
    fn set_frozen(self: Box<Self>, frozen: &[String]) -> Box<dyn Trainable>;
    fn step(
        self: Box<Self>,
        optim: &mut ModuleOptimizer,
        lr: f64,
        grads: Gradients,
        clip_norm: Option<f64>,
    ) -> Box<dyn Trainable>;
    fn proximal(&self, mu: f64) -> Proximal;
    fn penalty(&self, proximal: &Proximal) -> Option<Tensor<1>>;
    fn correction(&self) -> Correction;
    fn correction_term(&self, correction: &Correction) -> Option<Tensor<1>>;
}

impl<A: Architecture> Trainable for A {
    fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
        Architecture::forward(self, input)
    }

    fn boxed_clone(&self) -> Box<dyn Trainable> {
        Box::new(self.clone())
    }

    fn valid(&self) -> Box<dyn Trainable> {
        Box::new(Module::valid(self))
    }

    fn extract(&self) -> Result<TensorSet, ParamsError> {
        params::extract(self)
    }

    fn specs(&self) -> Vec<TensorSpec> {
        params::specs(self)
    }

    fn inject(self: Box<Self>, set: &TensorSet) -> Result<Box<dyn Trainable>, ParamsError> {
        Ok(Box::new(params::inject(*self, set)?))
    }

    fn set_frozen(self: Box<Self>, frozen: &[String]) -> Box<dyn Trainable> {
        Box::new(params::set_frozen(*self, frozen))
    }

    fn step(
        self: Box<Self>,
        optim: &mut ModuleOptimizer,
        lr: f64,
        grads: Gradients,
        clip_norm: Option<f64>,
    ) -> Box<dyn Trainable> {
        let mut grads = GradientsParams::from_grads(grads, &*self);
        if let Some(max) = clip_norm {
            clip_global_norm(&*self, &mut grads, max);
        }
        Box::new(optim.step(lr, *self, grads))
    }

    fn proximal(&self, mu: f64) -> Proximal {
        Proximal::new(self, mu)
    }

    fn penalty(&self, proximal: &Proximal) -> Option<Tensor<1>> {
        proximal.penalty(self)
    }

    fn correction(&self) -> Correction {
        Correction::new(self)
    }

    fn correction_term(&self, correction: &Correction) -> Option<Tensor<1>> {
        correction.term(self)
    }
}

/// A network of some registered architecture, for `num_classes` classes.
pub struct Model {
    net: Box<dyn Trainable>,
    num_classes: usize,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.net.fmt(f)
    }
}

impl Clone for Model {
    fn clone(&self) -> Self {
        Self {
            net: self.net.boxed_clone(),
            num_classes: self.num_classes,
        }
    }
}

impl Model {
    pub fn new<A: Architecture>(net: A, num_classes: usize) -> Self {
        Self {
            net: Box::new(net),
            num_classes,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Logits `[batch, classes]`.
    pub fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
        self.net.forward(input)
    }

    /// The model in inference mode (no dropout).
    pub fn valid(&self) -> Self {
        Self {
            net: self.net.valid(),
            num_classes: self.num_classes,
        }
    }

    /// Every float parameter, named by path (see [`params::extract`]).
    pub fn extract(&self) -> Result<TensorSet, ParamsError> {
        self.net.extract()
    }

    /// Names and shapes of the parameters, without reading values.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.net.specs()
    }

    /// The same network with the weights of `set` (see [`params::inject`]).
    pub fn inject(self, set: &TensorSet) -> Result<Self, ParamsError> {
        Ok(Self {
            net: self.net.inject(set)?,
            num_classes: self.num_classes,
        })
    }

    /// Exactly the tensors named in `frozen` get no gradient; every other one trains.
    pub fn set_frozen(self, frozen: &[String]) -> Self {
        Self {
            net: self.net.set_frozen(frozen),
            num_classes: self.num_classes,
        }
    }

    /// One optimiser step from the gradients of a backward pass, clipped to `clip_norm`
    /// (global norm) when given.
    pub fn step(
        self,
        optim: &mut ModuleOptimizer,
        lr: f64,
        grads: Gradients,
        clip_norm: Option<f64>,
    ) -> Self {
        Self {
            net: self.net.step(optim, lr, grads, clip_norm),
            num_classes: self.num_classes,
        }
    }

    /// FedProx: the current weights as the anchor of the proximal term.
    pub fn proximal(&self, mu: f64) -> Proximal {
        self.net.proximal(mu)
    }

    /// FedProx: μ/2·‖w − w₀‖², tracked by autodiff.
    pub fn penalty(&self, proximal: &Proximal) -> Option<Tensor<1>> {
        self.net.penalty(proximal)
    }

    /// SCAFFOLD: the correction c − cᵢ (`by`, every tensor of the model by name) in this
    /// network's visiting order.
    pub fn correction(&self, by: &TensorSet) -> Result<Correction, ParamsError> {
        Ok(self.clone().inject(by)?.net.correction())
    }

    /// SCAFFOLD: ⟨w, c − cᵢ⟩, tracked by autodiff.
    pub fn correction_term(&self, correction: &Correction) -> Option<Tensor<1>> {
        self.net.correction_term(correction)
    }
}
