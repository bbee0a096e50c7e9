//! Differential privacy end to end: the real coordinator and client binaries on real
//! Fashion-MNIST (central DP ending at its privacy budget; local DP clipping on the clients),
//! and an in-process coordinator over real gRPC for `--resume` carrying the accountant.

use std::path::Path;
use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_common::dp::rdp::Accountant;
use fedtune_common::logging::LogFormat;
use fedtune_coordinator::config::{PrivacyArgs, SecurityArgs, ServeArgs};
use fedtune_proto::task::Kind;
use fedtune_tests::raw::{RawClient, pattern};
use fedtune_tests::{Proc, client_args, client_shares, fashion_subset, free_port};

fedtune_tests::test_binaries!();

/// Runs `serve` with `flags` and `n` clients; returns the coordinator's log, the clients'
/// logs and the rows of metrics.jsonl.
fn federation(
    dir: &Path,
    n: usize,
    flags: &[&str],
) -> (String, Vec<String>, Vec<serde_json::Value>) {
    // 4,000 real training images, close to IID.
    let data = client_shares(dir, 4000, n, 10.0, 5);
    let port = free_port();
    let out = dir.join("out");
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--min-available-clients",
        &n.to_string(),
        "--model",
        "mlp",
        "--eval-data",
        fashion_subset().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(flags.iter().map(|s| s.to_string()));
    let mut coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, dir);
    let mut clients: Vec<Proc> = (0..n)
        .map(|i| {
            let args = client_args(port, &data[i], &format!("site-{i}"), &[]);
            Proc::spawn(&format!("client{i}"), client_bin(), &args, dir)
        })
        .collect();
    coordinator.expect_success(Duration::from_secs(300));
    for c in &mut clients {
        c.expect_success(Duration::from_secs(60));
    }
    let rows = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        coordinator.output(),
        clients.iter().map(Proc::output).collect(),
        rows,
    )
}

/// ε after each of `rounds` releases of the sampled Gaussian mechanism.
fn epsilons(q: f64, z: f64, delta: f64, rounds: usize) -> Vec<f64> {
    let mut acc = Accountant::default();
    (0..rounds)
        .map(|_| {
            acc.step(q, z);
            acc.spent(delta).epsilon
        })
        .collect()
}

#[test]
fn central_dp_reports_epsilon_every_round_and_ends_before_the_budget_is_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let (q, z, delta) = (0.5, 1.0, 1e-5);
    let expected = epsilons(q, z, delta, 10);
    // A budget between the third and the fourth round's ε: the run must stop after round 3.
    let budget = (expected[2] + expected[3]) / 2.0;
    let budget_flag = format!("{budget:.6}");
    let (log, clients, rows) = federation(
        dir.path(),
        4,
        &[
            "--rounds",
            "10",
            "--dp",
            "central",
            "--dp-clip",
            "1.0",
            "--dp-noise-multiplier",
            "1.0",
            "--fraction-fit",
            "0.5",
            "--dp-delta",
            "1e-5",
            "--dp-max-epsilon",
            &budget_flag,
        ],
    );
    assert_eq!(rows.len(), 3, "three rounds fit the budget:\n{log}");
    for (i, row) in rows.iter().enumerate() {
        let p = &row["privacy"];
        let eps = p["epsilon"].as_f64().unwrap();
        assert!(
            (eps / expected[i] - 1.0).abs() < 1e-9,
            "round {}: ε {eps}, the accountant says {}",
            i + 1,
            expected[i]
        );
        assert!(eps <= budget);
        assert_eq!(p["delta"], 1e-5);
        assert_eq!(p["mode"], "central");
        assert_eq!(p["sample_rate"], 0.5);
        assert_eq!(p["expected_clients"], 2.0, "m = q·N = 0.5 × 4");
        assert_eq!(p["noise_stddev"], 0.5, "σ on the mean = z·C/m");
        // Poisson sampling: any number of the four may be drawn, and the round counts.
        assert!(row["clients_selected"].as_u64().unwrap() <= 4, "{row}");
    }
    assert!(
        log.contains("privacy budget reached: round 4 would take ε")
            && log.contains("run ended early"),
        "{log}"
    );
    assert!(log.contains("| ε "), "the round line shows ε:\n{log}");
    for c in clients {
        assert!(
            c.contains("privacy budget reached"),
            "clients are told why:\n{c}"
        );
    }
}

