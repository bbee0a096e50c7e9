//! The coordinator's side of one secure-aggregation round (SecAgg+), as a state machine that
//! the transport drives: it checks and routes what participants send at each step and, at the
//! end, unmasks the sum. It only ever holds public keys, sealed shares it cannot open, the
//! running sum of masked updates and the shares revealed at the end — never one client's
//! update.
//!
//! ```text
//! Advertise ──(≥ t keys)──▶ ShareKeys ──(≥ t shared)──▶ Masked ──(≥ t inputs)──▶ Unmask ──▶ sum
//! ```
//!
//! Each `close_*` moves to the next step with whoever answered; fewer than the threshold t at
//! any step fails the round (an error, never a wrong sum).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fedtune_common::secagg::graph::ring_neighbours;
use fedtune_common::secagg::unmask::Round;
use fedtune_common::secagg::{Advertise, Revealed, SealedShare, SecAggError};
use rand::RngCore;

/// Sealed share pairs are this long: 73 bytes of plaintext plus the 16-byte tag.
pub const SEALED_LEN: usize = 73 + 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Advertise,
    ShareKeys,
    Masked,
    Unmask,
    Done,
}

/// Why a participant's message was refused, or the round cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggRefusal {
    #[error("participant {who}: {what} arrived during the {step:?} step")]
    WrongStep {
        who: u32,
        what: &'static str,
        step: Step,
    },
    #[error("participant {0} is not part of this round")]
    Stranger(u32),
    #[error("participant {0} already sent this step's message")]
    Twice(u32),
    #[error("participant {who} sent a malformed message: {why}")]
    Malformed { who: u32, why: String },
    #[error(
        "only {got} of the {selected} selected clients {what}, fewer than the threshold {threshold}: the round fails and the model stays as it was"
    )]
    BelowThreshold {
        what: &'static str,
        got: usize,
        selected: usize,
        threshold: usize,
    },
    #[error("unmasking failed: {0}")]
    Unmask(#[from] SecAggError),
}

/// What each participant of the ShareKeys step is sent: its neighbours' keys.
pub type Neighbourhood = BTreeMap<u32, Vec<Advertise>>;

/// What each participant of the Masked step is sent: the shares sealed for it, and the
/// neighbours it must mask with (those that shared keys).
pub struct MaskingInstructions {
    pub inbox: Vec<SealedShare>,
    pub active: Vec<u32>,
}

pub struct SecAggRound {
    context: Vec<u8>,
    threshold: usize,
    neighbours_wanted: usize,
    /// Values per masked update.
    len: usize,
    selected: BTreeSet<u32>,
    step: Step,
    advertised: HashMap<u32, Advertise>,
    graph: HashMap<u32, Vec<u32>>,
    commitments: HashMap<u32, [u8; 32]>,
    mail: HashMap<u32, Vec<SealedShare>>,
    sum: Vec<u32>,
    masked: BTreeSet<u32>,
    revealed: Vec<Revealed>,
    answered: BTreeSet<u32>,
}

impl SecAggRound {
    /// A round among `selected` participants, with threshold `threshold`, `neighbours` per
    /// participant, and masked updates of `len` words.
    pub fn new(
        context: Vec<u8>,
        selected: impl IntoIterator<Item = u32>,
        threshold: usize,
        neighbours: usize,
        len: usize,
    ) -> Self {
        Self {
            context,
            threshold,
            neighbours_wanted: neighbours,
            len,
            selected: selected.into_iter().collect(),
            step: Step::Advertise,
            advertised: HashMap::new(),
            graph: HashMap::new(),
            commitments: HashMap::new(),
            mail: HashMap::new(),
            sum: Vec::new(),
            masked: BTreeSet::new(),
            revealed: Vec::new(),
            answered: BTreeSet::new(),
        }
    }

    pub fn step(&self) -> Step {
        self.step
    }

    pub fn context(&self) -> &[u8] {
        &self.context
    }

    fn expect(&self, who: u32, step: Step, what: &'static str) -> Result<(), SecAggRefusal> {
        if !self.selected.contains(&who) {
            return Err(SecAggRefusal::Stranger(who));
        }
        if self.step != step {
            return Err(SecAggRefusal::WrongStep {
                who,
                what,
                step: self.step,
            });
        }
        Ok(())
    }

