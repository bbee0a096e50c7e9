//! Learning on skewed data: SCAFFOLD and FedNova over real client processes on real
//! Fashion-MNIST shares.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_common::tensors::TensorSet;
use fedtune_tests::{Proc, client_args, client_shares, free_port};

fedtune_tests::test_binaries!();

/// `serve` for `clients` clients, all of them in every round, mlp trained with SGD.
fn serve(
    port: u16,
    out: &Path,
    (strategy, rounds, clients): (&str, u64, usize),
    extra: &[&str],
) -> Vec<String> {
    let clients = clients.to_string();
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--rounds",
        &rounds.to_string(),
        "--min-clients",
        &clients,
        "--min-fit-clients",
        &clients,
        "--model",
        "mlp",
        "--strategy",
        strategy,
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--batch-size",
        "32",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn client(port: u16, data: &Path, name: &str, state: &Path, dir: &Path) -> Proc {
    let state = state.display().to_string();
    let args = client_args(port, data, name, &["--state-dir", &state]);
    Proc::spawn(name, client_bin(), &args, dir)
}

/// Every value of `set`, in name order.
fn flat(set: &TensorSet, prefix: &str) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<_> = set
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.trim_start_matches(prefix).to_string(),
                t.data.clone(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The one file `<prefix>…` (not a staged one) a client kept in `state`, and the run it
/// belongs to.
fn kept(state: &Path, prefix: &str) -> (TensorSet, String) {
    let files: Vec<PathBuf> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.starts_with(prefix) && !name.contains("pending")
        })
        .collect();
    assert_eq!(files.len(), 1, "{prefix}: {files:?}");
    let (set, meta) = checkpoint::load(&files[0]).expect("the client kept its file");
    (set, meta["fedtune.federation"].clone())
}

/// The one SCAFFOLD variate a client kept.
fn client_variate(state: &Path) -> TensorSet {
    kept(state, "scaffold-variate.").0
}

/// The state folders of clients edge-a and edge-b.
fn state_dirs(dir: &Path) -> Vec<PathBuf> {
    ["state-a", "state-b"].iter().map(|s| dir.join(s)).collect()
}

#[test]
fn scaffold_server_variate_stays_the_mean_of_the_clients_own_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let shares = client_shares(dir.path(), 2000, 2, 0.3, 5);
    let states = state_dirs(dir.path());
    let port = free_port();
    let out = dir.path().join("out");
    let args = serve(port, &out, ("scaffold", 3, 2), &[]);

    // The coordinator dies at round 2's aggregation, after both updates were counted.
    let mut first = Proc::spawn_with_env(
        "coordinator-1",
        coordinator_bin(),
        &args,
        &[("FEDTUNE_CRASH_AT", "aggregate:2")],
        dir.path(),
    );
    let mut a = client(port, &shares[0], "edge-a", &states[0], dir.path());
    let b = client(port, &shares[1], "edge-b", &states[1], dir.path());
    assert!(
        first
            .wait(Duration::from_secs(180))
            .is_some_and(|s| !s.success()),
        "the coordinator should have died at round 2\n{}",
        first.output()
    );
    // While it is away, edge-b restarts too: its variate must come back from its disk.
    drop(b);
    let mut b = client(port, &shares[1], "edge-b", &states[1], dir.path());
    let mut second = Proc::spawn("coordinator-2", coordinator_bin(), &args, dir.path());
    second.expect_success(Duration::from_secs(180));
    a.expect_success(Duration::from_secs(30));
    b.expect_success(Duration::from_secs(30));

    // Both clients trained in every round, so with N = 2 the server's c is the mean of the
    // clients' variates, which it never saw: it follows them only through the updates.
    let (state, _) = checkpoint::load(&out.join("strategy-state.r3.safetensors")).unwrap();
    let server = flat(&state, "scaffold-c.");
    let ca = flat(&client_variate(&states[0]), "");
    let cb = flat(&client_variate(&states[1]), "");
    assert_eq!(server.len(), ca.len());
    let scale = server
        .iter()
        .flat_map(|(_, v)| v.iter())
        .fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 1e-4, "the server variate moved ({scale})");
    let mut worst = 0.0f32;
    for (((name, c), (na, va)), (nb, vb)) in server.iter().zip(&ca).zip(&cb) {
        assert!(name == na && name == nb, "{name} / {na} / {nb}");
        for ((c, x), y) in c.iter().zip(va).zip(vb) {
            worst = worst.max((c - (x + y) / 2.0).abs());
        }
    }
    eprintln!("server variate max |c| {scale:.3e}, off the clients' mean by at most {worst:.3e}");
    assert!(worst <= 1e-5 * scale, "off by {worst} (max |c| {scale})");
    assert!(second.output().contains("scaffold"), "{}", second.output());
}

