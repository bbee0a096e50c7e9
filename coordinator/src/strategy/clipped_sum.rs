//! Central DP's combine rule (DP-FedAvg): each update clipped to C as it arrives, summed with
//! equal weights, N(0, σ²) added once, divided by the expected number of clients m. Streaming
//! like the weighted mean: one model-sized accumulator whatever the number of clients.

use std::sync::{Arc, Mutex};

use fedtune_common::blocks::Blocks;
use fedtune_common::dp::clip::clip_factor;
use fedtune_common::dp::noise::add_gaussian;
use fedtune_common::wire::decode_le;

use super::mean::fold_le;
use rand::rngs::StdRng;

use super::layout::Layout;
use super::{AggregateError, Aggregator, UpdateWeight};

/// What this round's clipping aggregator saw (central DP).
#[derive(Debug, Default)]
pub struct Tally {
    /// Updates whose norm was within the bound (adaptive clipping's count).
    pub unclipped: usize,
}

/// Central DP's combine rule: clip each update to C, sum, add N(0, (z_Δ·C)²), divide by m.
pub struct ClippedSum {
    pub layout: Arc<Layout>,
    /// C.
    pub clip: f64,
    pub sum: Vec<f32>,
    pub accepted: usize,
    /// σ of the noise on the sum: z_Δ·C.
    pub noise_stddev: f64,
    /// m.
    pub expected: f64,
    pub tally: Arc<Mutex<Tally>>,
    pub rng: StdRng,
}

impl Aggregator for ClippedSum {
    fn accept(
        &mut self,
        _source: &str,
        delta: &dyn Blocks,
        _weight: UpdateWeight,
    ) -> Result<(), AggregateError> {
        let mut squares = 0.0f64;
        self.layout.place(delta, &mut |_, bytes| {
            squares += decode_le(bytes)
                .map(|v| f64::from(v) * f64::from(v))
                .sum::<f64>();
        })?;
        let norm = squares.sqrt();
        let factor = clip_factor(norm, self.clip);
        // Shaved so that rounding never leaves a clipped update above C.
        let f = if factor < 1.0 {
            (factor * (1.0 - 1e-6)) as f32
        } else {
            1.0
        };
        let sum = &mut self.sum;
        self.layout.place(delta, &mut |range, bytes| {
            fold_le(&mut sum[range], bytes, f)
        })?;
        if norm <= self.clip {
            self.tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unclipped += 1;
        }
        self.accepted += 1;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.accepted
    }

    fn finish(mut self: Box<Self>) -> Result<Option<Vec<f32>>, AggregateError> {
        add_gaussian(&mut self.sum, self.noise_stddev, &mut self.rng);
        let inv = (1.0 / self.expected.max(1e-12)) as f32;
        let mut mean = std::mem::take(&mut self.sum);
        mean.iter_mut().for_each(|v| *v *= inv);
        Ok(Some(mean))
    }
}
