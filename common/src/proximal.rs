//! FedProx's proximal term (Li et al. 2020): μ/2·‖w − w₀‖², where w₀ is the global model the
//! round started from. Added to the local loss, it pulls each client's weights towards the
//! global ones, which limits client drift on non-IID data.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// The anchor weights w₀, flattened, in the model's visiting order.
pub struct Proximal {
    mu: f64,
    anchors: Vec<Tensor<1>>,
}

struct Anchors(Vec<Tensor<1>>);

/// Every float parameter of `model` as a flat constant, in the model's visiting order.
pub(crate) fn constants<M: Module>(model: &M) -> Vec<Tensor<1>> {
    let mut v = Anchors(Vec::new());
    model.visit(&mut v);
    v.0
}

impl ModuleVisitor for Anchors {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // A fresh constant, not a view of the parameter: it must not join the autodiff graph.
        let t = param.val();
        let n = t.shape().num_elements();
        let device = t.device();
        let data = t.into_data().convert::<f32>();
        self.0
            .push(Tensor::<D>::from_data(data, &device).reshape([n]));
    }
}

struct Penalty<'a> {
    anchors: &'a [Tensor<1>],
    next: usize,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for Penalty<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(anchor) = self.anchors.get(self.next) else {
            return;
        };
        self.next += 1;
        let t = param.val();
        let n = t.shape().num_elements();
        let sq = (t.reshape([n]) - anchor.clone()).square().sum();
        self.sum = Some(match self.sum.take() {
            Some(acc) => acc + sq,
            None => sq,
        });
    }
}

impl Proximal {
    /// Remembers `model`'s current weights as the anchor.
    pub fn new<M: Module>(model: &M, mu: f64) -> Self {
        Self {
            mu,
            anchors: constants(model),
        }
    }

    /// μ/2·‖w − w₀‖² for `model` (a one-element tensor on the model's device, tracked by
    /// autodiff).
    pub fn penalty<M: Module>(&self, model: &M) -> Option<Tensor<1>> {
        let mut v = Penalty {
            anchors: &self.anchors,
            next: 0,
            sum: None,
        };
        model.visit(&mut v);
        v.sum.map(|s| s.mul_scalar(self.mu / 2.0))
    }
}
