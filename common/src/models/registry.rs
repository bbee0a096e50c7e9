//! Which architectures this program knows, by name. The coordinator names the model in every
//! task and the client builds it from its own registry, so no code travels over the wire; a
//! client that does not know the name refuses the task saying so.
//!
//! Adding a built-in architecture: one file implementing [`Architecture`] and one line in
//! [`built_in`]. A program built on the fedtune libraries calls [`register`] at start-up.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{LazyLock, RwLock};

use burn::tensor::Device;

use super::architecture::{Architecture, Input};
use super::model::Model;
use super::{Cnn, Mlp, ModelError, ModelSpec, TabularMlp, TextClassifier};

/// The built-in architectures, one registration line each.
fn built_in() -> Vec<Registered> {
    vec![
        Registered::of::<Mlp>(),
        Registered::of::<TabularMlp>(),
        Registered::of::<Cnn>(),
        Registered::of::<TextClassifier>(),
    ]
}

static REGISTRY: LazyLock<RwLock<Vec<Registered>>> = LazyLock::new(|| RwLock::new(built_in()));

/// `synthetic:<params>` is a parameter set without an architecture, not a registered one.
const RESERVED: &[&str] = &["synthetic"];

/// Makes the architecture `A` known to this program under `A::NAME`, for the coordinator's
/// `--model` and for the tasks a client accepts. Call it before parsing any model name.
pub fn register<A: Architecture>() -> Result<(), ModelError> {
    let name = A::NAME;
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid || RESERVED.contains(&name) {
        return Err(ModelError::Registration(format!(
            "cannot register the architecture `{name}`: a name is lower-case letters, digits and `-`, and not {}",
            RESERVED.join(", ")
        )));
    }
    let mut all = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    if all.iter().any(|r| r.name() == name) {
        return Err(ModelError::Registration(format!(
            "cannot register the architecture `{name}`: that name is taken; choose another NAME"
        )));
    }
    all.push(Registered::of::<A>());
    Ok(())
}

/// The architecture registered under `name`.
pub fn lookup(name: &str) -> Option<Registered> {
    let all = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    all.iter().find(|r| r.name() == name).copied()
}

/// Every registered architecture, in registration order.
pub fn registered() -> Vec<Registered> {
    REGISTRY.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A registered architecture: its static description and how to build it.
#[derive(Clone, Copy)]
pub struct Registered(&'static dyn Entry);

impl Registered {
    fn of<A: Architecture>() -> Self {
        // A zero-sized value: leaking it costs nothing and gives the `'static` a registry needs.
        Self(Box::leak(Box::new(Typed::<A>(PhantomData))))
    }

    pub fn name(&self) -> &'static str {
        self.0.name()
    }

    pub fn usage(&self) -> &'static str {
        self.0.usage()
    }

    pub fn head_prefix(&self) -> Option<&'static str> {
        self.0.head()
    }

    pub fn supports_lora(&self) -> bool {
        self.0.lora()
    }

    pub fn input(&self, options: Option<&str>) -> Result<Input, String> {
        self.0.input(options)
    }

    pub fn build(
        &self,
        spec: &ModelSpec,
        device: &Device,
        dropout: f64,
    ) -> Result<Model, ModelError> {
        self.0.build(spec, device, dropout)
    }
}

