//! The DP wrapper against hand computations and the statistics of its noise.

use super::*;
use crate::strategy::tests::{delta, global, settings};
use crate::strategy::{BuiltIn, StrategyKind, UpdateWeight};

fn dp(mode: DpMode, clip: ClipRule, z: f64, q: f64) -> DpSettings {
    DpSettings {
        mode,
        clip,
        noise_multiplier: z,
        sample_rate: q,
        delta: Some(1e-5),
        max_epsilon: None,
    }
}

/// FedAvg on the two-tensor model of the strategy tests, wrapped.
fn private(s: DpSettings) -> Private {
    let g = global([0.0, 0.0], 0.0);
    let inner = Box::new(BuiltIn::new(settings(StrategyKind::FedAvg), &g.specs()));
    Private::new(inner, s, Arc::new(Layout::new(&g.specs()))).with_seed(5)
}

fn flat(g: &TensorSet) -> Vec<f32> {
    g.tensors().iter().flat_map(|t| t.data.clone()).collect()
}

#[test]
fn central_dp_clips_each_update_and_divides_by_the_expected_count() {
    // 4 live clients at q = 0.5: m = 2. Updates of norm 5 and 0.5, clip 1, (almost) no noise.
    let mut p = private(dp(DpMode::Central, ClipRule::Fixed(1.0), 1e-9, 0.5));
    p.begin_round(1, 4).unwrap();
    let mut agg = p.aggregator(1);
    agg.accept("c1", &delta([3.0, 4.0], 0.0), UpdateWeight::examples(100))
        .unwrap();
    agg.accept("c2", &delta([0.0, 0.0], 0.5), UpdateWeight::examples(1))
        .unwrap();
    let combined = agg.finish().unwrap().unwrap();
    let mut g = global([0.0, 0.0], 0.0);
    p.apply(&mut g, &combined);
    // (clip([3,4,0]) + [0,0,0.5]) / 2, equal weights whatever the example counts.
    let want = [0.3, 0.4, 0.25];
    for (got, want) in flat(&g).iter().zip(want) {
        assert!((got - want).abs() < 1e-5, "{:?} vs {want:?}", flat(&g));
    }
    let status = p.privacy().unwrap();
    assert_eq!(status.expected_clients, Some(2.0));
    assert_eq!(status.releases, 1);
}

#[test]
fn central_noise_has_the_configured_standard_deviation() {
    // A 60k-value model, no updates: the step is noise alone, s.d. z·C/m.
    let specs = vec![fedtune_common::tensors::TensorSpec {
        name: "w".into(),
        shape: vec![60_000],
    }];
    let inner = Box::new(BuiltIn::new(settings(StrategyKind::FedAvg), &specs));
    let (z, c, q, live) = (1.3, 0.5, 0.25, 20);
    let mut p = Private::new(
        inner,
        dp(DpMode::Central, ClipRule::Fixed(c), z, q),
        Arc::new(Layout::new(&specs)),
    )
    .with_seed(9);
    p.begin_round(1, live).unwrap();
    let combined = p.aggregator(1).finish().unwrap().unwrap();
    let n = combined.len() as f64;
    let mean = combined.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let sd = (combined
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0))
        .sqrt();
    let want = z * c / (q * live as f64);
    // The sample s.d. of 60k normals is within ±1.5% of σ (its own s.d. is 0.29% of σ).
    assert!((sd / want - 1.0).abs() < 0.015, "s.d. {sd}, want {want}");
    assert!((p.privacy().is_none()), "nothing released before apply");
}

#[test]
fn noise_differs_from_round_to_round() {
    let mut p = private(dp(DpMode::Central, ClipRule::Fixed(1.0), 1.0, 1.0));
    p.begin_round(1, 2).unwrap();
    let a = p.aggregator(1).finish().unwrap().unwrap();
    p.begin_round(2, 2).unwrap();
    let b = p.aggregator(2).finish().unwrap().unwrap();
    assert_ne!(
        a, b,
        "the same noise twice could be cancelled by differencing"
    );
}

