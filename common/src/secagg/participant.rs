//! One client's side of a secure-aggregation round, as pure steps (the transport carries the
//! messages): advertise two public keys; share the self-mask seed and the masking secret key
//! among the neighbours (Shamir, threshold t), each share sealed for its holder; mask the
//! quantised update; at the end, reveal for each neighbour either its self-mask share (it
//! survived) or its key share (it dropped) — never both.

use std::collections::{HashMap, HashSet};

use rand::RngCore;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

use super::keys::{KeyPair, derive};
use super::shamir::{self, Share};
use super::{Advertise, Revealed, SealedShare, SecAggError, masks, pair_mask_seed, self_mask_seed};

/// The plaintext of a sealed share: from, to, x, the self-seed share, the key share.
const SHARE_PLAINTEXT: usize = 4 + 4 + 1 + 32 + 32;

pub struct Participant {
    id: u32,
    context: Vec<u8>,
    enc: KeyPair,
    mask: KeyPair,
    self_seed: [u8; 32],
    neighbours: HashMap<u32, Advertise>,
    /// Shares this participant holds, by the neighbour that made them: (self-seed, key).
    held: HashMap<u32, (Share, Share)>,
}

impl Participant {
    /// A participant with fresh keys and a fresh self-mask seed for the round named by
    /// `context`; returns what it advertises.
    pub fn new(id: u32, context: &[u8], rng: &mut impl RngCore) -> (Self, Advertise) {
        let (enc, mask) = (KeyPair::generate(rng), KeyPair::generate(rng));
        let mut self_seed = [0u8; 32];
        rng.fill_bytes(&mut self_seed);
        let ad = Advertise {
            id,
            enc_key: enc.public,
            mask_key: mask.public,
        };
        let p = Self {
            id,
            context: context.to_vec(),
            enc,
            mask,
            self_seed,
            neighbours: HashMap::new(),
            held: HashMap::new(),
        };
        (p, ad)
    }

