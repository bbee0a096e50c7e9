//! What the coordinator and the client share.
//!
//! - [`tensors`]: named flat tensors, the currency between burn, the wire and aggregation.
//! - [`wire`], [`codec`], [`spec_wire`]: the chunked tensor codec, its compressed encodings and
//!   the model spec on the wire (the only modules that see gRPC types).
//! - [`params`]: burn modules <-> named tensors.
//! - [`models`], [`data`], [`metrics`], [`train`], [`evaluate`], [`optim`], [`augment`],
//!   [`proximal`], [`control_variate`]: the ML side; none of it knows about gRPC.
//! - [`checkpoint`]: safetensors files in and out; [`pretrained`]: pre-trained weights in
//!   (safetensors, PyTorch, key remapping, head reset) and the PyTorch layout out.
//! - [`device`]: choosing flex / libtorch / CUDA at run time.
//! - [`dp`]: differential privacy: clipping, noise, adaptive clipping, the accountant.
//! - [`secagg`]: secure aggregation's steps (keys, masks, Shamir shares, quantisation, a
//!   client's and the coordinator's side), without transport.

pub mod augment;
pub mod control_variate;
pub use fedtune_formats::{blocks, checkpoint, codec, pretrained, tensors, wire};
pub mod crash_point;
pub mod data;
pub mod device;
pub mod dp;
pub mod embed;
pub mod evaluate;
pub mod freeze;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod params;
#[cfg(test)]
mod pretrained_tests;
pub mod proximal;
pub mod secagg;
pub mod spec_wire;
pub mod train;
pub mod wire_masked;
