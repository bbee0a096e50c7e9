//! A whole secure-aggregation round between in-memory participants: the unmasked sum against
//! the plain sum, with dropouts before and after masking, below the threshold, and with
//! tampered messages.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::graph::ring_neighbours;
use super::participant::Participant;
use super::quantize::Quantizer;
use super::unmask::Round;
use super::*;

const CONTEXT: &[u8] = b"run-5f3a/round-3";
const DIM: usize = 2000;

struct Outcome {
    unmasked: Vec<f64>,
    truth: Vec<f64>,
    bound: f64,
    exact: bool,
}

/// n participants (ids 1..=n), k neighbours, threshold t; `silent` never send their masked
/// update (they dropped after sharing keys), `quiet` send it but not their shares at the end.
fn round(
    n: u32,
    k: usize,
    t: usize,
    silent: &[u32],
    quiet: &[u32],
    tamper: impl Fn(&mut Vec<Revealed>),
) -> Result<Outcome, SecAggError> {
    let mut rng = StdRng::seed_from_u64(u64::from(n) * 31 + silent.len() as u64);
    let q = Quantizer::new(1.0, 20).unwrap();
    let ids: Vec<u32> = (1..=n).collect();
    let mut parts = HashMap::new();
    let mut advertised = HashMap::new();
    for &id in &ids {
        let (p, ad) = Participant::new(id, CONTEXT, &mut rng);
        parts.insert(id, p);
        advertised.insert(id, ad);
    }
    let graph = ring_neighbours(&ids, k, &mut rng);
    let mut mail = Vec::new();
    let mut commitments = HashMap::new();
    for &id in &ids {
        let ns: Vec<Advertise> = graph[&id].iter().map(|v| advertised[v].clone()).collect();
        let (sealed, c) = parts.get_mut(&id).unwrap().share_keys(&ns, t, &mut rng)?;
        mail.extend(sealed);
        commitments.insert(id, c);
    }
    for &id in &ids {
        let inbox: Vec<SealedShare> = mail.iter().filter(|s| s.to == id).cloned().collect();
        let errors = parts.get_mut(&id).unwrap().receive(&inbox);
        assert!(errors.is_empty(), "{errors:?}");
    }
    let survivors: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|i| !silent.contains(i))
        .collect();
    let mut sum = vec![0u32; DIM];
    let mut truth = vec![0f64; DIM];
    let mut plain = vec![0u32; DIM];
    for &id in &survivors {
        let x: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut words = Vec::new();
        q.quantize(&x, &mut words, &mut rng);
        for i in 0..DIM {
            truth[i] += f64::from(x[i]);
            plain[i] = plain[i].wrapping_add(words[i]);
        }
        parts[&id].mask(&mut words, &graph[&id])?;
        for (s, w) in sum.iter_mut().zip(words) {
            *s = s.wrapping_add(w);
        }
    }
    let dropped: Vec<u32> = silent.to_vec();
    let mut revealed = Vec::new();
    for &id in survivors.iter().filter(|i| !quiet.contains(i)) {
        revealed.extend(parts[&id].unmask(&survivors, &dropped, t)?);
    }
    tamper(&mut revealed);
    Round {
        context: CONTEXT,
        threshold: t,
        advertised: &advertised,
        neighbours: &graph,
        commitments: &commitments,
    }
    .unmask(&mut sum, &survivors, &revealed)?;
    Ok(Outcome {
        exact: sum == plain,
        unmasked: sum
            .iter()
            .map(|&s| q.dequantize_sum(s, survivors.len()))
            .collect(),
        truth,
        bound: survivors.len() as f64 * q.step(),
    })
}

fn assert_close(o: &Outcome) {
    assert!(
        o.exact,
        "the unmasked sum differs from the sum of the quantised updates"
    );
    for (i, (got, want)) in o.unmasked.iter().zip(&o.truth).enumerate() {
        assert!((got - want).abs() <= o.bound, "{i}: {got} vs {want}");
    }
}

#[test]
fn without_dropouts_the_unmasked_sum_is_the_plain_sum() {
    assert_close(&round(10, 8, 5, &[], &[], |_| {}).unwrap());
    // A sparse SecAgg+ graph: 4 neighbours each among 12.
    assert_close(&round(12, 4, 3, &[], &[], |_| {}).unwrap());
}

#[test]
fn up_to_three_clients_dropping_before_masking_are_cancelled_out() {
    for silent in [&[3u32][..], &[2, 7], &[1, 5, 9]] {
        assert_close(&round(10, 8, 5, silent, &[], |_| {}).unwrap());
    }
}

#[test]
fn clients_dropping_after_masking_stay_in_the_sum() {
    for quiet in [&[4u32][..], &[4, 8], &[1, 2, 3]] {
        assert_close(&round(10, 8, 5, &[], quiet, |_| {}).unwrap());
    }
    assert_close(&round(10, 8, 5, &[6], &[2, 9], |_| {}).unwrap());
}

