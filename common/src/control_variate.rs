//! SCAFFOLD's drift correction (Karimireddy et al. 2020, Algorithm 1): every local step
//! follows g − cᵢ + c instead of the gradient g, where c is the server's control variate and cᵢ
//! the client's. Both are fixed for a round, so the correction is the gradient of the linear
//! term ⟨w, c − cᵢ⟩: added to the loss, it shifts every gradient by exactly c − cᵢ, with any
//! optimiser and without touching burn's optimiser internals. With SGD (as the paper assumes)
//! each step is w ← w − η(g − cᵢ + c); with Adam the shifted gradient goes through Adam's
//! moments like any other gradient.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

use crate::proximal::constants;

/// c − cᵢ, flattened, in the model's visiting order.
pub struct Correction {
    terms: Vec<Tensor<1>>,
}

struct Linear<'a> {
    terms: &'a [Tensor<1>],
    next: usize,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for Linear<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(term) = self.terms.get(self.next) else {
            return;
        };
        self.next += 1;
        let t = param.val();
        let n = t.shape().num_elements();
        let dot = (t.reshape([n]) * term.clone()).sum();
        self.sum = Some(match self.sum.take() {
            Some(acc) => acc + dot,
            None => dot,
        });
    }
}

impl Correction {
    /// The correction whose values are `model`'s weights (a model into which c − cᵢ was
    /// loaded by name).
    pub fn new<M: Module>(model: &M) -> Self {
        Self {
            terms: constants(model),
        }
    }

    /// ⟨w, c − cᵢ⟩ for `model` (a one-element tensor tracked by autodiff).
    pub fn term<M: Module>(&self, model: &M) -> Option<Tensor<1>> {
        let mut v = Linear {
            terms: &self.terms,
            next: 0,
            sum: None,
        };
        model.visit(&mut v);
        v.sum
    }
}

/// The server control variate travels with the global model of a SCAFFOLD training task, each
/// tensor named `scaffold-c.<model tensor>`; no model tensor name has this prefix.
pub const SERVER_VARIATE: &str = "scaffold-c";

/// The wire name of the server variate's part for `tensor`.
pub fn server_variate_name(tensor: &str) -> String {
    format!("{SERVER_VARIATE}.{tensor}")
}

/// The model tensor a wire name of the server variate stands for; `None` for a model tensor.
pub fn server_variate_of(name: &str) -> Option<&str> {
    name.strip_prefix(SERVER_VARIATE)?.strip_prefix('.')
}
