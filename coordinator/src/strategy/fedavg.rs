//! Federated averaging on deltas (McMahan et al. 2017): global += Σ nᵢ·Δᵢ / Σ nᵢ.

use std::collections::HashMap;

use fedtune_common::tensors::{TensorSet, TensorSpec};
use fedtune_common::wire::{Payload, decode_le};

use super::Aggregator;

/// Running Σ nᵢ·Δᵢ in one flat buffer laid out as the global model, plus Σ nᵢ.
pub struct FedAvg {
    /// name -> (offset, len) in `sum`.
    layout: HashMap<String, (usize, usize)>,
    sum: Vec<f32>,
    total_weight: f64,
    accepted: usize,
}

impl FedAvg {
    pub fn new(specs: &[TensorSpec]) -> Self {
        let mut layout = HashMap::with_capacity(specs.len());
        let mut offset = 0;
        for s in specs {
            layout.insert(s.name.clone(), (offset, s.num_elements()));
            offset += s.num_elements();
        }
        Self {
            layout,
            sum: vec![0.0; offset],
            total_weight: 0.0,
            accepted: 0,
        }
    }
}

impl Aggregator for FedAvg {
    fn accept(&mut self, delta: &Payload, num_examples: u64) {
        let w = num_examples as f32;
        for (spec, bytes) in delta.tensors() {
            // The caller verified names and shapes against the global model.
            if let Some(&(offset, len)) = self.layout.get(&spec.name) {
                for (acc, d) in self.sum[offset..offset + len]
                    .iter_mut()
                    .zip(decode_le(bytes))
                {
                    *acc += w * d;
                }
            }
        }
        self.total_weight += num_examples as f64;
        self.accepted += 1;
    }

    fn accepted(&self) -> usize {
        self.accepted
    }

    fn finish(self: Box<Self>, global: &mut TensorSet) {
        if self.accepted == 0 || self.total_weight <= 0.0 {
            return;
        }
        let inv = (1.0 / self.total_weight) as f32;
        for (name, values) in global.values_mut() {
            if let Some(&(offset, len)) = self.layout.get(name) {
                for (g, s) in values.iter_mut().zip(&self.sum[offset..offset + len]) {
                    *g += s * inv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_common::tensors::NamedTensor;
    use fedtune_common::wire::{Assembler, EncodedTensors};

    fn payload(a: Vec<f32>, b: Vec<f32>) -> Payload {
        let set = TensorSet::new(vec![
            NamedTensor::new("b", vec![1], b).unwrap(),
            NamedTensor::new("a", vec![2], a).unwrap(),
        ])
        .unwrap();
        let enc = EncodedTensors::encode(&set, 0, 1024).unwrap();
        let mut asm = Assembler::new(enc.manifest, u64::MAX).unwrap();
        enc.chunks.iter().for_each(|c| asm.push(c).unwrap());
        asm.finish().unwrap()
    }

    #[test]
    fn weighted_mean_of_deltas_matches_hand_computation() {
        let mut global = TensorSet::new(vec![
            NamedTensor::new("a", vec![2], vec![10.0, -1.0]).unwrap(),
            NamedTensor::new("b", vec![1], vec![0.5]).unwrap(),
        ])
        .unwrap();
        let mut agg: Box<dyn Aggregator> = Box::new(FedAvg::new(&global.specs()));
        // n=1: a+=(1,2) b+=4 ; n=3: a+=(5,6) b+=-4  (sent in another tensor order than the global)
        agg.accept(&payload(vec![1.0, 2.0], vec![4.0]), 1);
        agg.accept(&payload(vec![5.0, 6.0], vec![-4.0]), 3);
        assert_eq!(agg.accepted(), 2);
        agg.finish(&mut global);
        // a: 10 + (1*1 + 3*5)/4 = 14, -1 + (1*2 + 3*6)/4 = 4 ; b: 0.5 + (4 - 12)/4 = -1.5
        assert_eq!(global.get("a").unwrap().data, vec![14.0, 4.0]);
        assert_eq!(global.get("b").unwrap().data, vec![-1.5]);
    }

    #[test]
    fn no_update_leaves_global_unchanged() {
        let mut global =
            TensorSet::new(vec![NamedTensor::new("a", vec![1], vec![3.0]).unwrap()]).unwrap();
        let before = global.clone();
        Box::new(FedAvg::new(&global.specs())).finish(&mut global);
        assert_eq!(global, before);
    }
}
