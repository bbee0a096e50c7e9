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
                self.error = Some(ParamsError::Read { name, message: format!("{e:?}") });
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
    let mut v = Extractor { path: PathStack::default(), out: Vec::new(), error: None };
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
        self.out.push(TensorSpec { name: self.path.path(), shape: param.lazy_shape().to_vec() });
    }
}

/// The names and shapes of `module`'s float parameters, without reading any values.
pub fn specs<M: Module>(module: &M) -> Vec<TensorSpec> {
    let mut v = SpecCollector { path: PathStack::default(), out: Vec::new() };
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
    let mut mapper = Injector { path: PathStack::default(), set };
    Ok(module.map(&mut mapper))
}