    fn enough(&self, what: &'static str, got: usize) -> Result<(), SecAggRefusal> {
        if got < self.threshold {
            return Err(SecAggRefusal::BelowThreshold {
                what,
                got,
                selected: self.selected.len(),
                threshold: self.threshold,
            });
        }
        Ok(())
    }

    /// Step 1: a participant's public keys.
    pub fn advertise(&mut self, ad: Advertise) -> Result<(), SecAggRefusal> {
        self.expect(ad.id, Step::Advertise, "public keys")?;
        if self.advertised.contains_key(&ad.id) {
            return Err(SecAggRefusal::Twice(ad.id));
        }
        if ad.enc_key == [0u8; 32] || ad.mask_key == [0u8; 32] || ad.enc_key == ad.mask_key {
            return Err(SecAggRefusal::Malformed {
                who: ad.id,
                why: "public keys must be two distinct non-zero X25519 keys".into(),
            });
        }
        self.advertised.insert(ad.id, ad);
        Ok(())
    }

    /// Ends step 1: lays out the neighbours among those that advertised, and says what each
    /// is sent.
    pub fn close_advertise(
        &mut self,
        rng: &mut impl RngCore,
    ) -> Result<Neighbourhood, SecAggRefusal> {
        self.enough("sent their keys", self.advertised.len())?;
        let ids: Vec<u32> = self.advertised.keys().copied().collect();
        self.graph = ring_neighbours(&ids, self.neighbours_wanted, rng);
        // Each secret is split among a participant's neighbours and itself.
        let fewest = self.graph.values().map(Vec::len).min().unwrap_or(0) + 1;
        if fewest < self.threshold {
            return Err(SecAggRefusal::BelowThreshold {
                what: "hold shares of a participant's secrets (its neighbours and itself)",
                got: fewest,
                selected: self.selected.len(),
                threshold: self.threshold,
            });
        }
        self.step = Step::ShareKeys;
        Ok(self
            .graph
            .iter()
            .map(|(id, ns)| (*id, ns.iter().map(|v| self.advertised[v].clone()).collect()))
            .collect())
    }

    /// Step 2: a participant's sealed shares (one per neighbour) and its seed commitment.
    pub fn share_keys(
        &mut self,
        who: u32,
        sealed: Vec<SealedShare>,
        commitment: [u8; 32],
    ) -> Result<(), SecAggRefusal> {
        self.expect(who, Step::ShareKeys, "sealed shares")?;
        let Some(neighbours) = self.graph.get(&who) else {
            return Err(SecAggRefusal::Stranger(who));
        };
        if self.commitments.contains_key(&who) {
            return Err(SecAggRefusal::Twice(who));
        }
        let malformed = |why: String| SecAggRefusal::Malformed { who, why };
        let mut to: Vec<u32> = sealed.iter().map(|s| s.to).collect();
        to.sort_unstable();
        if to != *neighbours {
            return Err(malformed(format!(
                "shares addressed to {to:?}, its neighbours are {neighbours:?}"
            )));
        }
        if let Some(s) = sealed
            .iter()
            .find(|s| s.from != who || s.ciphertext.len() != SEALED_LEN)
        {
            return Err(malformed(format!(
                "a share from {} of {} bytes (must be from {who}, {SEALED_LEN} bytes)",
                s.from,
                s.ciphertext.len()
            )));
        }
        for s in sealed {
            self.mail.entry(s.to).or_default().push(s);
        }
        self.commitments.insert(who, commitment);
        Ok(())
    }

