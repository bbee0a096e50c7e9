//! fedtune's wire contract, generated from `fedtune.proto`.
//!
//! Only the transport layers (`fedtune-common::wire`, the coordinator's service, the client's
//! session) use these types; training and aggregation never see them.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("fedtune.v1");

/// Bumped on any incompatible change of the messages or their meaning. Join refuses a mismatch
/// with a message that names both versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest chunk of tensor bytes in one message: far below tonic's 4 MiB decode limit, so a
/// model of any size travels without raising a limit.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