    /// Shares the self-mask seed and the masking secret key among `neighbours` (threshold
    /// `threshold`), one sealed message per neighbour, and commits to the seed (so that a
    /// wrong reconstruction is caught, not used).
    pub fn share_keys(
        &mut self,
        neighbours: &[Advertise],
        threshold: usize,
        rng: &mut impl RngCore,
    ) -> Result<(Vec<SealedShare>, [u8; 32]), SecAggError> {
        let mut seen = HashSet::new();
        for n in neighbours {
            if n.id == self.id || !seen.insert(n.id) {
                return Err(SecAggError::BadNeighbours(format!(
                    "participant {} listed twice or as its own neighbour",
                    n.id
                )));
            }
        }
        // One share per neighbour and one kept (as in Bonawitz et al., each participant holds
        // a share of its own secrets): a surviving participant reveals its own self-seed
        // share too, so k + 1 − t of its k neighbours may drop.
        let n = neighbours.len() + 1;
        let mut seed_shares = shamir::split(&self.self_seed, threshold, n, rng)?;
        let mut key_shares = shamir::split(self.mask.secret(), threshold, n, rng)?;
        if let (Some(seed), Some(key)) = (seed_shares.pop(), key_shares.pop()) {
            self.held.insert(self.id, (seed, key));
        }
        let mut sealed = Vec::with_capacity(neighbours.len());
        for ((n, b), s) in neighbours.iter().zip(seed_shares).zip(key_shares) {
            let mut plain = Vec::with_capacity(SHARE_PLAINTEXT + 16);
            plain.extend_from_slice(&self.id.to_be_bytes());
            plain.extend_from_slice(&n.id.to_be_bytes());
            plain.push(b.x);
            plain.extend_from_slice(&b.y);
            plain.extend_from_slice(&s.y);
            let key = self.share_key(n, self.id, n.id)?;
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0u8; 12]),
                Aad::from(aad(&self.context, self.id, n.id)),
                &mut plain,
            )
            .map_err(|_| SecAggError::Seal)?;
            sealed.push(SealedShare {
                from: self.id,
                to: n.id,
                ciphertext: plain,
            });
        }
        self.neighbours = neighbours.iter().map(|n| (n.id, n.clone())).collect();
        Ok((
            sealed,
            super::commitment(&self.context, self.id, &self.self_seed),
        ))
    }

    /// Opens the shares neighbours sealed for this participant. A share that does not open or
    /// does not parse is refused naming its sender (the others are kept).
    pub fn receive(&mut self, sealed: &[SealedShare]) -> Vec<SecAggError> {
        let mut errors = Vec::new();
        for s in sealed {
            match self.open(s) {
                Ok(shares) => {
                    self.held.insert(s.from, shares);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    fn open(&self, s: &SealedShare) -> Result<(Share, Share), SecAggError> {
        let bad = |why: &str| SecAggError::BadShare {
            from: s.from,
            why: why.to_string(),
        };
        if s.to != self.id {
            return Err(bad("addressed to another participant"));
        }
        let from = self
            .neighbours
            .get(&s.from)
            .ok_or_else(|| bad("not a neighbour"))?;
        let key = self.share_key(from, s.from, self.id)?;
        let mut buf = s.ciphertext.clone();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key([0u8; 12]),
                Aad::from(aad(&self.context, s.from, self.id)),
                &mut buf,
            )
            .map_err(|_| bad("does not decrypt (tampered, or sealed for another round)"))?;
        if plain.len() != SHARE_PLAINTEXT {
            return Err(bad("wrong length"));
        }
        let (f, t) = (&plain[0..4], &plain[4..8]);
        if f != s.from.to_be_bytes() || t != self.id.to_be_bytes() {
            return Err(bad("names another sender or receiver inside"));
        }
        let x = plain[8];
        Ok((
            Share {
                x,
                y: plain[9..41].to_vec(),
            },
            Share {
                x,
                y: plain[41..73].to_vec(),
            },
        ))
    }

    fn share_key(&self, peer: &Advertise, from: u32, to: u32) -> Result<LessSafeKey, SecAggError> {
        let shared = self.enc.agree(&peer.enc_key)?;
        let k = derive(&shared, &self.context, b"share", from, to);
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &k).map_err(|_| SecAggError::Seal)?;
        Ok(LessSafeKey::new(unbound))
    }

    /// Masks the quantised update in place: its self mask, plus for each neighbour in `active`
    /// (those that shared keys: the coordinator forwarded their shares) the pairwise mask, added
    /// towards larger ids and subtracted towards smaller ones, so that each pair cancels in the
    /// sum.
    pub fn mask(&self, words: &mut [u32], active: &[u32]) -> Result<(), SecAggError> {
        masks::apply(
            words,
            &self_mask_seed(&self.self_seed, &self.context, self.id),
            false,
        );
        for v in active {
            let n = self.neighbours.get(v).ok_or_else(|| {
                SecAggError::BadNeighbours(format!("{v} is not a neighbour of {}", self.id))
            })?;
            let seed = pair_mask_seed(&self.mask.agree(&n.mask_key)?, &self.context, self.id, *v);
            masks::apply(words, &seed, self.id > *v);
        }
        Ok(())
    }

    /// What this participant reveals so the sum can be unmasked: the self-seed share of each
    /// surviving neighbour, the key share of each dropped one. A neighbour named in both lists
    /// is refused (both shares would expose its update), and so is a survivor count below the
    /// threshold.
    pub fn unmask(
        &self,
        survivors: &[u32],
        dropped: &[u32],
        threshold: usize,
    ) -> Result<Vec<Revealed>, SecAggError> {
        let alive: HashSet<u32> = survivors.iter().copied().collect();
        if let Some(v) = dropped.iter().find(|v| alive.contains(v)) {
            return Err(SecAggError::BothShares(*v));
        }
        // A participant asked to unmask is alive: told it dropped, it would hand over a share
        // of its own masking key next to its masked update.
        if !alive.contains(&self.id) || dropped.contains(&self.id) {
            return Err(SecAggError::BothShares(self.id));
        }
        if alive.len() < threshold {
            return Err(SecAggError::TooFewSurvivors {
                survivors: alive.len(),
                threshold,
            });
        }
        let mut out = Vec::new();
        for (&of, (seed, key)) in &self.held {
            if alive.contains(&of) {
                out.push(Revealed::SelfSeed {
                    of,
                    share: seed.clone(),
                });
            } else if dropped.contains(&of) {
                out.push(Revealed::MaskKey {
                    of,
                    share: key.clone(),
                });
            }
        }
        Ok(out)
    }
}

fn aad(context: &[u8], from: u32, to: u32) -> Vec<u8> {
    let mut a = context.to_vec();
    a.extend_from_slice(&from.to_be_bytes());
    a.extend_from_slice(&to.to_be_bytes());
    a
}
