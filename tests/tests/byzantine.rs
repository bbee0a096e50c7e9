//! A Byzantine federation with real processes on real Fashion-MNIST: four honest clients and
//! one that sends its update scaled by 100 (`--simulate-attack scale:100`). FedAvg's accuracy
//! collapses; median, trimmed mean and Krum stay close to the all-honest run.

use std::path::Path;
use std::time::Duration;

use fedtune_tests::{Proc, client_args, client_shares, fashion_subset, free_port};

fedtune_tests::test_binaries!();

const HONEST: usize = 4;
const ROUNDS: u64 = 3;

/// Writes each client's share of the training data; returns the folders.
fn client_data(dir: &Path) -> Vec<std::path::PathBuf> {
    // Close to IID, so that every honest update points the same way.
    client_shares(dir, 7500, HONEST + 1, 100.0, 3)
}

/// Runs a federation; the client at `attacker` (if any) tampers with its updates. Returns the
/// final server-side test accuracy.
fn final_accuracy(
    dir: &Path,
    data: &[std::path::PathBuf],
    strategy: &str,
    attacker: Option<usize>,
) -> f64 {
    let clients = if attacker.is_some() {
        HONEST + 1
    } else {
        HONEST
    };
    let port = free_port();
    let out = dir.join(format!("out-{strategy}-{}", attacker.is_some()));
    let mut coordinator = Proc::spawn(
        &format!("coordinator-{strategy}"),
        coordinator_bin(),
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            &ROUNDS.to_string(),
            "--min-available-clients",
            &clients.to_string(),
            "--min-fit-clients",
            &clients.to_string(),
            "--strategy",
            strategy,
            "--model",
            "mlp",
            "--eval-data",
            fashion_subset().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from),
        dir,
    );
    let mut procs: Vec<Proc> = (0..clients)
        .map(|i| {
            let attack: &[&str] = if attacker == Some(i) {
                &["--simulate-attack", "scale:100"]
            } else {
                &[]
            };
            let args = client_args(port, &data[i], &format!("client{i}"), attack);
            Proc::spawn(&format!("{strategy}-client{i}"), client_bin(), &args, dir)
        })
        .collect();
    let status = coordinator.wait(Duration::from_secs(300));
    assert!(
        status.is_some_and(|s| s.success()),
        "{strategy}: coordinator failed: {status:?}\n{}",
        coordinator.output()
    );
    for p in &mut procs {
        assert!(p.wait(Duration::from_secs(60)).is_some_and(|s| s.success()));
    }
    if let Some(i) = attacker {
        assert!(
            procs[i].output().contains("--simulate-attack scale:100"),
            "the attacker warns at start"
        );
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    last["eval_accuracy"].as_f64().unwrap()
}

#[test]
fn robust_strategies_survive_a_scaling_attacker_and_fedavg_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = client_data(dir.path());
    let honest = final_accuracy(dir.path(), &data, "fedavg", None);
    let attacked: Vec<(&str, f64)> = ["fedavg", "median", "trimmed-mean", "krum"]
        .into_iter()
        .map(|s| (s, final_accuracy(dir.path(), &data, s, Some(HONEST))))
        .collect();
    eprintln!("all honest (fedavg): {:.2}%", honest * 100.0);
    for (s, acc) in &attacked {
        eprintln!("with a scale:100 attacker, {s}: {:.2}%", acc * 100.0);
    }
    assert!(honest > 0.70, "the honest federation learns: {honest}");
    let fedavg = attacked[0].1;
    assert!(
        fedavg < honest - 0.20,
        "fedavg should collapse under the attack: {fedavg} vs honest {honest}"
    );
    for (s, acc) in &attacked[1..] {
        assert!(
            *acc >= honest - 0.03,
            "{s} fell more than 3 points below the honest run: {acc} vs {honest}"
        );
    }
}
