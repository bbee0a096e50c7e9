//! Streaming example-weighted mean of deltas (FedAvg's combine step): Σ nᵢ·Δᵢ / Σ nᵢ, folded in
//! as each update arrives. One model-sized accumulator, whatever the number of clients.

use std::sync::Arc;

use fedtune_common::blocks::Blocks;

use super::layout::Layout;
use super::{AggregateError, Aggregator, UpdateWeight};

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
        delta: &dyn Blocks,
        weight: UpdateWeight,
    ) -> Result<(), AggregateError> {
        let w = weight.examples as f32;
        let sum = &mut self.sum;
        self.layout.place(delta, &mut |range, bytes| {
            fold_le(&mut sum[range], bytes, w)
        })?;
        self.total_weight += weight.examples as f64;
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

/// `acc += w · delta`, `delta` as little-endian f32 bytes (the wire's form): the fold every
/// linear strategy's accumulator runs once per update. Written over fixed-size blocks so the
/// compiler vectorises it (decoding is a plain load on little-endian machines).
pub fn fold_le(acc: &mut [f32], delta: &[u8], w: f32) {
    const LANES: usize = 16;
    let mut acc_blocks = acc.chunks_exact_mut(LANES);
    let mut delta_blocks = delta.chunks_exact(LANES * 4);
    for (a, d) in (&mut acc_blocks).zip(&mut delta_blocks) {
        for (a, d) in a.iter_mut().zip(d.chunks_exact(4)) {
            *a += w * f32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        }
    }
    let rest = acc_blocks.into_remainder();
    for (a, d) in rest
        .iter_mut()
        .zip(delta_blocks.remainder().chunks_exact(4))
    {
        *a += w * f32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::fold_le;

    #[test]
    fn fold_matches_the_plain_loop_at_every_length_and_offset() {
        for len in [0usize, 1, 15, 16, 17, 100, 1027] {
            let delta: Vec<f32> = (0..len).map(|i| i as f32 * 0.25 - 3.0).collect();
            let bytes: Vec<u8> = delta.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut acc: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let want: Vec<f32> = acc.iter().zip(&delta).map(|(a, d)| a + 1.5 * d).collect();
            fold_le(&mut acc, &bytes, 1.5);
            assert_eq!(acc, want, "length {len}");
        }
    }
}