    /// Ends step 2: each participant that shared keys is sent the shares sealed for it by
    /// neighbours that also did, and masks with exactly those neighbours.
    pub fn close_share_keys(
        &mut self,
    ) -> Result<BTreeMap<u32, MaskingInstructions>, SecAggRefusal> {
        self.enough("shared their keys", self.commitments.len())?;
        self.step = Step::Masked;
        self.sum = vec![0; self.len];
        let shared: BTreeSet<u32> = self.commitments.keys().copied().collect();
        Ok(shared
            .iter()
            .map(|&id| {
                let inbox: Vec<SealedShare> = self
                    .mail
                    .remove(&id)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|s| shared.contains(&s.from))
                    .collect();
                let active = self.graph[&id]
                    .iter()
                    .copied()
                    .filter(|v| shared.contains(v))
                    .collect();
                (id, MaskingInstructions { inbox, active })
            })
            .collect())
    }

    /// Step 3: a participant's masked update, folded into the sum at once.
    pub fn masked(
        &mut self,
        who: u32,
        words: impl ExactSizeIterator<Item = u32>,
    ) -> Result<(), SecAggRefusal> {
        self.expect(who, Step::Masked, "a masked update")?;
        if !self.commitments.contains_key(&who) {
            return Err(SecAggRefusal::Malformed {
                who,
                why: "a masked update without having shared keys".into(),
            });
        }
        if self.masked.contains(&who) {
            return Err(SecAggRefusal::Twice(who));
        }
        if words.len() != self.len {
            return Err(SecAggRefusal::Malformed {
                who,
                why: format!(
                    "a masked update of {} values, the round's is {}",
                    words.len(),
                    self.len
                ),
            });
        }
        for (s, w) in self.sum.iter_mut().zip(words) {
            *s = s.wrapping_add(w);
        }
        self.masked.insert(who);
        Ok(())
    }

    /// Ends step 3: who is in the sum (survivors) and who shared keys but is not (dropped).
    pub fn close_masked(&mut self) -> Result<(Vec<u32>, Vec<u32>), SecAggRefusal> {
        self.enough("sent a masked update", self.masked.len())?;
        self.step = Step::Unmask;
        let survivors: Vec<u32> = self.masked.iter().copied().collect();
        let dropped = self
            .commitments
            .keys()
            .copied()
            .filter(|v| !self.masked.contains(v))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok((survivors, dropped))
    }

    /// Step 4: the shares a survivor reveals. Each must be of one of its neighbours, of the
    /// kind that neighbour's fate calls for.
    pub fn reveal(&mut self, who: u32, revealed: Vec<Revealed>) -> Result<(), SecAggRefusal> {
        self.expect(who, Step::Unmask, "revealed shares")?;
        if !self.masked.contains(&who) {
            return Err(SecAggRefusal::Malformed {
                who,
                why: "revealed shares without being in the sum".into(),
            });
        }
        if !self.answered.insert(who) {
            return Err(SecAggRefusal::Twice(who));
        }
        let neighbours = self.graph.get(&who).cloned().unwrap_or_default();
        for r in &revealed {
            let (of, wants_survivor, share) = match r {
                Revealed::SelfSeed { of, share } => (*of, true, share),
                Revealed::MaskKey { of, share } => (*of, false, share),
            };
            // Its own self-seed share is one it holds too (it is alive).
            let own = of == who && wants_survivor;
            let why = if !own && !neighbours.contains(&of) {
                Some(format!("a share of {of}, which is not its neighbour"))
            } else if self.masked.contains(&of) != wants_survivor {
                Some(format!("the wrong kind of share for {of}"))
            } else if share.y.len() != 32 || share.x == 0 {
                Some(format!("a share of {of} that is not 32 bytes at x > 0"))
            } else {
                None
            };
            if let Some(why) = why {
                self.answered.remove(&who);
                return Err(SecAggRefusal::Malformed { who, why });
            }
        }
        self.revealed.extend(revealed);
        Ok(())
    }

    /// Ends the round: the unmasked sum of the survivors' quantised updates.
    pub fn finish(&mut self) -> Result<Vec<u32>, SecAggRefusal> {
        if self.step != Step::Unmask {
            return Err(SecAggRefusal::WrongStep {
                who: 0,
                what: "the end of the round",
                step: self.step,
            });
        }
        self.enough("revealed their shares", self.answered.len())?;
        let survivors: Vec<u32> = self.masked.iter().copied().collect();
        let mut sum = std::mem::take(&mut self.sum);
        Round {
            context: &self.context,
            threshold: self.threshold,
            advertised: &self.advertised,
            neighbours: &self.graph,
            commitments: &self.commitments,
        }
        .unmask(&mut sum, &survivors, &self.revealed)?;
        self.step = Step::Done;
        Ok(sum)
    }
}

#[cfg(test)]
#[path = "secure_agg_tests.rs"]
mod tests;
