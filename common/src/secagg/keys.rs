//! Key agreement and key derivation: X25519 (x25519-dalek) between participants' key pairs,
//! then HKDF-SHA256 (ring) binding each derived key to the round and to its purpose, so that no
//! mask or encryption key is ever used twice.

use rand::RngCore;
use ring::hkdf;
use x25519_dalek::{X25519_BASEPOINT_BYTES, x25519};

use super::SecAggError;

/// Salt of every derivation: a version tag, so keys of another protocol version differ.
const SALT: &[u8] = b"fedtune/secagg/v1";

/// An X25519 key pair. The secret is a full 32 random bytes from the caller's generator.
#[derive(Clone)]
pub struct KeyPair {
    secret: [u8; 32],
    pub public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    pub fn generate(rng: &mut impl RngCore) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self::from_secret(secret)
    }

    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            public: x25519(secret, X25519_BASEPOINT_BYTES),
            secret,
        }
    }

    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The shared secret with `peer`'s public key; a low-order key (all-zero result, which an
    /// attacker could choose to make the secret predictable) is refused.
    pub fn agree(&self, peer: &[u8; 32]) -> Result<[u8; 32], SecAggError> {
        let shared = x25519(self.secret, *peer);
        if shared == [0u8; 32] {
            return Err(SecAggError::WeakKey);
        }
        Ok(shared)
    }
}

/// A 32-byte key from `secret` for `purpose` between participants `a` and `b` (in that order)
/// in the round named by `context`.
pub fn derive(secret: &[u8; 32], context: &[u8], purpose: &[u8], a: u32, b: u32) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
    let (a, b) = (a.to_be_bytes(), b.to_be_bytes());
    let info: [&[u8]; 5] = [context, b"/", purpose, &a, &b];
    let mut out = [0u8; 32];
    // 32 bytes is HKDF-SHA256's output length: expand and fill cannot fail for it.
    if let Ok(okm) = prk.expand(&info, hkdf::HKDF_SHA256) {
        let _ = okm.fill(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn both_sides_agree_and_derivations_differ_by_purpose_and_order() {
        let mut rng = StdRng::seed_from_u64(1);
        let (a, b) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let (ab, ba) = (a.agree(&b.public).unwrap(), b.agree(&a.public).unwrap());
        assert_eq!(ab, ba);
        let k = derive(&ab, b"run/1", b"mask", 1, 2);
        assert_ne!(k, derive(&ab, b"run/1", b"share", 1, 2));
        assert_ne!(k, derive(&ab, b"run/1", b"mask", 2, 1));
        assert_ne!(k, derive(&ab, b"run/2", b"mask", 1, 2));
        assert_ne!(k, [0u8; 32]);
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        let a = KeyPair::generate(&mut StdRng::seed_from_u64(2));
        assert!(matches!(a.agree(&[0u8; 32]), Err(SecAggError::WeakKey)));
    }
}
