//! Streaming example-weighted mean of deltas (FedAvg's combine step): Σ nᵢ·Δᵢ / Σ nᵢ, folded in
//! as each update arrives. One model-sized accumulator, whatever the number of clients.

use std::sync::Arc;

use fedtune_common::wire::{Payload, decode_le};

use super::layout::Layout;
use super::{AggregateError, Aggregator};

pub struct WeightedMean {
    layout: Arc<Layout>,
    sum: Vec<f32>,
    total_weight: f64,
    accepted: usize,
}

impl WeightedMean {
    pub fn new(layout: Arc<Layout>) -> Self {
        Self {
            sum: vec![0.0; layout.len()],
            layout,
            total_weight: 0.0,
            accepted: 0,
        }
    }
}

impl Aggregator for WeightedMean {
    fn accept(
        &mut self,
        _source: &str,
        delta: &Payload,
        num_examples: u64,
    ) -> Result<(), AggregateError> {
        let w = num_examples as f32;
        for (range, bytes) in self.layout.place(delta) {
            for (acc, d) in self.sum[range].iter_mut().zip(decode_le(bytes)) {
                *acc += w * d;
            }
        }
        self.total_weight += num_examples as f64;
        self.accepted += 1;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.accepted
    }

    fn finish(self: Box<Self>) -> Result<Option<Vec<f32>>, AggregateError> {
        if self.accepted == 0 || self.total_weight <= 0.0 {
            return Ok(None);
        }
        let inv = (1.0 / self.total_weight) as f32;
        let mut mean = self.sum;
        mean.iter_mut().for_each(|v| *v *= inv);
        Ok(Some(mean))
    }
}
