//! Shamir secret sharing over GF(2⁸), byte by byte (each byte of the secret is the constant
//! term of its own random polynomial of degree t − 1). Shares are evaluations at x = 1..=255,
//! so up to 255 holders; any t of them rebuild the secret, fewer learn nothing about it.
//!
//! The field is GF(2)[X]/(X⁸ + X⁴ + X³ + X + 1) (AES's), multiplied through log / exp tables
//! of the generator 3, built at compile time.

use rand::RngCore;

/// One holder's share: its x (1..=255) and one byte per byte of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub x: u8,
    pub y: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    #[error(
        "a threshold of {threshold} cannot be met by {holders} holders (need 1 <= t <= n <= 255)"
    )]
    BadThreshold { threshold: usize, holders: usize },
    #[error("{got} distinct shares, {needed} needed to rebuild the secret")]
    TooFewShares { got: usize, needed: usize },
    #[error("shares of different lengths ({a} and {b} bytes)")]
    LengthMismatch { a: usize, b: usize },
    #[error("a share with x = 0 (that would be the secret itself)")]
    ZeroX,
}

const fn tables() -> ([u8; 256], [u8; 256]) {
    let mut exp = [0u8; 256];
    let mut log = [0u8; 256];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x as u8;
        log[x as usize] = i as u8;
        // x *= 3 in GF(2⁸): x·2 ⊕ x, reduced by the AES polynomial.
        let mut doubled = x << 1;
        if doubled & 0x100 != 0 {
            doubled ^= 0x11b;
        }
        x = doubled ^ x;
        i += 1;
    }
    exp[255] = exp[0];
    (exp, log)
}

const TABLES: ([u8; 256], [u8; 256]) = tables();

fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    let (exp, log) = &TABLES;
    exp[(usize::from(log[a as usize]) + usize::from(log[b as usize])) % 255]
}

fn inv(a: u8) -> u8 {
    // a ≠ 0 (callers guarantee distinct x, so differences are non-zero).
    let (exp, log) = &TABLES;
    exp[(255 - usize::from(log[a as usize])) % 255]
}

/// Splits `secret` into `holders` shares (x = 1..=holders), any `threshold` of which rebuild it.
pub fn split(
    secret: &[u8],
    threshold: usize,
    holders: usize,
    rng: &mut impl RngCore,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > holders || holders > 255 {
        return Err(ShamirError::BadThreshold { threshold, holders });
    }
    let mut shares: Vec<Share> = (1..=holders)
        .map(|x| Share {
            x: x as u8,
            y: Vec::with_capacity(secret.len()),
        })
        .collect();
    let mut coefficients = vec![0u8; threshold - 1];
    for &byte in secret {
        rng.fill_bytes(&mut coefficients);
        for share in &mut shares {
            // Horner: f(x) = s + c₁x + … + c_{t−1}x^{t−1}.
            let mut y = 0u8;
            for &c in coefficients.iter().rev() {
                y = mul(y, share.x) ^ c;
            }
            share.y.push(mul(y, share.x) ^ byte);
        }
    }
    Ok(shares)
}

/// Rebuilds the secret from at least `threshold` shares with distinct x (the first `threshold`
/// distinct ones are used). Fewer is an error, never a wrong secret.
pub fn combine(shares: &[Share], threshold: usize) -> Result<Vec<u8>, ShamirError> {
    let mut picked: Vec<&Share> = Vec::with_capacity(threshold);
    for s in shares {
        if s.x == 0 {
            return Err(ShamirError::ZeroX);
        }
        if picked.len() < threshold && !picked.iter().any(|p| p.x == s.x) {
            picked.push(s);
        }
    }
    if threshold == 0 || picked.len() < threshold {
        return Err(ShamirError::TooFewShares {
            got: picked.len(),
            needed: threshold.max(1),
        });
    }
    let len = picked[0].y.len();
    if let Some(other) = picked.iter().find(|s| s.y.len() != len) {
        return Err(ShamirError::LengthMismatch {
            a: len,
            b: other.y.len(),
        });
    }
    // Lagrange basis at 0: lᵢ = Π_{j≠i} xⱼ / (xⱼ − xᵢ); in GF(2⁸) subtraction is XOR.
    let basis: Vec<u8> = picked
        .iter()
        .map(|si| {
            picked
                .iter()
                .filter(|sj| sj.x != si.x)
                .fold(1u8, |acc, sj| mul(acc, mul(sj.x, inv(sj.x ^ si.x))))
        })
        .collect();
    Ok((0..len)
        .map(|k| {
            picked
                .iter()
                .zip(&basis)
                .fold(0u8, |acc, (s, &l)| acc ^ mul(s.y[k], l))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;

    #[test]
    fn the_field_is_a_field() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "a = {a}");
        }
        // 0x53 · 0xCA = 0x01 is the textbook AES example.
        assert_eq!(mul(0x53, 0xca), 0x01);
        assert_eq!(mul(0x57, 0x83), 0xc1);
    }

    #[test]
    fn any_t_of_n_shares_rebuild_the_secret() {
        let mut rng = StdRng::seed_from_u64(1);
        let secret: Vec<u8> = (0..32).map(|i| (i * 37 + 11) as u8).collect();
        for (t, n) in [(1, 1), (2, 3), (3, 5), (5, 9), (17, 40)] {
            let mut shares = split(&secret, t, n, &mut rng).unwrap();
            for _ in 0..10 {
                shares.shuffle(&mut rng);
                assert_eq!(combine(&shares[..t], t).unwrap(), secret, "t {t}, n {n}");
            }
        }
    }

    #[test]
    fn fewer_than_t_shares_are_refused_not_guessed() {
        let mut rng = StdRng::seed_from_u64(2);
        let shares = split(b"mask seed", 4, 7, &mut rng).unwrap();
        assert_eq!(
            combine(&shares[..3], 4),
            Err(ShamirError::TooFewShares { got: 3, needed: 4 })
        );
        // Repeated shares do not count twice.
        let repeated = vec![
            shares[0].clone(),
            shares[0].clone(),
            shares[1].clone(),
            shares[2].clone(),
        ];
        assert!(matches!(
            combine(&repeated, 4),
            Err(ShamirError::TooFewShares { got: 3, .. })
        ));
        assert!(split(b"x", 5, 4, &mut rng).is_err());
        assert!(split(b"x", 2, 256, &mut rng).is_err());
    }

    #[test]
    fn t_minus_one_shares_say_nothing_about_the_secret() {
        // With t = 2, one share's byte is uniform whatever the secret: over many splits of two
        // different secrets, its distribution is the same (each value about 1/256).
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [[0u32; 256]; 2];
        for (i, secret) in [[0u8], [255u8]].iter().enumerate() {
            for _ in 0..25_600 {
                let s = split(secret, 2, 2, &mut rng).unwrap();
                counts[i][s[0].y[0] as usize] += 1;
            }
        }
        for c in counts {
            assert!(c.iter().all(|&n| (50..=160).contains(&n)), "{c:?}");
        }
    }
}
