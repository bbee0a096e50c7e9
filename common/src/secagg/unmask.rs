//! The coordinator's last step: from the sum of the survivors' masked updates and the shares
//! they revealed, rebuild each survivor's self-mask seed (checked against its commitment) and
//! each dropped participant's masking key (checked against its public key), and remove those
//! masks. Too few shares for any secret is an error: the round fails, never a wrong sum.

use std::collections::{HashMap, HashSet};

use super::keys::KeyPair;
use super::shamir::{self, Share};
use super::{Advertise, Revealed, SecAggError, commitment, masks, pair_mask_seed, self_mask_seed};

/// What the coordinator recorded during the round.
pub struct Round<'a> {
    pub context: &'a [u8],
    pub threshold: usize,
    pub advertised: &'a HashMap<u32, Advertise>,
    pub neighbours: &'a HashMap<u32, Vec<u32>>,
    /// Who shared keys (and so who every neighbour masked with), with its seed commitment.
    pub commitments: &'a HashMap<u32, [u8; 32]>,
}

impl Round<'_> {
    /// Unmasks `sum`, the sum mod 2³² of the masked updates of `survivors`, with the shares
    /// `revealed` by whoever answered the unmask step.
    pub fn unmask(
        &self,
        sum: &mut [u32],
        survivors: &[u32],
        revealed: &[Revealed],
    ) -> Result<(), SecAggError> {
        let alive: HashSet<u32> = survivors.iter().copied().collect();
        if alive.len() < self.threshold {
            return Err(SecAggError::TooFewSurvivors {
                survivors: alive.len(),
                threshold: self.threshold,
            });
        }
        if let Some(v) = alive.iter().find(|v| !self.commitments.contains_key(v)) {
            return Err(SecAggError::Unknown(*v));
        }
        let mut seed_shares: HashMap<u32, Vec<Share>> = HashMap::new();
        let mut key_shares: HashMap<u32, Vec<Share>> = HashMap::new();
        for r in revealed {
            match r {
                Revealed::SelfSeed { of, share } => {
                    seed_shares.entry(*of).or_default().push(share.clone())
                }
                Revealed::MaskKey { of, share } => {
                    key_shares.entry(*of).or_default().push(share.clone())
                }
            }
        }
        let mut survivors_sorted: Vec<u32> = alive.iter().copied().collect();
        survivors_sorted.sort_unstable();
        for &v in &survivors_sorted {
            let want = self.commitments[&v];
            let seed = self.rebuild(v, "self-mask seed", seed_shares.get(&v), |s| {
                commitment(self.context, v, s) == want
            })?;
            masks::apply(sum, &self_mask_seed(&seed, self.context, v), true);
        }
        let mut dropped: Vec<u32> = self
            .commitments
            .keys()
            .copied()
            .filter(|v| !alive.contains(v))
            .collect();
        dropped.sort_unstable();
        for v in dropped {
            let partners: Vec<u32> = self
                .neighbours
                .get(&v)
                .map(|ns| ns.iter().copied().filter(|u| alive.contains(u)).collect())
                .unwrap_or_default();
            if partners.is_empty() {
                continue;
            }
            let public = self
                .advertised
                .get(&v)
                .ok_or(SecAggError::Unknown(v))?
                .mask_key;
            let secret = self.rebuild(v, "masking key", key_shares.get(&v), |s| {
                KeyPair::from_secret(*s).public == public
            })?;
            let key = KeyPair::from_secret(secret);
            for u in partners {
                let peer = self.advertised.get(&u).ok_or(SecAggError::Unknown(u))?;
                let seed = pair_mask_seed(&key.agree(&peer.mask_key)?, self.context, u, v);
                // u added this mask when u < v and subtracted it otherwise: undo that.
                masks::apply(sum, &seed, u < v);
            }
        }
        Ok(())
    }

    /// A 32-byte secret from its shares, accepted only when `check` holds; with more shares
    /// than the threshold, other subsets are tried, so one bad share does not fail the round.
    fn rebuild(
        &self,
        of: u32,
        what: &'static str,
        shares: Option<&Vec<Share>>,
        check: impl Fn(&[u8; 32]) -> bool,
    ) -> Result<[u8; 32], SecAggError> {
        let fail = |why: String| SecAggError::CannotRebuild { of, what, why };
        let shares = shares.map(Vec::as_slice).unwrap_or_default();
        let t = self.threshold;
        if shares.len() < t {
            return Err(fail(format!("{} shares, {t} needed", shares.len())));
        }
        for start in 0..shares.len() {
            let window: Vec<Share> = (0..shares.len())
                .map(|i| shares[(start + i) % shares.len()].clone())
                .collect();
            let Ok(bytes) = shamir::combine(&window, t) else {
                continue;
            };
            if let Ok(secret) = <[u8; 32]>::try_from(bytes.as_slice())
                && check(&secret)
            {
                return Ok(secret);
            }
        }
        Err(fail(format!(
            "no {t} of its {} shares rebuild the committed value",
            shares.len()
        )))
    }
}
