//! Named flat f32 tensors: the currency between burn, the wire, checkpoints and aggregation.
//!
//! A [`TensorSet`] is an ordered list of uniquely named tensors. Order matters only for encoding
//! (the wire concatenates tensors in set order); lookups go by name.

use std::collections::HashMap;

/// Errors about the content or shape of a tensor set.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("tensor `{name}` appears twice")]
    DuplicateName { name: String },
    #[error("tensor `{name}` has shape {shape:?} ({expected} values) but holds {actual} values")]
    LengthMismatch {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("tensor `{name}` is unknown to this model (it has no tensor of that name)")]
    UnknownName { name: String },
    #[error("tensor `{name}` is missing")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{name}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
}

/// One tensor: its path in the model (`fc1.weight`), its shape and its values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let expected = shape.iter().product::<usize>();
        if expected != data.len() {
            return Err(TensorError::LengthMismatch {
                name,
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { name, shape, data })
    }

    /// A matrix transposed (`[r, c]` becomes `[c, r]`): PyTorch's Linear layout to burn's and
    /// back. Other ranks come back unchanged.
    pub fn transposed(&self) -> NamedTensor {
        let &[r, c] = self.shape.as_slice() else {
            return self.clone();
        };
        let mut data = vec![0.0; self.data.len()];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        NamedTensor {
            name: self.name.clone(),
            shape: vec![c, r],
            data,
        }
    }

    pub fn num_elements(&self) -> usize {
        self.data.len()
    }

    /// The first non-finite value, if any.
    pub fn check_finite(&self) -> Result<(), TensorError> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(index) => Err(TensorError::NonFinite {
                name: self.name.clone(),
                index,
                value: self.data[index],
            }),
        }
    }
}

/// Name and shape of one tensor, without values: what a model's parameters look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Checks that `got` names exactly the tensors of `want` (any order, each once), with the same
/// shapes; otherwise names the first difference.
pub fn check_specs(got: &[TensorSpec], want: &[TensorSpec]) -> Result<(), TensorError> {
    let wanted: HashMap<&str, &TensorSpec> = want.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut seen = std::collections::HashSet::with_capacity(got.len());
    for g in got {
        let w = wanted
            .get(g.name.as_str())
            .ok_or_else(|| TensorError::UnknownName {
                name: g.name.clone(),
            })?;
        if w.shape != g.shape {
            return Err(TensorError::ShapeMismatch {
                name: g.name.clone(),
                expected: w.shape.clone(),
                actual: g.shape.clone(),
            });
        }
        if !seen.insert(g.name.as_str()) {
            return Err(TensorError::DuplicateName {
                name: g.name.clone(),
            });
        }
    }
    match want.iter().find(|w| !seen.contains(w.name.as_str())) {
        Some(m) => Err(TensorError::Missing {
            name: m.name.clone(),
        }),
        None => Ok(()),
    }
}

/// An ordered set of uniquely named tensors.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TensorSet {
    tensors: Vec<NamedTensor>,
}