fn metrics_rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn personalised_figures_are_reported_next_to_the_global_ones() {
    let dir = tempfile::tempdir().unwrap();
    // Strongly skewed shares: a client's own validation data favours its own classes.
    let shares = client_shares(dir.path(), 3000, 3, 0.1, 11);
    let port = free_port();
    let out = dir.path().join("out");
    let args = serve(
        port,
        &out,
        ("fedavg", 2, 3),
        &["--fraction-evaluate", "1", "--personalize-steps", "30"],
    );
    let mut coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, dir.path());
    let clients: Vec<Proc> = shares
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let name = format!("edge-{i}");
            client(port, d, &name, &dir.path().join(&name), dir.path())
        })
        .collect();
    coordinator.expect_success(Duration::from_secs(180));
    drop(clients);
    for row in metrics_rows(&out) {
        let global = row["fed_eval_accuracy"].as_f64().expect("global figure");
        let personal = row["fed_eval_personal_accuracy"]
            .as_f64()
            .expect("personalised figure");
        let loss = row["fed_eval_personal_loss"]
            .as_f64()
            .expect("personal loss");
        eprintln!(
            "round {}: federated accuracy {global:.4}, personalised {personal:.4} (loss {loss:.4})",
            row["round"]
        );
        assert_eq!(row["fed_eval_clients"], 3, "{row}");
        assert_ne!(global, personal, "{row}");
        // 30 steps on its own skewed data fit a client's own distribution better.
        assert!(personal > global, "{row}");
    }
    assert!(
        coordinator.output().contains("personalised loss"),
        "{}",
        coordinator.output()
    );
}

#[test]
fn fednova_weighs_a_client_capped_by_max_epochs_by_its_own_steps() {
    let dir = tempfile::tempdir().unwrap();
    // Equal shares, so the step weights differ only by the cap.
    let shares = client_shares(dir.path(), 2000, 2, 100.0, 7);
    let port = free_port();
    let out = dir.path().join("out");
    let args = serve(port, &out, ("fednova", 2, 2), &["--local-epochs", "3"]);
    let mut coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, dir.path());
    let full = client_args(port, &shares[0], "edge-full", &[]);
    let capped = client_args(port, &shares[1], "edge-capped", &["--max-epochs", "1"]);
    let mut clients = [
        Proc::spawn("full", client_bin(), &full, dir.path()),
        Proc::spawn("capped", client_bin(), &capped, dir.path()),
    ];
    coordinator.expect_success(Duration::from_secs(180));
    for c in &mut clients {
        c.expect_success(Duration::from_secs(30));
    }
    for row in metrics_rows(&out) {
        let weight = |name: &str| {
            row["clients"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["client"] == name)
                .and_then(|c| c["step_weight"].as_f64())
                .unwrap_or_else(|| panic!("{name} has a step weight: {row}"))
        };
        let (full, capped) = (weight("edge-full"), weight("edge-capped"));
        // SGD at a constant rate: 3 epochs against 1 of about the same number of steps.
        let ratio = full / capped;
        eprintln!(
            "round {}: step weights {full:.3} and {capped:.3} (ratio {ratio:.2})",
            row["round"]
        );
        assert!((2.7..=3.3).contains(&ratio), "{row}");
    }
}

/// The one Ditto personal model a client kept, and the run it belongs to.
fn personal_model(state: &Path) -> (TensorSet, String) {
    kept(state, "ditto-personal.")
}

#[test]
fn a_ditto_personal_model_stays_on_its_client_and_continues_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let shares = client_shares(dir.path(), 2000, 2, 0.1, 13);
    let port = free_port();
    let out = dir.path().join("out");
    let states = state_dirs(dir.path());
    let ditto = |rounds| {
        serve(
            port,
            &out,
            ("fedavg", rounds, 2),
            &[
                "--fraction-evaluate",
                "1",
                "--personalize-steps",
                "10",
                "--ditto-lambda",
                "0.1",
            ],
        )
    };
    let run = |rounds, tag: &str| {
        let mut coordinator = Proc::spawn(tag, coordinator_bin(), &ditto(rounds), dir.path());
        let mut clients: Vec<Proc> = ["edge-a", "edge-b"]
            .iter()
            .zip(&shares)
            .zip(&states)
            .map(|((name, d), state)| client(port, d, name, state, dir.path()))
            .collect();
        coordinator.expect_success(Duration::from_secs(180));
        for c in &mut clients {
            c.expect_success(Duration::from_secs(30));
        }
        clients
    };

    // Round 1: each client starts its personal model from the global one and keeps it.
    let first = run(1, "coordinator-1");
    assert!(
        !first[0].output().contains("continuing the personal model"),
        "{}",
        first[0].output()
    );
    let (p1, key1) = personal_model(&states[0]);
    // The run goes on to round 2 with new client processes: the personal model comes back
    // from the client's disk, and moves on.
    let second = run(2, "coordinator-2");
    assert!(
        second[0].output().contains("continuing the personal model"),
        "{}",
        second[0].output()
    );
    let (p2, key2) = personal_model(&states[0]);
    assert_eq!(key1, key2, "the same federation run");
    assert_ne!(p1, p2, "round 2 trained the personal model further");
    let (global, _) = checkpoint::load(&out.join("global.safetensors")).unwrap();
    assert_ne!(
        flat(&global, ""),
        flat(&p2, ""),
        "the personal model is not the global one"
    );
    for row in metrics_rows(&out) {
        assert!(
            row["fed_eval_personal_accuracy"].as_f64().is_some(),
            "{row}"
        );
    }
    assert!(
        second[0].output().contains("Ditto"),
        "{}",
        second[0].output()
    );
}