#[test]
fn below_the_threshold_the_round_fails_instead_of_summing_wrong() {
    let too_few = round(10, 8, 5, &[1, 2, 3, 4, 5, 6], &[], |_| {});
    assert!(
        matches!(
            too_few,
            Err(SecAggError::TooFewSurvivors {
                survivors: 4,
                threshold: 5
            })
        ),
        "{:?}",
        too_few.err()
    );
    // Enough survivors, but too few of them answer at the end to rebuild every secret.
    let silent_end = round(10, 8, 5, &[], &[1, 2, 3, 4, 5, 6], |_| {});
    assert!(
        matches!(silent_end, Err(SecAggError::CannotRebuild { .. })),
        "{:?}",
        silent_end.err()
    );
}

#[test]
fn a_wrong_share_is_caught_by_the_commitment_and_worked_around() {
    // One share of every seed flipped: the other shares still rebuild the committed seeds.
    let flip_first = |r: &mut Vec<Revealed>| {
        let mut done = HashSet::new();
        for x in r.iter_mut() {
            if let Revealed::SelfSeed { of, share } = x
                && done.insert(*of)
            {
                share.y[0] ^= 0xff;
            }
        }
    };
    assert_close(&round(10, 8, 5, &[], &[], flip_first).unwrap());
    // Every share of one seed wrong: refused, not used.
    let spoil = |r: &mut Vec<Revealed>| {
        for x in r.iter_mut() {
            if let Revealed::SelfSeed { of: 3, share } = x {
                share.y.iter_mut().for_each(|b| *b ^= 0x5a);
            }
        }
    };
    let err = round(10, 8, 5, &[], &[], spoil).err();
    assert!(
        matches!(err, Some(SecAggError::CannotRebuild { of: 3, .. })),
        "{err:?}"
    );
}

#[test]
fn a_masked_update_is_indistinguishable_from_uniform() {
    // An all-zero update, masked: the top byte of its words over 256 bins, chi-square with 255
    // degrees of freedom (the 0.1% critical value is 330.5).
    let mut rng = StdRng::seed_from_u64(9);
    let (a, ad_a) = Participant::new(1, CONTEXT, &mut rng);
    let (mut b, ad_b) = Participant::new(2, CONTEXT, &mut rng);
    let mut a = a;
    a.share_keys(std::slice::from_ref(&ad_b), 1, &mut rng)
        .unwrap();
    b.share_keys(std::slice::from_ref(&ad_a), 1, &mut rng)
        .unwrap();
    let mut words = vec![0u32; 1 << 16];
    a.mask(&mut words, &[2]).unwrap();
    let mut bins = [0f64; 256];
    words.iter().for_each(|w| bins[(w >> 24) as usize] += 1.0);
    let expected = words.len() as f64 / 256.0;
    let chi2: f64 = bins.iter().map(|o| (o - expected).powi(2) / expected).sum();
    assert!(chi2 < 330.5, "chi-square {chi2}");
}

#[test]
fn a_participant_never_reveals_both_shares_of_one_neighbour() {
    let mut rng = StdRng::seed_from_u64(10);
    let (mut a, _) = Participant::new(1, CONTEXT, &mut rng);
    let (_, ad_b) = Participant::new(2, CONTEXT, &mut rng);
    a.share_keys(&[ad_b], 1, &mut rng).unwrap();
    assert_eq!(a.unmask(&[1, 2], &[2], 1), Err(SecAggError::BothShares(2)));
}

#[test]
fn a_tampered_or_misaddressed_share_is_refused_naming_its_sender() {
    let mut rng = StdRng::seed_from_u64(11);
    let (mut a, ad_a) = Participant::new(1, CONTEXT, &mut rng);
    let (mut b, ad_b) = Participant::new(2, CONTEXT, &mut rng);
    let (mut sealed, _) = a
        .share_keys(std::slice::from_ref(&ad_b), 1, &mut rng)
        .unwrap();
    b.share_keys(std::slice::from_ref(&ad_a), 1, &mut rng)
        .unwrap();
    sealed[0].ciphertext[5] ^= 1;
    let errors = b.receive(&sealed);
    assert!(
        matches!(&errors[..], [SecAggError::BadShare { from: 1, .. }]),
        "{errors:?}"
    );
    let (other_round, _) = {
        let (mut a2, _) = Participant::new(1, b"another round", &mut rng);
        a2.share_keys(std::slice::from_ref(&ad_b), 1, &mut rng)
            .unwrap()
    };
    assert_eq!(
        b.receive(&other_round).len(),
        1,
        "a share of another round must not open"
    );
}