impl TensorSet {
    pub fn new(tensors: Vec<NamedTensor>) -> Result<Self, TensorError> {
        let mut seen = HashMap::with_capacity(tensors.len());
        for t in &tensors {
            if seen.insert(t.name.as_str(), ()).is_some() {
                return Err(TensorError::DuplicateName {
                    name: t.name.clone(),
                });
            }
        }
        Ok(Self { tensors })
    }

    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }

    pub fn into_tensors(self) -> Vec<NamedTensor> {
        self.tensors
    }

    /// Each tensor's name and mutable values (names and shapes stay fixed).
    pub fn values_mut(&mut self) -> impl Iterator<Item = (&str, &mut [f32])> {
        self.tensors
            .iter_mut()
            .map(|t| (t.name.as_str(), t.data.as_mut_slice()))
    }

    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(NamedTensor::num_elements).sum()
    }

    /// Bytes of the values as f32 (what the wire carries).
    pub fn byte_len(&self) -> usize {
        self.num_params() * 4
    }

    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                shape: t.shape.clone(),
            })
            .collect()
    }

    /// The tensors whose names `keep` accepts, in order (copied).
    pub fn select(&self, keep: impl Fn(&str) -> bool) -> TensorSet {
        TensorSet {
            tensors: self
                .tensors
                .iter()
                .filter(|t| keep(&t.name))
                .cloned()
                .collect(),
        }
    }

    /// Adds the tensors of `other` (their names must be new), keeping `order`'s order for the
    /// names it lists.
    pub fn merged(self, other: &TensorSet, order: &[TensorSpec]) -> Result<TensorSet, TensorError> {
        let mut all = self.tensors;
        all.extend(other.tensors.iter().cloned());
        let mut set = TensorSet::new(all)?;
        let pos = |n: &str| order.iter().position(|s| s.name == n).unwrap_or(usize::MAX);
        set.tensors.sort_by_key(|t| pos(&t.name));
        Ok(set)
    }

    /// xxh3 over names, shapes and values: whether two sets hold the same tensors.
    pub fn content_hash(&self) -> u64 {
        self.content_hash_of(|_| true)
    }

    /// [`TensorSet::content_hash`] of the tensors whose names `keep` accepts, without copying them.
    pub fn content_hash_of(&self, keep: impl Fn(&str) -> bool) -> u64 {
        self.content_hash_as(keep, |v| v)
    }

    /// [`TensorSet::content_hash_of`] of the values as `value` maps them (e.g. rounded as a
    /// receiver holds them after a lossy encoding), without copying them.
    pub fn content_hash_as(&self, keep: impl Fn(&str) -> bool, value: impl Fn(f32) -> f32) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for t in self.tensors.iter().filter(|t| keep(&t.name)) {
            h.update(t.name.as_bytes());
            h.update(&[0]);
            for d in &t.shape {
                h.update(&(*d as u64).to_le_bytes());
            }
            for v in &t.data {
                h.update(&value(*v).to_le_bytes());
            }
        }
        h.digest()
    }

    /// Every value finite; otherwise the first offending tensor and index.
    pub fn check_finite(&self) -> Result<(), TensorError> {
        self.tensors.iter().try_for_each(NamedTensor::check_finite)
    }

    /// Checks that `self` has exactly the tensors of `specs` (any order), with the same shapes.
    pub fn check_matches(&self, specs: &[TensorSpec]) -> Result<(), TensorError> {
        check_specs(&self.specs(), specs)
    }

    /// `self - base`, tensor by tensor: the update a client sends (local - global).
    pub fn delta_from(&self, base: &TensorSet) -> Result<TensorSet, TensorError> {
        self.check_matches(&base.specs())?;
        let tensors = self
            .tensors
            .iter()
            .map(|t| {
                // check_matches guarantees presence and shape.
                let b = base
                    .get(&t.name)
                    .map(|b| b.data.as_slice())
                    .unwrap_or_default();
                NamedTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data: t.data.iter().zip(b).map(|(l, g)| l - g).collect(),
                }
            })
            .collect();
        Ok(TensorSet { tensors })
    }

    /// `self += scale * other`, tensor by tensor.
    pub fn add_scaled(&mut self, other: &TensorSet, scale: f32) -> Result<(), TensorError> {
        other.check_matches(&self.specs())?;
        for t in &mut self.tensors {
            if let Some(o) = other.get(&t.name) {
                for (v, d) in t.data.iter_mut().zip(&o.data) {
                    *v += scale * d;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(values: &[(&str, Vec<usize>, Vec<f32>)]) -> TensorSet {
        TensorSet::new(
            values
                .iter()
                .map(|(n, s, d)| NamedTensor::new(*n, s.clone(), d.clone()).unwrap())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn delta_then_apply_restores_local_bit_exactly() {
        let global = set(&[
            ("a", vec![2, 2], vec![0.1, -2.5, 3.75, 1e-8]),
            ("b", vec![1], vec![7.0]),
        ]);
        let local = set(&[
            ("a", vec![2, 2], vec![0.3, -2.0, 3.0, 2e-8]),
            ("b", vec![1], vec![6.5]),
        ]);
        let delta = local.delta_from(&global).unwrap();
        assert_eq!(delta.get("b").unwrap().data, vec![-0.5]);
        let mut rebuilt = global.clone();
        rebuilt.add_scaled(&delta, 1.0).unwrap();
        // (l - g) + g is not always l in floating point; what must hold is that the client and
        // coordinator compute the same thing, so compare with the same arithmetic.
        for (r, (l, g)) in rebuilt.tensors()[0].data.iter().zip(
            local.tensors()[0]
                .data
                .iter()
                .zip(&global.tensors()[0].data),
        ) {
            assert_eq!(r.to_bits(), (g + (l - g)).to_bits());
        }
    }

    #[test]
    fn mismatches_are_named() {
        let a = set(&[("a", vec![2], vec![1.0, 2.0])]);
        let b = set(&[("a", vec![1, 2], vec![1.0, 2.0])]);
        assert_eq!(
            b.check_matches(&a.specs()),
            Err(TensorError::ShapeMismatch {
                name: "a".into(),
                expected: vec![2],
                actual: vec![1, 2]
            })
        );
        let c = set(&[("z", vec![2], vec![1.0, 2.0])]);
        assert_eq!(
            c.check_matches(&a.specs()),
            Err(TensorError::UnknownName { name: "z".into() })
        );
        let nan = set(&[("a", vec![2], vec![1.0, f32::NAN])]);
        assert!(matches!(
            nan.check_finite(),
            Err(TensorError::NonFinite { index: 1, .. })
        ));
        assert!(NamedTensor::new("x", vec![3], vec![1.0]).is_err());
        assert!(
            TensorSet::new(vec![
                NamedTensor::new("x", vec![1], vec![1.0]).unwrap(),
                NamedTensor::new("x", vec![1], vec![1.0]).unwrap()
            ])
            .is_err()
        );
    }
}