#[test]
fn the_run_ends_before_a_round_would_exceed_the_budget() {
    let mut s = dp(DpMode::Central, ClipRule::Fixed(1.0), 1.0, 1.0);
    // q = 1, z = 1, δ = 1e-5: ε ≈ 4.8 after one round, ≈ 7.0 after two.
    s.max_epsilon = Some(6.0);
    let mut p = private(s);
    p.begin_round(1, 2).unwrap();
    let combined = p.aggregator(1).finish().unwrap().unwrap();
    p.apply(&mut global([0.0, 0.0], 0.0), &combined);
    let spent = p.privacy().unwrap().epsilon;
    assert!(spent < 6.0, "{spent}");
    match p.begin_round(2, 2) {
        Err(EndRun::BudgetSpent(why)) => {
            assert!(
                why.contains("round 2") && why.contains("--dp-max-epsilon 6"),
                "{why}"
            );
        }
        other => panic!("round 2 should end the run, got {other:?}"),
    }
}

#[test]
fn local_dp_asks_clients_for_their_noise_and_counts_every_attempt() {
    let mut p = private(dp(DpMode::Local, ClipRule::Fixed(0.5), 2.0, 1.0));
    p.begin_round(1, 3).unwrap();
    let cands: Vec<Candidate> = (1..=3)
        .map(|i| Candidate {
            id: format!("c{i}"),
            times_selected: 0,
        })
        .collect();
    let plan = p.configure_fit(1, 1, &cands);
    assert_eq!(
        plan.local_dp,
        Some(LocalDp {
            clip: 0.5,
            noise_stddev: 1.0
        })
    );
    assert_eq!(plan.clients.len(), 3);
    assert!(!plan.count_whatever_arrives);
    p.begin_round(1, 3).unwrap(); // a retried attempt
    assert_eq!(p.privacy().unwrap().releases, 2);
}

#[test]
fn adaptive_clipping_moves_the_bound_from_the_noised_count() {
    let clip = ClipRule::Adaptive {
        initial: 1.0,
        target_quantile: 0.5,
        lr: 0.2,
        count_stddev: Some(1e-9),
    };
    let mut p = private(dp(DpMode::Central, clip, 1e-10, 1.0));
    // Two clients, both far above the bound: the fraction unclipped is 0, so C grows.
    p.begin_round(1, 2).unwrap();
    let mut agg = p.aggregator(1);
    agg.accept("c1", &delta([30.0, 40.0], 0.0), UpdateWeight::examples(1))
        .unwrap();
    agg.accept("c2", &delta([0.0, 0.0], 9.0), UpdateWeight::examples(1))
        .unwrap();
    let combined = agg.finish().unwrap().unwrap();
    p.apply(&mut global([0.0, 0.0], 0.0), &combined);
    let s = p.privacy().unwrap();
    assert!((s.unclipped_fraction.unwrap()).abs() < 1e-6);
    let next = s.next_clip.unwrap();
    assert!(
        (next - (0.2f64 * 0.5).exp()).abs() < 1e-6,
        "C became {next}"
    );
    assert!(s.update_noise_multiplier > s.noise_multiplier);
}

#[test]
fn the_accountant_survives_a_checkpoint() {
    let mut p = private(dp(DpMode::Central, ClipRule::Fixed(1.0), 1.1, 0.5));
    for round in 1..=3 {
        p.begin_round(round, 10).unwrap();
        let combined = p.aggregator(round).finish().unwrap().unwrap();
        p.apply(&mut global([0.0, 0.0], 0.0), &combined);
    }
    let state = p.state().unwrap().unwrap();
    let mut fresh = private(dp(DpMode::Central, ClipRule::Fixed(1.0), 1.1, 0.5));
    fresh.restore(&state).unwrap();
    let (before, after) = (
        p.accountant.spent(1e-5).epsilon,
        fresh.accountant.spent(1e-5).epsilon,
    );
    assert!(
        after >= before && after < before * (1.0 + 1e-6),
        "{before} -> {after}"
    );
    assert_eq!(fresh.accountant.rounds(), 3);
}