impl fmt::Debug for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq for Registered {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

/// [`Architecture`] without its type: what the registry stores.
trait Entry: Send + Sync {
    fn name(&self) -> &'static str;
    fn usage(&self) -> &'static str;
    fn head(&self) -> Option<&'static str>;
    fn lora(&self) -> bool;
    fn input(&self, options: Option<&str>) -> Result<Input, String>;
    fn build(&self, spec: &ModelSpec, device: &Device, dropout: f64) -> Result<Model, ModelError>;
}

struct Typed<A>(PhantomData<fn() -> A>);

impl<A: Architecture> Entry for Typed<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn usage(&self) -> &'static str {
        A::USAGE
    }

    fn head(&self) -> Option<&'static str> {
        A::HEAD
    }

    fn lora(&self) -> bool {
        A::LORA
    }

    fn input(&self, options: Option<&str>) -> Result<Input, String> {
        A::input(options)
    }

    fn build(&self, spec: &ModelSpec, device: &Device, dropout: f64) -> Result<Model, ModelError> {
        Ok(Model::new(
            A::build(spec, device, dropout)?,
            spec.num_classes as usize,
        ))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Tensor;

    use super::*;
    use crate::data::ImageDataset;
    use crate::models::{InputMismatch, ModelInput};
    use crate::train::{self, TrainSettings};

    /// An architecture defined outside the built-in zoo, as a user's would be.
    #[derive(Module, Debug)]
    struct Probe {
        out: Linear,
    }

    impl Architecture for Probe {
        const NAME: &'static str = "probe";
        const HEAD: Option<&'static str> = Some("out.");

        fn input(options: Option<&str>) -> Result<Input, String> {
            match options {
                None => Ok(Input::Table { features: 3 }),
                Some(o) => Err(format!("`probe:{o}`: probe takes no options")),
            }
        }

        fn build(spec: &ModelSpec, device: &Device, _dropout: f64) -> Result<Self, ModelError> {
            Ok(Self {
                out: LinearConfig::new(3, spec.num_classes as usize).init(device),
            })
        }

        fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
            Ok(self.out.forward(input.images()?.flatten(1, 3)))
        }
    }

    macro_rules! named {
        ($ty:ident, $name:literal) => {
            #[derive(Module, Debug)]
            struct $ty {
                out: Linear,
            }
            impl Architecture for $ty {
                const NAME: &'static str = $name;
                fn input(_: Option<&str>) -> Result<Input, String> {
                    Ok(Input::Table { features: 1 })
                }
                fn build(_: &ModelSpec, device: &Device, _: f64) -> Result<Self, ModelError> {
                    Ok(Self {
                        out: LinearConfig::new(1, 1).init(device),
                    })
                }
                fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
                    Ok(self.out.forward(input.images()?.flatten(1, 3)))
                }
            }
        };
    }
    named!(SameAsBuiltIn, "cnn");
    named!(Reserved, "synthetic");
    named!(UpperCase, "Tiny");
    named!(WithColon, "tiny:1");

    #[test]
    fn a_registered_architecture_is_built_and_trained_by_name() {
        register::<Probe>().unwrap();
        let spec = ModelSpec::parse("probe", 2).unwrap();
        assert_eq!(spec.kind.input(), Some(Input::Table { features: 3 }));
        assert_eq!(spec.head_prefix(), Some("out."));
        let names: Vec<String> = spec.specs().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["out.weight", "out.bias"]);
        let e = ModelSpec::parse("probe:7", 2).unwrap_err().to_string();
        assert!(e.contains("probe takes no options"), "{e}");

        // Rows whose first feature decides the class: a few Adam steps separate them.
        let rows: Vec<f32> = (0..32)
            .flat_map(|i| [if i % 2 == 0 { 1.0 } else { -1.0 }, 0.5, -0.5])
            .collect();
        let data = ImageDataset {
            images: Vec::new(),
            labels: (0..32).map(|i| (i % 2) as u8).collect(),
            rows: 1,
            cols: 3,
            source: "probe rows".into(),
            tabular: Some(rows),
        };
        spec.check_data(&data).unwrap();
        let device = Device::flex().autodiff();
        let model = spec.build(&device).unwrap();
        let before = model.extract().unwrap();
        let idx: Vec<usize> = (0..32).collect();
        let settings = TrainSettings {
            epochs: 20,
            batch_size: 8,
            lr: 0.05,
            ..Default::default()
        };
        let out = train::train(model, &data, &idx, &[], &settings, &device, &mut |_| {}).unwrap();
        assert_ne!(out.model.extract().unwrap(), before);
        let eval = train::evaluate(&out.model, &data, &idx, 32, 2, &device.inner()).unwrap();
        assert_eq!(eval.metrics().accuracy, 1.0);
    }

    #[test]
    fn registration_refuses_taken_reserved_and_malformed_names() {
        let cases: Vec<(&str, Result<(), ModelError>, &str)> = vec![
            ("cnn", register::<SameAsBuiltIn>(), "taken"),
            ("synthetic", register::<Reserved>(), "not synthetic"),
            ("Tiny", register::<UpperCase>(), "lower-case"),
            ("tiny:1", register::<WithColon>(), "lower-case"),
        ];
        for (name, result, want) in cases {
            let e = result.unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{name}`")) && e.contains(want),
                "{name}: {e}"
            );
        }
        assert_eq!(lookup("cnn").map(|r| r.usage()), Some("cnn (28x28 images)"));
    }

    #[test]
    fn an_unknown_name_lists_what_this_program_knows() {
        let e = ModelSpec::parse("resnet50", 10).unwrap_err().to_string();
        for want in [
            "`resnet50`",
            "mlp (28x28 images)",
            "bert",
            "synthetic:",
            "registered",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
