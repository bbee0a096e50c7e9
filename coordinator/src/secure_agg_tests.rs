//! Whole rounds between the coordinator's state machine and in-memory participants (the
//! clients' real steps from `fedtune_common::secagg`): the unmasked sum against the plain sum,
//! dropouts at every step, refusals of malformed messages.

use super::*;
use fedtune_common::secagg::participant::Participant;
use fedtune_common::secagg::quantize::Quantizer;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::{Rng, RngCore};

const LEN: usize = 1000;

/// Who leaves, and when.
#[derive(Default)]
struct Drops {
    before_keys: Vec<u32>,
    before_shares: Vec<u32>,
    before_masking: Vec<u32>,
    before_reveal: Vec<u32>,
}

/// Runs a round among participants 1..=n; returns the unmasked sum and the sum of the
/// survivors' quantised updates.
fn run(n: u32, t: usize, k: usize, drops: &Drops) -> Result<(Vec<u32>, Vec<u32>), SecAggRefusal> {
    let mut rng = StdRng::seed_from_u64(u64::from(n) * 7 + drops.before_masking.len() as u64);
    let q = Quantizer::new(1.0, 20).unwrap();
    let mut round = SecAggRound::new(b"run-1/round-2".to_vec(), 1..=n, t, k, LEN);
    let mut parts = BTreeMap::new();
    for id in 1..=n {
        let (p, ad) = Participant::new(id, round.context(), &mut rng);
        parts.insert(id, p);
        if !drops.before_keys.contains(&id) {
            round.advertise(ad)?;
        }
    }
    let hoods = round.close_advertise(&mut rng)?;
    for (id, ns) in &hoods {
        if drops.before_shares.contains(id) {
            continue;
        }
        let (sealed, c) = parts
            .get_mut(id)
            .unwrap()
            .share_keys(ns, t, &mut rng)
            .unwrap();
        round.share_keys(*id, sealed, c)?;
    }
    let plans = round.close_share_keys()?;
    let mut plain = vec![0u32; LEN];
    for (id, plan) in &plans {
        let p = parts.get_mut(id).unwrap();
        assert!(p.receive(&plan.inbox).is_empty());
        if drops.before_masking.contains(id) {
            continue;
        }
        let x: Vec<f32> = (0..LEN).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut words = Vec::new();
        q.quantize(&x, &mut words, &mut rng);
        plain
            .iter_mut()
            .zip(&words)
            .for_each(|(s, w)| *s = s.wrapping_add(*w));
        p.mask(&mut words, &plan.active).unwrap();
        round.masked(*id, words.iter().copied())?;
    }
    let (survivors, dropped) = round.close_masked()?;
    for id in &survivors {
        if drops.before_reveal.contains(id) {
            continue;
        }
        let shares = parts[id].unmask(&survivors, &dropped, t).unwrap();
        round.reveal(*id, shares)?;
    }
    Ok((round.finish()?, plain))
}

#[test]
fn ten_clients_unmask_to_the_plain_sum() {
    let (sum, plain) = run(10, 5, 6, &Drops::default()).unwrap();
    assert_eq!(sum, plain);
}

#[test]
fn one_two_or_three_clients_killed_at_any_step_still_unmask() {
    for lost in [vec![4], vec![2, 9], vec![1, 5, 10]] {
        for drops in [
            Drops {
                before_keys: lost.clone(),
                ..Default::default()
            },
            Drops {
                before_shares: lost.clone(),
                ..Default::default()
            },
            Drops {
                before_masking: lost.clone(),
                ..Default::default()
            },
            Drops {
                before_reveal: lost.clone(),
                ..Default::default()
            },
        ] {
            let (sum, plain) = run(10, 4, 8, &drops).unwrap_or_else(|e| panic!("{lost:?}: {e}"));
            assert_eq!(sum, plain, "{lost:?}");
        }
    }
}

#[test]
fn below_the_threshold_the_round_fails_at_the_step_that_lost_them() {
    let many: Vec<u32> = (1..=6).collect();
    for (drops, step) in [
        (
            Drops {
                before_keys: many.clone(),
                ..Default::default()
            },
            "sent their keys",
        ),
        (
            Drops {
                before_masking: many.clone(),
                ..Default::default()
            },
            "sent a masked update",
        ),
        (
            Drops {
                before_reveal: many.clone(),
                ..Default::default()
            },
            "revealed their shares",
        ),
    ] {
        match run(10, 5, 8, &drops) {
            Err(SecAggRefusal::BelowThreshold { what, got: 4, .. }) => assert_eq!(what, step),
            other => panic!("{step}: {:?}", other.map(|_| ())),
        }
    }
}

