//! How a round's updates become the next global model.
//!
//! A strategy is streaming: [`Aggregator::accept`] folds each verified update in as it arrives
//! and [`Aggregator::finish`] applies the result once the round closes, so the coordinator holds
//! one model-sized accumulator per round, whatever the number of clients.

mod fedavg;

pub use fedavg::FedAvg;

use fedtune_common::tensors::TensorSet;
use fedtune_common::wire::Payload;

pub trait Aggregator: Send {
    /// Folds in one client's delta (already verified: names, shapes, finite values), weighted
    /// by its number of training examples.
    fn accept(&mut self, delta: &Payload, num_examples: u64);

    /// Updates accepted so far.
    fn accepted(&self) -> usize;

    /// Applies the round's aggregate to `global`. With no accepted update, `global` is unchanged.
    fn finish(self: Box<Self>, global: &mut TensorSet);
}
