//! FedNova and SCAFFOLD against a hand computation over two rounds on a model of three values.

use super::tests::{close, delta, global, settings, values};
use super::*;

/// (Δ of `a`, Δ of `b`, examples nᵢ, step weight aᵢ)
type Update = ([f32; 2], f32, u64, f64);

fn round(s: &mut dyn Strategy, g: &mut TensorSet, live: usize, updates: &[Update]) {
    s.begin_round(1, live).unwrap();
    let mut agg = s.aggregator(1);
    for (i, &(a, b, n, steps)) in updates.iter().enumerate() {
        let weight = UpdateWeight {
            examples: n,
            steps: Some(steps),
        };
        agg.accept(&format!("c{i}"), &delta(a, b), weight).unwrap();
    }
    let combined = agg.finish().unwrap().unwrap();
    s.apply(g, &combined);
}

const ROUND_1: [Update; 2] = [([2.0, 4.0], -2.0, 1, 2.0), ([3.0, 3.0], 6.0, 3, 6.0)];
const ROUND_2: [Update; 1] = [([1.0, -1.0], 0.5, 5, 4.0)];

#[test]
fn fednova_averages_step_normalised_updates_scaled_by_the_effective_steps() {
    let specs = global([0.0; 2], 0.0).specs();
    let mut s = build(settings(StrategyKind::FedNova), &specs);
    let mut g = global([0.0; 2], 0.0);
    // p = (1/4, 3/4); d₁ = Δ₁/2 = ([1, 2], −1), d₂ = Δ₂/6 = ([0.5, 0.5], 1);
    // Σ pd = ([0.625, 0.875], 0.5); τ_eff = 1/4·2 + 3/4·6 = 5 → Δ = ([3.125, 4.375], 2.5).
    // (FedAvg would move by ([2.75, 3.25], 4): the client with 3x the steps dominates.)
    round(s.as_mut(), &mut g, 2, &ROUND_1);
    close(&values(&g), &[3.125, 4.375, 2.5]);
    // One client: d = Δ/4, τ_eff = 4, so it moves by its own update.
    round(s.as_mut(), &mut g, 2, &ROUND_2);
    close(&values(&g), &[4.125, 3.375, 3.0]);
    assert!(
        s.state().unwrap().is_none(),
        "fednova keeps no server state"
    );
}

#[test]
fn fednova_refuses_an_update_without_a_step_weight() {
    let specs = global([0.0; 2], 0.0).specs();
    let s = build(settings(StrategyKind::FedNova), &specs);
    let mut agg = s.aggregator(1);
    let e = agg
        .accept(
            "old-client",
            &delta([1.0, 1.0], 1.0),
            UpdateWeight::examples(3),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("old-client") && e.to_string().contains("step_weight"),
        "{e}"
    );
}

/// Client side of SCAFFOLD option II: cᵢ⁺ = cᵢ − c − Δ/a, per value.
fn client_variate(ci: [f64; 3], c: [f64; 3], u: Update) -> [f64; 3] {
    let d = [u.0[0], u.0[1], u.1].map(f64::from);
    std::array::from_fn(|k| ci[k] - c[k] - d[k] / u.3)
}

fn server_variate(s: &dyn Strategy) -> Vec<f32> {
    let c = s.sent_with_model().unwrap().unwrap();
    let get = |n: &str| c.get(&format!("scaffold-c.{n}")).unwrap().data.clone();
    [get("a"), get("b")].concat()
}

#[test]
fn scaffold_moves_the_model_by_the_mean_and_the_server_variate_by_the_clients_variates() {
    let specs = global([0.0; 2], 0.0).specs();
    let mut s = build(settings(StrategyKind::Scaffold), &specs);
    let mut g = global([0.0; 2], 0.0);
    // N = 3 live clients, 2 of them train. Model: x += Σ pΔ = ([2.75, 3.25], 4).
    // c ← c·(1 − 2/3) − 1/3·(Δ₁/2 + Δ₂/6) = −1/3·([1.5, 2.5], 0).
    round(s.as_mut(), &mut g, 3, &ROUND_1);
    close(&values(&g), &[2.75, 3.25, 4.0]);
    close(&server_variate(s.as_ref()), &[-0.5, -2.5 / 3.0, 0.0]);

    // The coordinator restarts: the server variate comes back from the checkpointed state.
    let state = s.state().unwrap().expect("scaffold keeps its variate");
    let mut s = build(settings(StrategyKind::Scaffold), &specs);
    s.restore(&state).unwrap();

    // Round 2: the third client alone. x += Δ; c ← c·(1 − 1/3) − 1/3·Δ/4.
    round(s.as_mut(), &mut g, 3, &ROUND_2);
    close(&values(&g), &[3.75, 2.25, 4.5]);
    let c1 = [-0.5, -2.5 / 3.0, 0.0];
    let want: Vec<f64> = (0..3)
        .map(|k| {
            let d = [0.25, -0.25, 0.125][k];
            c1[k] * 2.0 / 3.0 - d / 3.0
        })
        .collect();
    close(&server_variate(s.as_ref()), &want);

    // With every client's variate starting at 0, c stays their mean: the server never sees
    // the clients' variates, yet tracks them exactly.
    let zero = [0.0; 3];
    let c1_client1 = client_variate(zero, zero, ROUND_1[0]);
    let c1_client2 = client_variate(zero, zero, ROUND_1[1]);
    let c2_client3 = client_variate(zero, c1, ROUND_2[0]);
    let mean: Vec<f64> = (0..3)
        .map(|k| (c1_client1[k] + c1_client2[k] + c2_client3[k]) / 3.0)
        .collect();
    close(&server_variate(s.as_ref()), &mean);
}

#[test]
fn scaffold_restore_names_a_missing_variate() {
    let specs = global([0.0; 2], 0.0).specs();
    let mut s = build(settings(StrategyKind::Scaffold), &specs);
    let e = s.restore(&global([0.0; 2], 0.0)).unwrap_err();
    assert!(e.contains("scaffold-c.a"), "{e}");
}
