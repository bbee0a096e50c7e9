//! Every strategy against a hand computation on small vectors.

use super::*;
use fedtune_common::tensors::NamedTensor;
use fedtune_common::wire::{Assembler, EncodedTensors, Payload};

/// A model of two tensors: `a` (2 values) and `b` (1 value).
pub(super) fn global(a: [f32; 2], b: f32) -> TensorSet {
    TensorSet::new(vec![
        NamedTensor::new("a", vec![2], a.to_vec()).unwrap(),
        NamedTensor::new("b", vec![1], vec![b]).unwrap(),
    ])
    .unwrap()
}

/// A delta sent the way a client sends it (tensors in another order than the global's).
pub(super) fn delta(a: [f32; 2], b: f32) -> Payload {
    let set = TensorSet::new(vec![
        NamedTensor::new("b", vec![1], vec![b]).unwrap(),
        NamedTensor::new("a", vec![2], a.to_vec()).unwrap(),
    ])
    .unwrap();
    let enc = EncodedTensors::encode(&set, 0, 1024).unwrap();
    let mut asm = Assembler::new(enc.manifest, u64::MAX).unwrap();
    for c in &enc.chunks {
        asm.push(c).unwrap();
    }
    asm.finish().unwrap()
}

pub(super) fn settings(kind: StrategyKind) -> StrategySettings {
    StrategySettings {
        kind,
        server_lr: kind.default_server_lr(),
        server_momentum: 0.9,
        beta1: 0.9,
        beta2: 0.99,
        tau: 1e-3,
        proximal_mu: 0.1,
        trim_fraction: 0.2,
        krum_f: 1,
        krum_m: 3,
        fraction_fit: 1.0,
        min_fit_clients: 1,
        fraction_evaluate: 0.0,
        min_evaluate_clients: 1,
        evaluate_every: 1,
        buffer_memory: 1 << 30,
        spill_dir: std::env::temp_dir().join("fedtune-strategy-tests"),
        seed: 1,
    }
}

/// Runs one round: every (delta, examples) through a fresh aggregator, then the server step.
fn round(
    strategy: &mut dyn Strategy,
    g: &mut TensorSet,
    updates: &[([f32; 2], f32, u64)],
) -> Result<(), AggregateError> {
    let mut agg = strategy.aggregator(1);
    for (i, (a, b, n)) in updates.iter().enumerate() {
        agg.accept(
            &format!("c{}", i + 1),
            &delta(*a, *b),
            UpdateWeight::examples(*n),
        )?;
    }
    assert_eq!(agg.accepted(), updates.len());
    if let Some(combined) = agg.finish()? {
        strategy.apply(g, &combined);
    }
    Ok(())
}

pub(super) fn values(g: &TensorSet) -> Vec<f32> {
    let mut v = g.get("a").unwrap().data.clone();
    v.extend(&g.get("b").unwrap().data);
    v
}

pub(super) fn close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-5 * w.abs().max(1.0),
            "got {got:?}, want {want:?}"
        );
    }
}

fn built(kind: StrategyKind) -> BuiltIn {
    BuiltIn::new(settings(kind), &global([0.0; 2], 0.0).specs())
}

#[test]
fn fedavg_weighted_mean_with_unequal_example_counts() {
    let mut g = global([10.0, -1.0], 0.5);
    let mut s = built(StrategyKind::FedAvg);
    round(
        &mut s,
        &mut g,
        &[([1.0, 2.0], 4.0, 1), ([5.0, 6.0], -4.0, 3)],
    )
    .unwrap();
    // a: 10 + (1*1 + 3*5)/4 = 14, -1 + (1*2 + 3*6)/4 = 4 ; b: 0.5 + (4 - 12)/4 = -1.5
    assert_eq!(values(&g), vec![14.0, 4.0, -1.5]);
    assert!(s.state().unwrap().is_none(), "fedavg keeps no server state");
}