fn advertised_round(n: u32, rng: &mut StdRng) -> (SecAggRound, BTreeMap<u32, Participant>) {
    let mut round = SecAggRound::new(b"ctx".to_vec(), 1..=n, 2, 2, 8);
    let mut parts = BTreeMap::new();
    for id in 1..=n {
        let (p, ad) = Participant::new(id, b"ctx", rng);
        round.advertise(ad).unwrap();
        parts.insert(id, p);
    }
    (round, parts)
}

#[test]
fn malformed_messages_are_refused_naming_the_client_and_the_round_goes_on() {
    let mut rng = StdRng::seed_from_u64(3);
    let (mut round, mut parts) = advertised_round(4, &mut rng);
    // Keys: a stranger, a repeat, a zero key.
    let (_, stranger) = Participant::new(9, b"ctx", &mut rng);
    assert_eq!(round.advertise(stranger), Err(SecAggRefusal::Stranger(9)));
    let (_, again) = Participant::new(1, b"ctx", &mut rng);
    assert_eq!(round.advertise(again), Err(SecAggRefusal::Twice(1)));
    let hoods = round.close_advertise(&mut rng).unwrap();
    let (mut sealed, c) = parts
        .get_mut(&1)
        .unwrap()
        .share_keys(&hoods[&1], 2, &mut rng)
        .unwrap();
    // Shares: one cut short, one addressed to a non-neighbour.
    let mut short = sealed.clone();
    short[0].ciphertext.truncate(10);
    assert!(matches!(
        round.share_keys(1, short, c),
        Err(SecAggRefusal::Malformed { who: 1, .. })
    ));
    let mut misaddressed = sealed.clone();
    misaddressed[0].to = 1;
    assert!(matches!(
        round.share_keys(1, misaddressed, c),
        Err(SecAggRefusal::Malformed { who: 1, .. })
    ));
    round.share_keys(1, std::mem::take(&mut sealed), c).unwrap();
    for id in 2..=4 {
        let (s, c) = parts
            .get_mut(&id)
            .unwrap()
            .share_keys(&hoods[&id], 2, &mut rng)
            .unwrap();
        round.share_keys(id, s, c).unwrap();
    }
    round.close_share_keys().unwrap();
    // A masked update of the wrong length, then a good one, then a repeat.
    let wrong = round.masked(2, [0u32; 7].into_iter());
    assert!(
        matches!(&wrong, Err(SecAggRefusal::Malformed { who: 2, why }) if why.contains("7 values")),
        "{wrong:?}"
    );
    round.masked(2, [0u32; 8].into_iter()).unwrap();
    assert_eq!(
        round.masked(2, [0u32; 8].into_iter()),
        Err(SecAggRefusal::Twice(2))
    );
    // Keys sent now belong to a closed step.
    let (_, late) = Participant::new(3, b"ctx", &mut rng);
    assert!(matches!(
        round.advertise(late),
        Err(SecAggRefusal::WrongStep { who: 3, .. })
    ));
}

#[test]
fn a_revealed_share_of_the_wrong_kind_is_refused() {
    let mut rng = StdRng::seed_from_u64(4);
    let (mut round, mut parts) = advertised_round(3, &mut rng);
    let hoods = round.close_advertise(&mut rng).unwrap();
    for (id, ns) in &hoods {
        let (s, c) = parts
            .get_mut(id)
            .unwrap()
            .share_keys(ns, 2, &mut rng)
            .unwrap();
        round.share_keys(*id, s, c).unwrap();
    }
    let plans = round.close_share_keys().unwrap();
    for (id, plan) in &plans {
        let p = parts.get_mut(id).unwrap();
        p.receive(&plan.inbox);
        let mut words = vec![rng.next_u32(); 8];
        p.mask(&mut words, &plan.active).unwrap();
        round.masked(*id, words.iter().copied()).unwrap();
    }
    let (survivors, _) = round.close_masked().unwrap();
    // Asking for key shares of survivors: the shares a curious coordinator would want.
    let others: Vec<u32> = survivors.iter().copied().filter(|&v| v != 1).collect();
    let wrong = parts[&1].unmask(&[1], &others, 0).unwrap();
    assert!(matches!(
        round.reveal(1, wrong),
        Err(SecAggRefusal::Malformed { who: 1, .. })
    ));
    let right = parts[&1].unmask(&survivors, &[], 2).unwrap();
    round.reveal(1, right).unwrap();
}
