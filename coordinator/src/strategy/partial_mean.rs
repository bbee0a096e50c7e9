//! A tiered aggregator's combine step: the example-weighted mean of its clients' deltas and
//! their total examples, which its parent weighs as one update. Accumulated in f64, so that the
//! extra level adds one f32 rounding (of the mean it sends) and nothing more: the parent's
//! Σ Wₑ·meanₑ / Σ Wₑ is then flat FedAvg's Σ nᵢΔᵢ / Σ nᵢ to f32 precision. Exact for the linear
//! rules only; the parent refuses an aggregator when its strategy is not one.

use std::sync::Arc;

use fedtune_common::blocks::Blocks;

use super::layout::Layout;
use super::{AggregateError, Aggregator, UpdateWeight};

pub struct PartialMean {
    layout: Arc<Layout>,
    sum: Vec<f64>,
    total_weight: f64,
    accepted: usize,
}

impl PartialMean {
    pub fn new(layout: Arc<Layout>) -> Self {
        Self {
            sum: vec![0.0; layout.len()],
            layout,
            total_weight: 0.0,
            accepted: 0,
        }
    }
}

impl Aggregator for PartialMean {
    fn accept(
        &mut self,
        _source: &str,
        delta: &dyn Blocks,
        weight: UpdateWeight,
    ) -> Result<(), AggregateError> {
        let w = weight.examples as f64;
        let sum = &mut self.sum;
        self.layout.place(delta, &mut |range, bytes| {
            for (acc, d) in sum[range].iter_mut().zip(bytes.chunks_exact(4)) {
                *acc += w * f64::from(f32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            }
        })?;
        self.total_weight += w;
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
        let total = self.total_weight;
        Ok(Some(self.sum.iter().map(|s| (s / total) as f32).collect()))
    }
}

#[cfg(test)]
mod tests {
    use fedtune_common::tensors::{NamedTensor, TensorSet};
    use fedtune_common::wire::EncodedTensors;

    use super::*;

    fn update(values: Vec<f32>) -> fedtune_common::wire::Payload {
        let set = TensorSet::new(vec![
            NamedTensor::new("w", vec![values.len()], values).unwrap(),
        ])
        .unwrap();
        let enc = EncodedTensors::encode(&set, 0, 1 << 20).unwrap();
        let mut asm = fedtune_common::wire::Assembler::new(enc.manifest.clone(), u64::MAX).unwrap();
        for c in &enc.chunks {
            asm.push(c).unwrap();
        }
        asm.finish().unwrap()
    }

    #[test]
    fn the_mean_is_weighted_by_examples() {
        let specs = update(vec![0.0; 2]).specs;
        let mut agg: Box<dyn Aggregator> =
            Box::new(PartialMean::new(Arc::new(Layout::new(&specs))));
        agg.accept("a", &update(vec![1.0, -2.0]), UpdateWeight::examples(3))
            .unwrap();
        agg.accept("b", &update(vec![0.5, 4.0]), UpdateWeight::examples(1))
            .unwrap();
        assert_eq!(agg.finish().unwrap().unwrap(), vec![0.875, -0.5]);
    }

    #[test]
    fn the_mean_keeps_what_an_f32_sum_would_lose() {
        // In f32, 2^24 + 1 is 2^24, so the sum would be 0 and the mean 0; only an f64 sum
        // keeps the 1, as flat FedAvg over these three clients would.
        let specs = update(vec![0.0]).specs;
        let mut agg: Box<dyn Aggregator> =
            Box::new(PartialMean::new(Arc::new(Layout::new(&specs))));
        for v in [16_777_216.0, 1.0, -16_777_216.0] {
            agg.accept("c", &update(vec![v]), UpdateWeight::examples(1))
                .unwrap();
        }
        assert_eq!(agg.finish().unwrap().unwrap(), vec![1.0f32 / 3.0]);
    }

    #[test]
    fn nothing_accepted_combines_to_nothing() {
        let specs = update(vec![0.0; 2]).specs;
        let agg: Box<dyn Aggregator> = Box::new(PartialMean::new(Arc::new(Layout::new(&specs))));
        assert!(agg.finish().unwrap().is_none());
    }
}
