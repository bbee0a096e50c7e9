//! burn modules <-> named tensors.
//!
//! [`extract`] walks a module and copies every float parameter out under its path
//! (`conv1.weight`); [`inject`] rebuilds the parameters from a [`TensorSet`] on the module's
//! own device, keeping each parameter's id (so optimiser state keyed by id stays valid).
//! Both are bit-exact. Enum variant names are left out of paths, so a model wrapped in an enum
//! has the same names as the bare model.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::tensors::{NamedTensor, TensorError, TensorSet, TensorSpec};

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("reading parameter `{name}` from the device failed: {message}")]
    Read { name: String, message: String },
}

#[derive(Default)]
struct PathStack {
    parts: Vec<String>,
    pushed: Vec<bool>,
}

impl PathStack {
    fn enter(&mut self, name: &str, container_type: &str) {
        let keep = !container_type.starts_with("Enum:");
        if keep {
            self.parts.push(name.to_string());
        }
        self.pushed.push(keep);
    }

    fn exit(&mut self) {
        if self.pushed.pop().unwrap_or(false) {
            self.parts.pop();
        }
    }

    fn path(&self) -> String {
        self.parts.join(".")
    }
}

struct Extractor {
    path: PathStack,
    out: Vec<NamedTensor>,
    error: Option<ParamsError>,
}

impl ModuleVisitor for Extractor {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.error.is_some() {
            return;
        }
        let name = self.path.path();
        let tensor = param.val();
        let shape = tensor.shape().to_vec();
        let data = match tensor.into_data().try_into_vec_as::<f32>() {
            Ok(data) => data,
            Err(e) => {
                self.error = Some(ParamsError::Read {
                    name,
                    message: format!("{e:?}"),
                });
                return;
            }
        };
        match NamedTensor::new(name, shape, data) {
            Ok(t) => self.out.push(t),
            Err(e) => self.error = Some(e.into()),
        }
    }
}

/// Copies every float parameter of `module` out, named by path, in visiting order.
pub fn extract<M: Module>(module: &M) -> Result<TensorSet, ParamsError> {
    let mut v = Extractor {
        path: PathStack::default(),
        out: Vec::new(),
        error: None,
    };
    module.visit(&mut v);
    if let Some(e) = v.error {
        return Err(e);
    }
    Ok(TensorSet::new(v.out)?)
}

struct SpecCollector {
    path: PathStack,
    out: Vec<TensorSpec>,
}

impl ModuleVisitor for SpecCollector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(TensorSpec {
            name: self.path.path(),
            shape: param.lazy_shape().to_vec(),
        });
    }
}

/// The names and shapes of `module`'s float parameters, without reading any values.
pub fn specs<M: Module>(module: &M) -> Vec<TensorSpec> {
    let mut v = SpecCollector {
        path: PathStack::default(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

struct Injector<'a> {
    path: PathStack,
    set: &'a TensorSet,
}

impl ModuleMapper for Injector<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        // `inject` checked beforehand that every parameter has a tensor of the right shape.
        let Some(t) = self.set.get(&self.path.path()) else {
            return param;
        };
        let id = param.id;
        let device = param.lazy_device();
        let tensor = Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &device);
        param.transform_for_load(tensor, id)
    }
}

/// Replaces `module`'s float parameters with the tensors of `set`. `set` must hold exactly the
/// module's parameters with the same shapes; otherwise the error names the first difference and
/// the module is returned untouched inside no partial state (nothing is changed).
pub fn inject<M: Module>(module: M, set: &TensorSet) -> Result<M, ParamsError> {
    set.check_matches(&specs(&module))?;
    let mut mapper = Injector {
        path: PathStack::default(),
        set,
    };
    Ok(module.map(&mut mapper))
}

struct Freezer<'a> {
    path: PathStack,
    frozen: &'a [String],
}

impl ModuleMapper for Freezer<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let trains = !self.frozen.contains(&self.path.path());
        param.set_require_grad(trains)
    }
}

/// Makes exactly the parameters named in `frozen` not require gradients (backward skips them
/// and everything only they need; the optimiser leaves them as they are) and every other one
/// trainable — including those LoRA froze when it attached adapters (the head, the factors).
pub fn set_frozen<M: Module>(module: M, frozen: &[String]) -> M {
    module.map(&mut Freezer {
        path: PathStack::default(),
        frozen,
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::models::{Architecture, Cnn, Mlp, ModelSpec};

    #[test]
    fn extract_inject_round_trip_is_bit_exact() {
        let spec = ModelSpec::parse("cnn", 10).unwrap();
        let device = Device::flex();
        device.seed(1);
        let a = Cnn::build(&spec, &device, 0.1).unwrap();
        let set_a = extract(&a).unwrap();
        device.seed(2);
        let b = inject(Cnn::build(&spec, &device, 0.1).unwrap(), &set_a).unwrap();
        let set_b = extract(&b).unwrap();
        assert_eq!(set_a.len(), 8);
        for (x, y) in set_a.tensors().iter().zip(set_b.tensors()) {
            assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
            assert!(
                x.data
                    .iter()
                    .zip(&y.data)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "{}",
                x.name
            );
        }
        // Injection onto an autodiff device keeps the values too (what the client trains on).
        let ad = device.clone().autodiff();
        let c = inject(Cnn::build(&spec, &ad, 0.1).unwrap(), &set_a).unwrap();
        assert_eq!(extract(&c).unwrap(), set_a);
    }

    #[test]
    fn inject_refuses_a_foreign_set() {
        let spec = ModelSpec::parse("mlp", 10).unwrap();
        let other = ModelSpec::parse("mlp", 5).unwrap().init_weights(0).unwrap();
        let e = inject(Mlp::build(&spec, &Device::flex(), 0.1).unwrap(), &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc2") && e.contains("shape"), "{e}");
    }
}