#[test]
fn no_update_leaves_global_unchanged() {
    let mut g = global([3.0, 4.0], 5.0);
    let before = g.clone();
    round(&mut built(StrategyKind::FedAvg), &mut g, &[]).unwrap();
    assert_eq!(g, before);
    round(&mut built(StrategyKind::Median), &mut g, &[]).unwrap();
    assert_eq!(g, before);
}

#[test]
fn fedavgm_momentum_over_three_rounds() {
    // η = 1, β = 0.9; one client per round so the combined delta is its delta.
    // r1: m = 1          → w = 1
    // r2: m = 0.9 + 2 = 2.9 → w = 3.9
    // r3: m = 2.61 - 1 = 1.61 → w = 5.51
    let mut g = global([0.0, 0.0], 0.0);
    let mut s = built(StrategyKind::FedAvgM);
    for d in [1.0, 2.0, -1.0] {
        round(&mut s, &mut g, &[([d, 0.0], 0.0, 7)]).unwrap();
    }
    close(&values(&g), &[5.51, 0.0, 0.0]);
    assert!(s.state().unwrap().is_some());
}

/// Reddi et al.'s update written out in f64, for comparison.
fn adaptive_reference(kind: StrategyKind, deltas: &[f64], eta: f64) -> f64 {
    let (b1, b2, tau) = (0.9, 0.99, 1e-3);
    let (mut m, mut v, mut w) = (0.0, tau * tau, 0.0);
    for &d in deltas {
        m = b1 * m + (1.0 - b1) * d;
        v = match kind {
            StrategyKind::FedAdam => b2 * v + (1.0 - b2) * d * d,
            StrategyKind::FedYogi => {
                let s: f64 = if v > d * d {
                    1.0
                } else if v < d * d {
                    -1.0
                } else {
                    0.0
                };
                v - (1.0 - b2) * d * d * s
            }
            _ => v + d * d,
        };
        w += eta * m / (v.sqrt() + tau);
    }
    w
}

#[test]
fn adaptive_strategies_over_three_rounds() {
    // First round of fedadam by hand: Δ = 0.1 → m = 0.01, v = 0.99e-6 + 0.01·0.01 = 1.0099e-4,
    // w = 0.01 · 0.01 / (0.0100494 + 0.001) = 0.0090503.
    let mut g = global([0.0, 0.0], 0.0);
    let mut s = built(StrategyKind::FedAdam);
    round(&mut s, &mut g, &[([0.1, 0.0], 0.0, 1)]).unwrap();
    close(&values(&g)[..1], &[0.0090503]);

    let deltas = [0.1, -0.05, 0.2];
    for kind in [
        StrategyKind::FedAdam,
        StrategyKind::FedYogi,
        StrategyKind::FedAdagrad,
    ] {
        let mut g = global([0.0, 0.0], 0.0);
        let mut s = built(kind);
        for &d in &deltas {
            // Two clients with unequal weights whose mean is d.
            round(
                &mut s,
                &mut g,
                &[
                    ([(d - 0.3) as f32, 0.0], 0.0, 1),
                    ([(d + 0.1) as f32, 0.0], 0.0, 3),
                ],
            )
            .unwrap();
        }
        let want = adaptive_reference(kind, &deltas, 0.01);
        close(&values(&g), &[want, 0.0, 0.0]);
    }
}

#[test]
fn fedprox_sends_mu_and_averages_like_fedavg() {
    let s = built(StrategyKind::FedProx);
    let cands: Vec<Candidate> = (1..=3)
        .map(|i| Candidate {
            id: format!("c{i}"),
            times_selected: 0,
        })
        .collect();
    let plan = s.configure_fit(1, 1, &cands);
    assert_eq!(plan.proximal_mu, 0.1);
    assert_eq!(plan.clients, vec!["c1", "c2", "c3"]);
    assert_eq!(
        built(StrategyKind::FedAvg)
            .configure_fit(1, 1, &cands)
            .proximal_mu,
        0.0
    );
}

