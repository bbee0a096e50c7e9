//! The global model as one flat `f32` vector: where each tensor lives in it. Aggregators and
//! server optimisers work on flat vectors in this order, whatever order a client sent.

use std::collections::HashMap;
use std::ops::Range;

use fedtune_common::blocks::Blocks;
use fedtune_common::tensors::{NamedTensor, TensorError, TensorSet, TensorSpec};
use fedtune_common::wire::decode_le;

#[derive(Debug, Clone)]
pub struct Layout {
    specs: Vec<TensorSpec>,
    ranges: HashMap<String, Range<usize>>,
    len: usize,
}

impl Layout {
    pub fn new(specs: &[TensorSpec]) -> Self {
        let mut ranges = HashMap::with_capacity(specs.len());
        let mut offset = 0;
        for s in specs {
            ranges.insert(s.name.clone(), offset..offset + s.num_elements());
            offset += s.num_elements();
        }
        Self {
            specs: specs.to_vec(),
            ranges,
            len: offset,
        }
    }

    /// Values in the whole model.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn range(&self, name: &str) -> Option<Range<usize>> {
        self.ranges.get(name).cloned()
    }

    /// Calls `f` with each block of a verified update and its place in the flat vector
    /// (tensors the layout does not know are skipped: the round engine refused them before).
    pub fn place(
        &self,
        delta: &dyn Blocks,
        f: &mut dyn FnMut(Range<usize>, &[u8]),
    ) -> std::io::Result<()> {
        delta.for_each_block(&mut |spec, first, bytes| {
            if let Some(r) = self.range(&spec.name) {
                let start = r.start + first;
                f(start..start + bytes.len() / 4, bytes);
            }
        })
    }

    /// Decodes a verified update into a flat vector.
    pub fn flatten(&self, delta: &dyn Blocks) -> std::io::Result<Vec<f32>> {
        let mut flat = vec![0.0; self.len];
        self.place(delta, &mut |range, bytes| {
            for (dst, v) in flat[range].iter_mut().zip(decode_le(bytes)) {
                *dst = v;
            }
        })?;
        Ok(flat)
    }

    /// `global[i] += scale * delta[i]` for every value.
    pub fn add_scaled(&self, global: &mut TensorSet, delta: &[f32], scale: f32) {
        for (name, values) in global.values_mut() {
            if let Some(r) = self.range(name) {
                for (g, d) in values.iter_mut().zip(&delta[r]) {
                    *g += scale * d;
                }
            }
        }
    }

    /// A flat vector as named tensors, each name prefixed (`m.fc1.weight`): server state.
    pub fn to_tensors(&self, prefix: &str, flat: &[f32]) -> Result<Vec<NamedTensor>, TensorError> {
        self.specs
            .iter()
            .map(|s| {
                let r = self.ranges[&s.name].clone();
                NamedTensor::new(
                    format!("{prefix}.{}", s.name),
                    s.shape.clone(),
                    flat[r].to_vec(),
                )
            })
            .collect()
    }

    /// The inverse of [`Layout::to_tensors`]: every tensor must be there with its shape.
    pub fn from_tensors(&self, prefix: &str, set: &TensorSet) -> Result<Vec<f32>, String> {
        let mut flat = vec![0.0; self.len];
        for s in &self.specs {
            let name = format!("{prefix}.{}", s.name);
            let t = set
                .get(&name)
                .ok_or_else(|| format!("tensor `{name}` is missing"))?;
            if t.shape != s.shape {
                return Err(format!(
                    "tensor `{name}` has shape {:?}, the model's is {:?}",
                    t.shape, s.shape
                ));
            }
            flat[self.ranges[&s.name].clone()].copy_from_slice(&t.data);
        }
        Ok(flat)
    }
}