#[test]
fn local_dp_clients_clip_their_updates_before_upload() {
    let dir = tempfile::tempdir().unwrap();
    let clip = 0.5;
    let flags = |rounds: &'static str, resume: bool| {
        let mut f = vec![
            "--rounds",
            rounds,
            "--dp",
            "local",
            "--dp-clip",
            "0.5",
            // Noise far below the bound, so that the clipping shows in the global model.
            "--dp-noise-multiplier",
            "1e-6",
            "--dp-delta",
            "1e-5",
        ];
        if resume {
            f.push("--resume");
        }
        f
    };
    let (_, first, _) = federation(dir.path(), 3, &flags("1", false));
    let out = dir.path().join("out");
    let (g1, _) = checkpoint::load(&out.join("global.safetensors")).unwrap();
    let (log, second, rows) = federation(dir.path(), 3, &flags("2", true));
    let (g2, _) = checkpoint::load(&out.join("global.safetensors")).unwrap();
    assert_eq!(rows.len(), 2, "{log}");
    let expected = epsilons(1.0, 1e-6, 1e-5, 2);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["privacy"]["mode"], "local");
        assert_eq!(row["privacy"]["clip"], clip);
        let eps = row["privacy"]["epsilon"].as_f64().unwrap();
        assert!(
            eps >= expected[i] && eps < expected[i] * (1.0 + 1e-5),
            "{row}"
        );
    }
    for c in first.iter().chain(&second) {
        assert_eq!(
            c.matches("local DP: update norm").count(),
            1,
            "the round's update is clipped and noised on the client:\n{c}"
        );
        assert!(c.contains("clipped to 0.5"), "{c}");
    }
    // FedAvg of updates of norm <= C moves the model by at most C (plus the tiny noise).
    let moved = g2
        .tensors()
        .iter()
        .zip(g1.tensors())
        .flat_map(|(a, b)| a.data.iter().zip(&b.data).map(|(x, y)| f64::from(x - y)))
        .map(|d| d * d)
        .sum::<f64>()
        .sqrt();
    assert!(
        moved > 0.0 && moved <= clip * (1.0 + 1e-3),
        "round 2 moved the model by {moved}, above the clipping bound {clip}"
    );
}

const SYNTHETIC: &str = "synthetic:2000";

fn dp_args(out: &Path, rounds: u64, resume: bool) -> ServeArgs {
    ServeArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        rounds: Some(rounds),
        min_available_clients: Some(2),
        model: Some(SYNTHETIC.into()),
        out: Some(out.to_path_buf()),
        log_format: Some(LogFormat::Text),
        resume,
        security: SecurityArgs {
            insecure: true,
            ..Default::default()
        },
        privacy: PrivacyArgs {
            dp: Some("central".into()),
            dp_clip: Some("adaptive".into()),
            dp_noise_multiplier: Some(0.8),
            dp_clipped_count_stddev: Some(1.0),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A federation of two scripted clients over real gRPC; returns when the run ends.
async fn raw_run(a: ServeArgs) -> anyhow::Result<()> {
    let cfg = a.resolve()?;
    let listener = fedtune_coordinator::bind(&cfg).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(fedtune_coordinator::serve(cfg, listener));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut c = RawClient::join(&url, &format!("w{i}"), 10).await;
                loop {
                    match c.next().await {
                        Kind::Train(t) => {
                            let g = c.fetch(&t.task_id).await;
                            let d = pattern(&g, |j| ((j + i) % 5) as f32 * 0.01);
                            c.submit(&t, &d, 10, None).await.unwrap();
                        }
                        Kind::Finished(_) => return,
                        _ => {}
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    server.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_carries_the_accountant_and_the_adaptive_bound() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    raw_run(dp_args(&out, 2, false)).await.unwrap();
    raw_run(dp_args(&out, 4, true)).await.unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    // δ defaulted to min(1/N², 1e-5) with the two clients of the first round, and stayed.
    let expected = epsilons(1.0, 0.8, 1e-5, 4);
    for (i, row) in rows.iter().enumerate() {
        let p = &row["privacy"];
        assert!(
            (p["delta"].as_f64().unwrap() / 1e-5 - 1.0).abs() < 1e-6,
            "{row}"
        );
        assert_eq!(p["releases"], i + 1, "{row}");
        let eps = p["epsilon"].as_f64().unwrap();
        assert!(
            eps >= expected[i] && eps < expected[i] * (1.0 + 1e-5),
            "round {}: ε {eps}, expected {} (the resumed run must not start from zero)",
            i + 1,
            expected[i]
        );
    }
    // The bound the resumed run started from is the one the first run ended with.
    let (ended, resumed) = (
        rows[1]["privacy"]["next_clip"].as_f64().unwrap(),
        rows[2]["privacy"]["clip"].as_f64().unwrap(),
    );
    assert!(
        (ended - resumed).abs() < 1e-6 * ended,
        "{ended} vs {resumed}"
    );
}