#[test]
fn median_odd_and_even_counts() {
    let mut g = global([0.0, 0.0], 0.0);
    // a[0]: {1, 5, 2, 100} → (2 + 5) / 2 = 3.5 ; a[1]: {-1, -2, -3, 50} → -1.5 ; b: {0, 0, 1, 1} → 0.5
    round(
        &mut built(StrategyKind::Median),
        &mut g,
        &[
            ([1.0, -1.0], 0.0, 1),
            ([5.0, -2.0], 0.0, 9),
            ([2.0, -3.0], 1.0, 1),
            ([100.0, 50.0], 1.0, 1),
        ],
    )
    .unwrap();
    assert_eq!(values(&g), vec![3.5, -1.5, 0.5]);
    let mut g = global([0.0, 0.0], 0.0);
    round(
        &mut built(StrategyKind::Median),
        &mut g,
        &[
            ([1.0, 7.0], 0.0, 1),
            ([5.0, -2.0], 0.0, 1),
            ([-100.0, 3.0], 2.0, 1),
        ],
    )
    .unwrap();
    assert_eq!(values(&g), vec![1.0, 3.0, 0.0]);
}

#[test]
fn trimmed_mean_drops_the_extremes() {
    // β = 0.2, n = 5 → one value cut at each end.
    // a[0]: {1, 2, 3, 4, 1000} → (2 + 3 + 4) / 3 = 3 ; a[1]: {-50, 0, 1, 2, 3} → 1 ; b: {9,9,9,9,9} → 9
    let mut g = global([0.0, 0.0], 0.0);
    let ups = [
        ([1.0, -50.0], 9.0, 1),
        ([2.0, 0.0], 9.0, 1),
        ([3.0, 1.0], 9.0, 5),
        ([4.0, 2.0], 9.0, 1),
        ([1000.0, 3.0], 9.0, 1),
    ];
    round(&mut built(StrategyKind::TrimmedMean), &mut g, &ups).unwrap();
    assert_eq!(values(&g), vec![3.0, 1.0, 9.0]);
    // β = 0.5 with 2 updates would cut everything.
    let mut cfg = settings(StrategyKind::TrimmedMean);
    cfg.trim_fraction = 0.5;
    let mut s = BuiltIn::new(cfg, &g.specs());
    let e = round(&mut s, &mut g, &ups[..2]).unwrap_err().to_string();
    assert!(
        e.contains("trimmed-mean") && e.contains("needs at least 3"),
        "{e}"
    );
}

