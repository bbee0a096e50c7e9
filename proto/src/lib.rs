//! fedtune's wire contract, generated from `fedtune.proto`.
//!
//! Only the transport layers (`fedtune-common::wire`, the coordinator's service, the client's
//! session) use these types; training and aggregation never see them.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("fedtune.v1");

/// The encoded descriptors of `fedtune.proto`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fedtune_descriptor");

/// Bumped on any incompatible change of the messages or their meaning. Join refuses a mismatch
/// with a message that names both versions.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest chunk of tensor bytes in one message: far below tonic's 4 MiB decode limit, so a
/// model of any size travels without raising a limit.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Installs the process-wide rustls crypto provider both sides use: ring only (two providers
/// in one process make rustls panic at the first handshake), with the AES-128-GCM suites first.
/// Both ends prefer the same order, so TLS 1.3 settles on AES-128-GCM: on CPUs with AES
/// instructions the cheapest of the standard suites per byte, and the model's bytes are most
/// of what crosses the wire. Calling it again is harmless.
pub fn install_crypto_provider() {
    use rustls::crypto::ring::{cipher_suite as cs, default_provider};
    let mut provider = default_provider();
    let first = [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    provider
        .cipher_suites
        .sort_by_key(|s| !first.iter().any(|f| f.suite() == s.suite()));
    let _ = provider.install_default();
}
