//! Secure aggregation (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017), as pure steps
//! the transport carries: the coordinator only ever holds masked updates and, at the end, their
//! unmasked sum.
//!
//! - [`keys`]: X25519 key agreement and HKDF-SHA256 derivation bound to the round and purpose.
//! - [`masks`]: a 32-byte seed expanded by ChaCha20 into u32 words, added mod 2³².
//! - [`shamir`]: Shamir shares over GF(2⁸) of the self-mask seed and the masking key.
//! - [`graph`]: SecAgg+'s ring of k neighbours.
//! - [`quantize`]: clipped values to Z_(2³²) with stochastic rounding, and back.
//! - [`participant`]: a client's steps; [`unmask`]: the coordinator's.
//!
//! Threat model: the coordinator is honest-but-curious (it follows the protocol but would
//! read what it can); a coordinator that lies about who dropped to different clients is not
//! defended against (Bonawitz et al.'s consistency round is not implemented).

pub mod graph;
pub mod keys;
pub mod masks;
pub mod participant;
pub mod quantize;
pub mod shamir;
pub mod unmask;

#[cfg(test)]
mod tests;

use ring::digest;

/// A participant's two public keys: for sealing shares, and for pairwise masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertise {
    pub id: u32,
    pub enc_key: [u8; 32],
    pub mask_key: [u8; 32],
}

/// A share pair sealed by `from` for `to` (ChaCha20-Poly1305 under a key only they can derive);
/// the coordinator forwards it without being able to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedShare {
    pub from: u32,
    pub to: u32,
    pub ciphertext: Vec<u8>,
}

/// What a survivor reveals about one neighbour at the end of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revealed {
    /// A share of a surviving neighbour's self-mask seed.
    SelfSeed { of: u32, share: shamir::Share },
    /// A share of a dropped neighbour's masking secret key.
    MaskKey { of: u32, share: shamir::Share },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    #[error("a peer's public key is of low order (its shared secret would be predictable)")]
    WeakKey,
    #[error("sealing or opening a share failed")]
    Seal,
    #[error("secret sharing: {0}")]
    Shamir(#[from] shamir::ShamirError),
    #[error("bad neighbour list: {0}")]
    BadNeighbours(String),
    #[error("the share from participant {from} was refused: {why}")]
    BadShare { from: u32, why: String },
    #[error(
        "participant {0} was named both surviving and dropped; revealing both of its shares would expose its update"
    )]
    BothShares(u32),
    #[error(
        "{survivors} participants survived, fewer than the threshold {threshold}: the sum cannot be unmasked"
    )]
    TooFewSurvivors { survivors: usize, threshold: usize },
    #[error("participant {of}'s {what} cannot be rebuilt: {why}")]
    CannotRebuild {
        of: u32,
        what: &'static str,
        why: String,
    },
    #[error("participant {0} is in the sum but never shared its keys")]
    Unknown(u32),
}

/// SHA-256 commitment to a self-mask seed, sent with the shares: the coordinator checks a
/// rebuilt seed against it, so wrong shares fail the round instead of corrupting the sum.
pub fn commitment(context: &[u8], id: u32, seed: &[u8; 32]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"fedtune/secagg/v1/commit");
    ctx.update(context);
    ctx.update(&id.to_be_bytes());
    ctx.update(seed);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The seed of a participant's self mask.
pub(crate) fn self_mask_seed(seed: &[u8; 32], context: &[u8], id: u32) -> [u8; 32] {
    keys::derive(seed, context, b"self-mask", id, id)
}

/// The seed of the pairwise mask of u and v (the same from either side).
pub(crate) fn pair_mask_seed(shared: &[u8; 32], context: &[u8], u: u32, v: u32) -> [u8; 32] {
    keys::derive(shared, context, b"pair-mask", u.min(v), u.max(v))
}