#[test]
fn krum_picks_from_the_honest_cluster_and_multi_krum_averages() {
    // Four honest updates near (1, 1, 1), one attacker at (100, ...).
    let ups = [
        ([1.0, 1.0], 1.0, 1),
        ([1.2, 1.0], 1.0, 3),
        ([0.8, 1.0], 1.0, 1),
        ([1.0, 1.3], 1.0, 1),
        ([100.0, -100.0], 100.0, 50),
    ];
    // Squared distances among the honest: c1-c2 .04, c1-c3 .04, c1-c4 .09, c2-c3 .16,
    // c2-c4 .13, c3-c4 .13. n − f − 2 = 2 neighbours: c1 .04+.04=.08, c2 .04+.13=.17,
    // c3 .04+.13=.17, c4 .09+.13=.22 → Krum keeps c1.
    let mut g = global([0.0, 0.0], 0.0);
    round(&mut built(StrategyKind::Krum), &mut g, &ups).unwrap();
    assert_eq!(values(&g), vec![1.0, 1.0, 1.0]);
    // Multi-Krum m = 3 keeps c1, then c2 and c3 (tie broken by order), weighted 1:3:1:
    // a[0] = (1 + 3.6 + 0.8) / 5 = 1.08.
    let mut g = global([0.0, 0.0], 0.0);
    round(&mut built(StrategyKind::MultiKrum), &mut g, &ups).unwrap();
    close(&values(&g), &[1.08, 1.0, 1.0]);
    // Krum with f = 1 needs f + 3 = 4 updates.
    let e = round(&mut built(StrategyKind::Krum), &mut g, &ups[..3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs at least 4") && e.contains("has 3"), "{e}");
}

#[test]
fn spilled_updates_combine_exactly_like_buffered_ones() {
    let ups = [
        ([1.0, -1.0], 0.5, 1),
        ([5.0, -2.0], 0.25, 2),
        ([2.0, -3.0], 1.0, 1),
        ([3.0, 4.0], -1.0, 1),
        ([7.0, 0.0], 2.0, 4),
    ];
    let spill = tempfile::tempdir().unwrap();
    for kind in [
        StrategyKind::Median,
        StrategyKind::TrimmedMean,
        StrategyKind::MultiKrum,
    ] {
        let mut in_memory = global([0.0, 0.0], 0.0);
        round(&mut built(kind), &mut in_memory, &ups).unwrap();
        let mut cfg = settings(kind);
        cfg.buffer_memory = 2 * 3 * 4; // two updates of 3 values; the other three spill
        cfg.spill_dir = spill.path().to_path_buf();
        let mut spilled = global([0.0, 0.0], 0.0);
        let mut s = BuiltIn::new(cfg, &spilled.specs());
        round(&mut s, &mut spilled, &ups).unwrap();
        assert_eq!(values(&in_memory), values(&spilled), "{kind}");
    }
    assert!(
        !spill.path().join("round-1").exists(),
        "the round's spill folder is removed with the buffer"
    );
    // The budget above holds two updates: the rest go to disk.
    let layout = Arc::new(Layout::new(&global([0.0, 0.0], 0.0).specs()));
    let mut buffer = UpdateBuffer::new(layout, 2 * 3 * 4, spill.path().join("direct"));
    for (a, b, n) in &ups[..3] {
        buffer.push(&delta(*a, *b), *n).unwrap();
    }
    assert_eq!((buffer.len(), buffer.spilled()), (3, 1));
    assert_eq!(buffer.read(2, 0..3).unwrap(), vec![2.0, -3.0, 1.0]);
}

#[test]
fn server_state_restored_from_a_checkpoint_continues_exactly() {
    for kind in [
        StrategyKind::FedAvgM,
        StrategyKind::FedAdam,
        StrategyKind::FedYogi,
        StrategyKind::FedAdagrad,
    ] {
        let rounds = [
            ([0.1, -0.2], 0.3, 2),
            ([0.05, 0.1], -0.1, 1),
            ([-0.2, 0.0], 0.2, 4),
        ];
        let mut g = global([1.0, 2.0], 3.0);
        let mut straight = built(kind);
        for u in &rounds {
            round(&mut straight, &mut g, &[*u]).unwrap();
        }
        let mut g2 = global([1.0, 2.0], 3.0);
        let mut first = built(kind);
        for u in &rounds[..2] {
            round(&mut first, &mut g2, &[*u]).unwrap();
        }
        let state = first.state().unwrap().unwrap();
        let mut resumed = built(kind);
        resumed.restore(&state).unwrap();
        round(&mut resumed, &mut g2, &[rounds[2]]).unwrap();
        assert_eq!(values(&g), values(&g2), "{kind}");
    }
    let mut wrong = built(StrategyKind::FedAdam);
    let partial = TensorSet::new(vec![
        NamedTensor::new("m.a", vec![2], vec![0.0; 2]).unwrap(),
    ])
    .unwrap();
    assert!(wrong.restore(&partial).unwrap_err().contains("m.b"));
}

#[test]
fn federated_evaluation_is_weighted_by_examples() {
    let r = |n, acc, loss| EvalReport {
        num_examples: n,
        metrics: [("accuracy".to_string(), acc), ("loss".to_string(), loss)].into(),
    };
    let s = weighted_eval(&[r(100, 0.9, 0.2), r(300, 0.5, 1.0), r(0, 0.0, 9.0)]);
    assert_eq!(s.clients, 3);
    assert_eq!(s.examples, 400);
    assert!((s.accuracy.unwrap() - 0.6).abs() < 1e-12);
    assert!((s.loss.unwrap() - 0.8).abs() < 1e-12);
    assert_eq!(s.f1, None);
}
